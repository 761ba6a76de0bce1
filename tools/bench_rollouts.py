"""RL rollouts with and without speculation, side by side: the DAS benchmark.

  python tools/bench_rollouts.py --out=benchmarks/das.md
  python tools/bench_rollouts.py --smoke                  # tiny sizes, a check that it runs
  python tools/bench_rollouts.py --model=smollm2 --tasks=math,code --train_layers=2 ...

A small on-policy RL loop (harness/rl.py): every epoch each problem is sampled --group_size
times with seeds fixed by (epoch, problem, sample) and rewarded, and a GRPO-style
policy-gradient step updates the weights, which are swapped into the running engines
(Engine.update_weights). Problems: code prompts rewarded by whether the code compiles (the
embedded test model is a Python completer), and/or math word problems through the chat
template rewarded by their answer (harness/rl_tasks.py; for the real default model,
--model=smollm2, which is too large to train whole on a CPU host in a benchmark's time:
--train_layers trains its last layers and final norm only). Each method has its own engine
from the same initial weights; epochs are interleaved (epoch e of every method, then e + 1,
the methods' order rotated each epoch so none always runs first), so a busy spell of the
machine hits all methods alike. One trainer steps on the baseline's rollouts and every engine
gets its weights:

- none: no speculation.
- suffix: SuffixDecoding, a per-request tree and one global tree over finished outputs.
- per_problem: DAS's rollout drafter (a suffix tree per problem over its last --das_window
  rollouts), no budget: every request drafts up to --max_spec_tokens.
- das: the same drafter with DAS's length-aware budget (scheduler/speculation/das.py).

Speculation is lossless, so every method must produce the same rollouts and rewards (checked;
the report says so), hence the same weights. Per epoch: rollout makespan (the wall time of the
epoch's generate call), output tokens/s, acceptance. Then a histogram of rollout lengths, the
step-cost model DAS fitted on this machine, and the same recorded rollouts replayed in the
simulator with the analytic 7B-on-H100 cost model (scheduler/cost_model.py): what each
method's makespan would be where a step's fixed cost dominates.
"""

from __future__ import annotations

import collections
import os
import statistics
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "", "Write the Markdown report here (else stdout only).")
flags.DEFINE_list("methods", ["none", "suffix", "per_problem", "das"], "Methods; none is the baseline.")
flags.DEFINE_integer("epochs", 10, "RL epochs.", lower_bound=1)
flags.DEFINE_integer("problems", 0, "Problems used (the first n of harness.rl.PROBLEMS); 0: all.", lower_bound=0)
flags.DEFINE_integer("group_size", 8, "Samples per problem per epoch (the GRPO group).", lower_bound=2)
flags.DEFINE_integer("max_tokens", 192, "Most tokens a rollout may write.", lower_bound=1)
flags.DEFINE_float("temperature", 1.0, "Sampling temperature of the rollouts.")
flags.DEFINE_integer("max_spec_tokens", 8, "Most draft tokens per request and step.", lower_bound=1)
flags.DEFINE_integer("das_window", 16, "Rollouts per problem DAS's trees keep.", lower_bound=1)
flags.DEFINE_integer("max_num_batched_tokens", 512, "Engine token budget per step.")
flags.DEFINE_integer("seed", 0, "Seed of the rollouts' sampling.")
flags.DEFINE_float("learning_rate", 1e-4, "The policy update's learning rate (harness.rl.PolicyTrainer).")
flags.DEFINE_bool("simulate", True, "Replay the recorded rollouts in the simulator (7B on H100 costs).")
flags.DEFINE_bool("smoke", False, "Tiny sizes: 3 problems, 2 epochs, short rollouts.")
flags.DEFINE_enum("model", "test", ["test", "smollm2"], "test: the embedded test model (5.1M, code prompts); "
                  "smollm2: the real default model, SmolLM2-135M-Instruct (f32, from its GGUF file).")
