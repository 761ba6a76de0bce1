"""Speculative decoding, side by side: off vs n-gram vs suffix (chain, tree; adaptive budget) vs
suffix with a fixed budget.

  python tools/bench_spec.py --out=benchmarks/spec.md
  python tools/bench_spec.py --smoke                      # tiny sizes, a check that it runs

For each model (the embedded test model, trained on Python's standard library; and a
larger random-weight Llama where a step's cost is dominated by the weights), each workload,
each batch size and each method, the same requests run through an Engine that keeps `batch`
of them in flight (a new one joins as one finishes). Each method first runs the workload once
untimed (every step shape it meets compiles then); then methods alternate within each of
--repeats rounds (a busy spell of a noisy machine hits all alike); medians are reported.

Workloads:
- rollouts: P problems, each generated R times (as RL rollouts are: epochs over the same
  prompts), sampled at temperature 0.7 with a different seed per rollout. Earlier rollouts'
  outputs are what a suffix tree can draft from.
- repeat: agent-like: each prompt is sent again with a changed instruction (the output
  repeats earlier ones, greedy).
- code_edit: the prompt holds a function's source and asks for it again; the output mostly
  copies the input (greedy).
- fresh: distinct prompts once each, greedy: little to draft from (the control).
For the random-weight model prompts are random token ids (its outputs are whatever random
weights make, so only exact repeats help: rollouts are greedy there).

The `never` method is an engine with the n-gram drafter whose budget never drafts: `off`'s
tokens, with the standing costs of speculation (the drafter hears every token; the runner's
plain programs carry the drafts-in-flight fix-up), so its ratio to `off` is those costs plus
this machine's run-to-run spread at that cell.

Reported per row: output tokens/s, its ratio to `off` in the same round (median of the
ratios), mean accepted draft tokens per verification, acceptance rate (accepted / drafted),
mean latency per request, drafter host time per output token.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import math
import os
import random
import statistics
import sys
import sysconfig
import tempfile
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FLAGS = flags.FLAGS
METHODS = ("off", "never", "ngram", "suffix", "suffix_tree", "suffix_fixed")
flags.DEFINE_string("out", "", "Write the Markdown report here (else stdout only).")
flags.DEFINE_list("models", ["default", "random"], "default (the embedded 5.1M test model), smollm2 (the real "
                  "default model, SmolLM2-135M) and/or random (larger, random weights).")
flags.DEFINE_list("workloads", ["rollouts", "repeat", "code_edit", "fresh"], "Workloads to run.")
flags.DEFINE_list("batches", ["1", "8", "32"], "Requests in flight.")
flags.DEFINE_list("methods", ["off", "ngram", "suffix", "suffix_tree", "suffix_fixed"],
                  "Speculation methods; off is the baseline, suffix_fixed has no adaptive budget; never is an "
                  "engine with the n-gram drafter whose budget never drafts: off's tokens with speculation's "
                  "standing costs, so its ratio is those costs plus this machine's run-to-run spread. A method "
                  "with the suffix @sync (e.g. suffix@sync) runs with EngineOptions.drafts_in_flight off: "
                  "each step carrying drafts is read before the next is planned; with @closed (ngram, suffix, "
                  "suffix_tree) the engine runs the requests as a closed batch (as Engine.generate) once no "
                  "request is left to add, with --max_lead as its budget's lead limit (docs/speculation.md); "
                  "with @f<factor> (suffix, suffix_tree; e.g. suffix@f4) the suffix drafter's max_spec_factor is "
                  "<factor> instead of its default (a match of m tokens drafts at most factor * m). One "
                  "suffix per method; off must be among the methods (the ratios are to it).")
flags.DEFINE_integer("max_spec_tokens", 8, "Draft budget per request and step.", lower_bound=1)
flags.DEFINE_integer("max_lead", 4, "The lead limit of methods with the suffix @closed (BudgetConfig.max_lead).",
                     lower_bound=0)
flags.DEFINE_integer("max_tokens", 64, "Output tokens per request.", lower_bound=1)
flags.DEFINE_integer("problems", 4, "Distinct prompts per workload (at batch b: max(problems, b)).", lower_bound=1)
flags.DEFINE_integer("rollouts", 3, "Generations per problem (rollouts, repeat).", lower_bound=1)
flags.DEFINE_integer("repeats", 3, "Rounds (medians reported).", lower_bound=1)
flags.DEFINE_integer("random_hidden", 512, "Random-weight model width.")
flags.DEFINE_integer("random_layers", 8, "Random-weight model layers.")
flags.DEFINE_integer("seed", 0, "Workload seed.")
flags.DEFINE_bool("smoke", False, "Tiny sizes: one model, two workloads, batch 1 and 4, one round.")


def _snippets(n: int, seed: int, min_chars: int = 300, max_chars: int = 600) -> list[str]:
    """Function-sized pieces of stdlib source (text every machine with Python has)."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    rng = random.Random(seed)
    rng.shuffle(files)
    out = []
    for path in files:
        with open(path, errors="ignore") as f:
            text = f.read()
        start = text.find("\ndef ")
        if start < 0:
            continue
        piece = text[start + 1:start + 1 + max_chars]
        if len(piece) >= min_chars:
            out.append(piece)
        if len(out) == n:
            break
    return out


def _requests(workload: str, model: str, batch: int, tok, vocab: int):
    """[(prompt text or ids, SamplingParams)] in submission order."""
    from jinfer.sampling_params import SamplingParams

    n = max(FLAGS.problems, batch)
    rng = random.Random(FLAGS.seed)
    greedy = SamplingParams(temperature=0, max_tokens=FLAGS.max_tokens, ignore_eos=True)
    if model == "random":
        prompts = [[rng.randrange(vocab) for _ in range(rng.randint(32, 96))] for _ in range(n)]
        if workload == "fresh":
            return [(p, greedy) for p in prompts]
        return [(p, greedy) for _ in range(FLAGS.rollouts) for p in prompts]  # exact repeats
    snippets = _snippets(2 * n, FLAGS.seed + (workload == "fresh"))
    if workload == "rollouts":
        return [(s[:200], SamplingParams(temperature=0.7, seed=1000 * r + i, max_tokens=FLAGS.max_tokens,
                                         ignore_eos=True))
                for r in range(FLAGS.rollouts) for i, s in enumerate(snippets[:n])]
    if workload == "repeat":
        asks = ["# Continue:\n", "# Continue the code:\n", "# Go on:\n"]
        return [(f"{asks[r % len(asks)]}{s[:200]}", greedy) for r in range(FLAGS.rollouts) for s in snippets[:n]]
    if workload == "code_edit":
        return [(f"{s}\n\n# The same code again, with comments fixed:\n{s[:40]}", greedy) for s in snippets[:n]]
    if workload == "fresh":
        return [(s[:200], greedy) for s in snippets[n:2 * n]]
    raise ValueError(f"unknown workload {workload!r}")


def _drafter(method: str):
    """(drafter, draft budget) of a method: the launch config's defaults (adaptive budget),
    except suffix_fixed (always max_spec_tokens: what the budget saves)."""
    from scheduler.speculation.drafters import NgramDrafter, SuffixConfig, SuffixDrafter
    from scheduler.speculation.budget import BudgetConfig, CostAwareBudget

    method, _, option = method.partition("@")  # (@sync: the engine's option, not the drafter's)
    budget = CostAwareBudget(BudgetConfig(max_lead=FLAGS.max_lead if option == "closed" else None))
    factor = _factor(option)
    if method == "off":
        return None, None
    if method == "never":
        return NgramDrafter(), _Never()
    if method == "ngram":
        return NgramDrafter(), budget
    if method in ("suffix", "suffix_tree"):
        cap = {} if factor is None else {"max_spec_factor": factor}  # (without: SuffixConfig's default)
        return SuffixDrafter(SuffixConfig(tree=method == "suffix_tree", **cap)), budget
    if method == "suffix_fixed":
        return SuffixDrafter(SuffixConfig()), None
    raise ValueError(f"unknown method {method!r}")


def _factor(option: str) -> float | None:
    """The suffix drafter's max_spec_factor a method's @f<factor> names; None for no @f suffix.
    ValueError where it is not a finite number >= 0."""
    if not option.startswith("f"):
        return None
    factor = float(option[1:])
    if not (math.isfinite(factor) and factor >= 0):
        raise ValueError(f"max_spec_factor={factor} must be finite and >= 0")
    return factor