flags.DEFINE_list("tasks", ["code"], "code (harness.rl.PROBLEMS, rewarded by compiling) and/or math "
                  "(harness.rl_tasks: word problems through the chat template, rewarded by the answer; "
                  "a chat model: --model=smollm2).")
flags.DEFINE_integer("math_problems", 16, "Math problems (with --tasks including math).", lower_bound=1)
flags.DEFINE_bool("async_scheduling", True, "Engines plan a plain step while the last runs (off: every step "
                  "is read before the next is planned, as a drafted step always is).")
flags.DEFINE_integer("train_layers", 0, "Train only the last this many decoder layers and the final norm "
                     "(0: every parameter).", lower_bound=0)


def _engine(model, tok, method: str, num_seqs: int):
    from jinfer.config import CacheConfig, EngineOptions, SchedulerConfig
    from jinfer.engine import Engine
    from scheduler.speculation.das import DasConfig, LengthAwareBudget, RolloutDrafter
    from scheduler.speculation.drafters import SuffixDrafter

    drafter = budget = None
    if method == "suffix":
        drafter = SuffixDrafter()
    elif method in ("per_problem", "das"):
        drafter = RolloutDrafter(DasConfig(window=FLAGS.das_window))
        budget = LengthAwareBudget(drafter) if method == "das" else None
    elif method != "none":
        raise app.UsageError(f"unknown method {method!r}; known: none, suffix, per_problem, das")
    max_len = 256 if FLAGS.model == "test" else 512  # (the test model's trained context)
    pages = num_seqs * -(-max_len // 16) + 8
    engine = Engine(model, tok, CacheConfig(page_size=16, num_pages=pages),
                    SchedulerConfig(max_num_batched_tokens=max(FLAGS.max_num_batched_tokens, num_seqs),
                                    max_num_seqs=num_seqs, max_model_len=max_len),
                    options=EngineOptions(async_scheduling=FLAGS.async_scheduling), drafter=drafter,
                    max_spec_tokens=FLAGS.max_spec_tokens, draft_budget=budget)
    engine.runner.warmup()
    return engine, budget


def _spec_counts(engine) -> tuple[int, int, int, float]:
    s = engine.spec_stats()
    return s.draft_tokens, s.accepted_tokens, s.spec_steps, s.drafter_seconds


def _histogram(lengths: list[int], width: int = 16, bar: int = 40) -> list[str]:
    top = max(lengths)
    bins = collections.Counter(min(n // width, top // width) for n in lengths)
    most = max(bins.values())
    lines = ["| tokens | rollouts | |", "|---|---:|---|"]
    for b in range(top // width + 1):
        count = bins.get(b, 0)
        lines.append(f"| {b * width}-{b * width + width - 1} | {count} | {'#' * round(bar * count / most)} |")
    return lines


def _simulate(records_by_epoch: list[list], methods: list[str]) -> dict[str, tuple[list[float], object]]:
    """Each method's (makespan per epoch, speculation counters: jinfer.step_plan.SpecStats) when
    the recorded rollouts replay in the simulator."""
    from scheduler.simulation.workloads import WorkItem
    from scheduler.cost_model import analytic_7b_h100
    from scheduler.speculation.das import DasConfig, LengthAwareBudget, RolloutDrafter
    from scheduler.speculation.drafters import SuffixDrafter
    from scheduler.routing.policies import make_router
    from scheduler.simulation.simulator import ReplicaConfig, Simulator

    gap = 1000.0  # seconds between epochs: each epoch drains before the next arrives
    items = [WorkItem(gap * e, tuple(r.prompt_ids), len(r.token_ids), output=tuple(r.token_ids))
             for e, rollouts in enumerate(records_by_epoch) for r in rollouts if r.token_ids]
    num_seqs = max(len(r) for r in records_by_epoch)
    rc = ReplicaConfig(page_size=16, num_pages=num_seqs * 32 + 64, max_num_seqs=num_seqs,
                       max_num_batched_tokens=max(FLAGS.max_num_batched_tokens, num_seqs))

    def speculation(method):
        if method == "none":
            return None
        if method == "suffix":
            return lambda: (SuffixDrafter(), FLAGS.max_spec_tokens, None)

        def make():
            drafter = RolloutDrafter(DasConfig(window=FLAGS.das_window))
            return drafter, FLAGS.max_spec_tokens, LengthAwareBudget(drafter) if method == "das" else None
        return make

    out = {}
    for method in methods:
        router = make_router("round-robin", 1, analytic_7b_h100(), rc.capacity_tokens)
        sim = Simulator(router, 1, analytic_7b_h100(), rc, speculation=speculation(method))
        res = sim.run(items)
        ends = collections.defaultdict(float)
        for rec in res.records:
            e = int(rec.arrival_s // gap)
            ends[e] = max(ends[e], rec.finish_s - e * gap)
        out[method] = ([ends[e] for e in range(len(records_by_epoch))], sim.replicas[0].sched.spec)
    return out


def _model():
    """(model, tokenizer) for --model; a fresh copy at every call (an engine and a trainer each)."""
    if FLAGS.model == "test":
        from jinfer import TEST_MODEL_DIR
        from jinfer.loader.hf import load_hf_model
        from jinfer.tokenizer import Tokenizer
        return load_hf_model(TEST_MODEL_DIR), Tokenizer.from_dir(TEST_MODEL_DIR)
    from jinfer.launch import ModelSpec, load_model
    from jinfer.model_store import DEFAULT_MODEL
    return load_model(ModelSpec(path=DEFAULT_MODEL, dtype="float32"))


def _problems() -> list:
    from harness import rl, rl_tasks
    out = []
    for task in FLAGS.tasks:
        if task == "code":
            out += rl.PROBLEMS[:FLAGS.problems] if FLAGS.problems else rl.PROBLEMS
        elif task == "math":
            out += rl_tasks.math_tasks(FLAGS.math_problems, seed=FLAGS.seed)
        else:
            raise app.UsageError(f"unknown task {task!r}; known: code, math")
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.smoke:
        FLAGS.problems, FLAGS.math_problems, FLAGS.epochs, FLAGS.group_size, FLAGS.max_tokens = 3, 3, 2, 2, 24
    import jax
    import numpy as np

    from harness import rl

    methods = list(FLAGS.methods)
    if "math" in FLAGS.tasks and FLAGS.model == "test":
        raise app.UsageError("--tasks=math asks through a chat template: the test model has none (--model=smollm2)")
    if methods[0] != "none":
        raise app.UsageError("the first method must be none (the baseline)")
    problems = _problems()
    num_seqs = len(problems) * FLAGS.group_size
    runs = {}
    for method in methods:
        model, tok = _model()
        engine, budget = _engine(model, tok, method, num_seqs)
        runs[method] = dict(engine=engine, budget=budget, epochs=[])
        print(f"{method}: engine ready", file=sys.stderr, flush=True)
    # One trainer: speculation is lossless, so every method's rollouts are the baseline's (checked
    # below) and every engine gets the same weights each epoch.
    trainer = rl.PolicyTrainer(_model()[0], learning_rate=FLAGS.learning_rate, temperature=FLAGS.temperature,
                               train_layers=FLAGS.train_layers or None)

    recorded = []  # the baseline's rollouts per epoch
    identical = True
    for epoch in range(FLAGS.epochs):
        reference = None
        shift = epoch % len(methods)  # rotated each epoch: no method always runs first (a cold cache)
        for method in methods[shift:] + methods[:shift]:
            run = runs[method]
            engine = run["engine"]
            before = _spec_counts(engine)
            counts = getattr(run["budget"], "class_counts", None)  # DAS's length classes, per epoch
            classes = None if counts is None else collections.Counter(counts)
            rollouts, seconds = rl.collect_rollouts(engine, engine.tokenizer, problems, group_size=FLAGS.group_size,
                                                    epoch=epoch, max_tokens=FLAGS.max_tokens,
                                                    temperature=FLAGS.temperature, seed=FLAGS.seed)
            after = _spec_counts(engine)
            tokens = sum(len(r.token_ids) for r in rollouts)
            drafted, accepted, verifications, host = (a - b for a, b in zip(after, before))
            run["epochs"].append(dict(makespan=seconds, tokens=tokens, drafted=drafted, accepted=accepted,
                                      verifications=verifications, host=host,
                                      reward=float(np.mean([r.reward for r in rollouts])),
                                      classes=None if classes is None else run["budget"].class_counts - classes))
            key = ([r.token_ids for r in rollouts], [r.reward for r in rollouts])
            if method == "none":
                recorded.append(rollouts)
            if reference is None:
                reference, first = key, method
            elif key != reference:
                identical = False
                print(f"epoch {epoch}: {method} differs from {first}", file=sys.stderr, flush=True)
            print(f"epoch {epoch} {method}: makespan {seconds:.2f} s, {tokens / seconds:,.0f} tok/s, "
                  f"reward {run['epochs'][-1]['reward']:.3f}, accepted {accepted}/{drafted}",
                  file=sys.stderr, flush=True)
        start = time.perf_counter()
        loss = trainer.step(recorded[-1])  # on the baseline's rollouts (every method's, when identical)
        for run in runs.values():
            run["engine"].update_weights(trainer.state())
        runs["none"]["epochs"][-1]["loss"] = loss
        print(f"epoch {epoch}: loss {loss:.4f}, trained in {time.perf_counter() - start:.1f} s",
              file=sys.stderr, flush=True)

    lines = []
    classed = [m for m in methods if runs[m]["epochs"][0]["classes"] is not None]
    head = (["epoch"] + [f"{m} s" for m in methods] + [f"{m} / none" for m in methods[1:]]
            + [f"{m} acceptance" for m in methods[1:]]
            + [f"{m} length-class decisions short/medium/long" for m in classed] + ["reward", "loss"])
    lines += ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for e in range(FLAGS.epochs):
        ep = [runs[m]["epochs"][e] for m in methods]
        ms = [x["makespan"] for x in ep]
        acc = [x["accepted"] / x["drafted"] if x["drafted"] else 0.0 for x in ep[1:]]
        cls = [runs[m]["epochs"][e]["classes"] for m in classed]
        lines.append("| " + " | ".join([str(e)] + [f"{x:.2f}" for x in ms] + [f"{x / ms[0]:.2f}" for x in ms[1:]]
                                       + [f"{a:.2f}" for a in acc]
                                       + [f"{c['short']}/{c['medium']}/{c['long']}" for c in cls]
                                       + [f"{ep[0]['reward']:.3f}", f"{ep[0]['loss']:.4f}"]) + " |")
    lines += ["", "| method | makespan, all epochs s | vs none | median epoch vs none | output tok/s | "
              "acceptance | accepted per verification | draft tokens per output token | drafter ms per rollout |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    total_none = sum(e["makespan"] for e in runs["none"]["epochs"])
    for m in methods:
        ep = runs[m]["epochs"]
        total = sum(e["makespan"] for e in ep)
        tokens = sum(e["tokens"] for e in ep)
        drafted, accepted = sum(e["drafted"] for e in ep), sum(e["accepted"] for e in ep)
        ver, host = sum(e["verifications"] for e in ep), sum(e["host"] for e in ep)
        per_epoch = statistics.median(e["makespan"] / b["makespan"] for e, b in zip(ep, runs["none"]["epochs"]))
        lines.append(f"| {m} | {total:.1f} | {total / total_none:.2f} | {per_epoch:.2f} | {tokens / total:,.0f} | "
                     f"{accepted / drafted if drafted else 0:.2f} | {accepted / ver if ver else 0:.2f} | "
                     f"{drafted / tokens:.2f} | {1e3 * host / (num_seqs * FLAGS.epochs):.2f} |")
    lines += ["", f"Rollouts and rewards identical across methods in every epoch: "
                  f"**{'yes' if identical else 'NO'}**."]
    lengths = [len(r.token_ids) for rollouts in recorded for r in rollouts]
    lines += ["", f"Rollout lengths (all epochs, {len(lengths)} rollouts; median {statistics.median(lengths):.0f}, "
                  f"p90 {np.percentile(lengths, 90):.0f}, max {max(lengths)}):", "", *_histogram(lengths)]
    das = runs.get("das")
    if das is not None and das["budget"].cost_model() is not None:
        c_base, c_tok = das["budget"].cost_model()
        counts = das["budget"].class_counts
        lines += ["", f"DAS's step-cost model on this machine: c_base = {c_base * 1e3:.2f} ms, c_tok = "
                      f"{c_tok * 1e3:.3f} ms per token (a step of {num_seqs} decodes: "
                      f"{(c_base + c_tok * num_seqs) * 1e3:.1f} ms; one more token costs "
                      f"{100 * c_tok / (c_base + c_tok):.0f}% of a one-token step). Length-class decisions: "
                      + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + "."]
    if FLAGS.simulate:
        sim = _simulate(recorded, methods)
        out_tokens = sum(len(r.token_ids) for rollouts in recorded for r in rollouts)
        lines += ["", "The same recorded rollouts in the simulator, 7B-class model on one H100 (analytic cost "
                      "model, scheduler/cost_model.py:analytic_7b_h100), makespan per epoch in simulated s; "
                      "a draft token is accepted where it equals the recorded rollout's token:", "",
                  "| method | total s | vs none | median epoch vs none | acceptance | accepted per verification "
                  "| draft tokens per output token |", "|---|---:|---:|---:|---:|---:|---:|"]
        for m in methods:
            (ends, spec), (base, _) = sim[m], sim["none"]
            ratio = statistics.median(a / b for a, b in zip(ends, base) if b > 0)
            lines.append(f"| {m} | {sum(ends):.2f} | {sum(ends) / sum(base):.2f} | {ratio:.2f} | "
                         f"{spec.acceptance_rate:.2f} | {spec.mean_accepted:.2f} | "
                         f"{spec.draft_tokens / max(out_tokens, 1):.2f} |")
    model_name = "the embedded test model" if FLAGS.model == "test" else "SmolLM2-135M-Instruct (f32)"
    trained = f"last {FLAGS.train_layers} layers + final norm trained" if FLAGS.train_layers else "all weights trained"
    lines += ["", f"Device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform}), {os.cpu_count()} CPU "
                  f"cores; jax {jax.__version__}. {model_name}, {trained}; tasks {','.join(FLAGS.tasks)}: "
                  f"{len(problems)} problems x {FLAGS.group_size} samples, "
                  f"{FLAGS.epochs} epochs, max {FLAGS.max_tokens} tokens, temperature {FLAGS.temperature}, "
                  f"learning rate {FLAGS.learning_rate}, "
                  f"max_spec_tokens {FLAGS.max_spec_tokens}, DAS window {FLAGS.das_window}, "
                  f"async scheduling {'on' if FLAGS.async_scheduling else 'off'}, "
                  f"{time.strftime('%Y-%m-%d')}."]
    report = "\n".join(lines)
    print(report)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write("# DAS: speculation for RL rollouts\n\n```sh\npython "
                    + " ".join(["tools/bench_rollouts.py", *sys.argv[1:]]) + "\n```\n\n" + report + "\n")
    if not identical:
        sys.exit("speculation changed the rollouts: see the report")


if __name__ == "__main__":
    app.run(main)