class _Never:
    """A draft budget that never drafts (jinfer.speculation.DraftBudget): the `never` method."""

    def wants_drafts(self, num_decoding, *, prefilling=False):
        return False

    def limit(self, request_id, num_decoding, max_draft_tokens):
        return 0

    def lead_limit(self):
        return None

    def observe_verify(self, request_id, accepted, rejected):
        pass

    def observe_step(self, *args, **kwargs):
        pass

    def finish(self, request_id):
        pass


def _valid_option(name: str, option: str) -> bool:
    """Whether `name` is a method and its @ suffix one it takes (--methods)."""
    if name not in METHODS:
        return False
    if option in ("", "sync"):
        return True
    if option == "closed":
        return name in ("ngram", "suffix", "suffix_tree")
    try:
        return _factor(option) is not None and name in ("suffix", "suffix_tree")
    except ValueError:
        return False


def _run(engine, requests, batch: int, closed: bool = False) -> dict:
    """Runs the requests `batch` at a time; tokens/s, latency and speculation counters. closed:
    once every request is added, the rest runs as a closed batch (as Engine.generate runs)."""
    before = engine.spec_stats()
    pending = list(requests)
    finished, tokens = [], 0
    start = time.perf_counter()
    live = 0

    def step():
        nonlocal live, tokens
        for out in engine.step():
            if out.finished:
                live -= 1
                tokens += len(out.token_ids)
                finished.append(out.finish_time - out.arrival_time)

    while pending:
        while pending and live < batch:
            prompt, params = pending.pop(0)
            engine.add_request(prompt, params)
            live += 1
        if pending:
            step()
    with engine.closed_batch() if closed else contextlib.nullcontext():
        while engine.has_unfinished():
            step()
    wall = time.perf_counter() - start
    after = engine.spec_stats()
    drafted = after.draft_tokens - before.draft_tokens
    accepted = after.accepted_tokens - before.accepted_tokens
    steps = after.spec_steps - before.spec_steps
    return {"tok_s": tokens / wall, "latency_s": statistics.mean(finished),
            "accepted_per_verify": accepted / steps if steps else 0.0,
            "acceptance": accepted / drafted if drafted else 0.0,
            "drafter_us_per_token": 1e6 * (after.drafter_seconds - before.drafter_seconds) / tokens}


def _model(name: str):
    from jinfer import TEST_MODEL_DIR
    from jinfer.loader.hf import load_hf_model
    from jinfer.tokenizer import Tokenizer

    if name == "default":
        model = load_hf_model(TEST_MODEL_DIR)
        return model, Tokenizer.from_dir(TEST_MODEL_DIR), "the embedded test model"
    if name == "smollm2":  # the real default model (from its GGUF file, f32)
        from jinfer.launch import ModelSpec, load_model
        from jinfer.model_store import DEFAULT_MODEL
        model, tok = load_model(ModelSpec(path=DEFAULT_MODEL, dtype="float32"))
        millions = model.config.num_params() / 1e6
        return model, tok, f"SmolLM2-135M-Instruct (the default model, f32, {millions:.0f}M parameters)"
    from jinfer.models.config import scaled_llama
    from jinfer.models.llama import init_model
    from jinfer.tokenizer import byte_level_tokenizer

    cfg = scaled_llama(FLAGS.random_hidden, FLAGS.random_layers, 8192)
    model = init_model(cfg, seed=FLAGS.seed)
    return model, byte_level_tokenizer(), (f"random-weight Llama, {cfg.num_params() / 1e6:.1f}M parameters "
                                           f"(hidden {FLAGS.random_hidden}, {FLAGS.random_layers} layers, vocab 8192)")


def main(argv):
    del argv
    if FLAGS.smoke:
        FLAGS.models, FLAGS.workloads, FLAGS.batches = ["default"], ["repeat", "fresh"], ["1", "4"]
        FLAGS.repeats, FLAGS.max_tokens, FLAGS.problems, FLAGS.rollouts = 1, 12, 2, 2
    if "off" not in FLAGS.methods:  # before anything is built
        raise app.UsageError(f"--methods={','.join(FLAGS.methods)}: off is missing (every ratio is to it)")
    for method in FLAGS.methods:
        if not _valid_option(*method.partition("@")[::2]):
            raise app.UsageError(f"--methods: {method!r}: the suffixes are @sync, @closed (only with ngram, suffix, "
                                 "suffix_tree: the methods with an adaptive budget) and @f<factor> (only with "
                                 "suffix, suffix_tree; a finite factor >= 0); the methods are " + ", ".join(METHODS))
    import jax

    from jinfer.config import CacheConfig, EngineOptions, SchedulerConfig
    from jinfer.engine import Engine, enable_compilation_cache
    from jinfer.programs import ProgramStore

    enable_compilation_cache(tempfile.mkdtemp(prefix="jinfer-bench-spec-"))
    batches = [int(b) for b in FLAGS.batches]
    rows, described = [], []
    for model_name in FLAGS.models:
        model, tok, desc = _model(model_name)
        described.append(desc)
        engines = {}
        # Every step bucket compiles before the first run (a bucket met first inside a timed
        # run would add its compile, ~12 s for SmolLM2 on 2 cores, to one method's time); the
        # engines share the programs. SmolLM2 takes the default config's smallest bucket.
        programs = ProgramStore()
        options = EngineOptions(async_scheduling=True, warmup=True,
                                min_token_bucket=1 if model_name == "smollm2" else 16)
        for method in FLAGS.methods:
            option = method.partition("@")[2]
            engines[method] = Engine(
                model, tok, CacheConfig(page_size=16, num_pages=1024),
                SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=max(batches), max_model_len=1024),
                options=dataclasses.replace(options, drafts_in_flight=option != "sync"), drafter=_drafter(method)[0],
                max_spec_tokens=FLAGS.max_spec_tokens, programs=programs)
        for workload in FLAGS.workloads:
            for batch in batches:
                reqs = _requests(workload, model_name, batch, tok, model.config.vocab_size)
                results = {m: [] for m in FLAGS.methods}
                for method, engine in engines.items():  # warm: compile every shape the run meets
                    engine.set_drafter(*_drafter(method))
                    _run(engine, reqs, batch, method.endswith("@closed"))
                for r in range(FLAGS.repeats):
                    order = FLAGS.methods[r % len(FLAGS.methods):] + FLAGS.methods[:r % len(FLAGS.methods)]
                    for method in order:
                        engines[method].set_drafter(*_drafter(method))  # fresh ones each round
                        results[method].append(_run(engines[method], reqs, batch, method.endswith("@closed")))
                for method in FLAGS.methods:
                    runs = results[method]
                    ratio = statistics.median(run["tok_s"] / base["tok_s"]
                                              for run, base in zip(runs, results["off"]))
                    med = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
                    rows.append((model_name, workload, batch, method, med, ratio, len(reqs)))
                    print(f"{model_name:8s} {workload:10s} b={batch:<3d} {method:12s} {med['tok_s']:9.1f} tok/s "
                          f"x{ratio:5.2f}  accepted/verify {med['accepted_per_verify']:5.2f}  "
                          f"acceptance {med['acceptance']:.2f}  latency {med['latency_s']:.2f} s", flush=True)
    table = _table(rows)
    header = (f"Command: `python tools/bench_spec.py {' '.join(sys.argv[1:])}`\n\n"
              f"Device: {jax.devices()[0].platform} ({jax.devices()[0].device_kind}), {os.cpu_count()} CPU cores; "
              f"jax {jax.__version__}. Models: {'; '.join(described)}. max_spec_tokens={FLAGS.max_spec_tokens}, "
              f"{FLAGS.max_tokens} output tokens per request, medians of {FLAGS.repeats} rounds "
              "(methods alternating within each round).\n\n")
    print(header + table)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write("# Speculative decoding: off vs n-gram vs suffix (chain, tree)\n\n" + header + table + "\n")


def _table(rows) -> str:
    lines = ["| model | workload | batch | requests | method | tok/s | vs off | accepted / verify | acceptance | "
             "latency / request (s) | drafter us / token |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for model, workload, batch, method, med, ratio, n in rows:
        lines.append(f"| {model} | {workload} | {batch} | {n} | {method} | {med['tok_s']:.1f} | {ratio:.2f}x | "
                     f"{med['accepted_per_verify']:.2f} | {med['acceptance']:.2f} | {med['latency_s']:.2f} | "
                     f"{med['drafter_us_per_token']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    app.run(main)
