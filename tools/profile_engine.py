"""Measures engine step times and fits the router's cost model (scheduler/cost_model.py).

  python tools/profile_engine.py --out=benchmarks/cost_model_default_cpu.json
  python tools/profile_engine.py --config=configs/llama3_8b.py --out=cost_8b_h100.json   # on a GPU

Runs the model runner of the config's engine on a grid of steps (prefill chunks of several
lengths after several cached lengths; decode batches of several sizes and contexts), takes the
median of --repeats timed runs each (after a compile + warm-up run), fits
t = fixed + per_token·Σq + per_attn·Σq(c+(q+1)/2) + per_kv·Σ(c+q) + per_seq·n by non-negative
least squares and prints each measurement beside the fit. The JSON loads with
CostModel.load and drives tools/simulate_routing.py --cost_model and the router's estimates.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jinfer.launch import define_config_flag, parse_flags  # noqa: E402 - after the path

FLAGS = flags.FLAGS
CONFIG = define_config_flag(os.path.join(ROOT, "configs", "test_5m.py"))
flags.DEFINE_list("prefill", ["16", "64", "128", "256"], "Prefill chunk lengths (tokens).")
flags.DEFINE_list("cached", ["0", "128"], "Cached tokens before a prefill chunk.")
flags.DEFINE_list("batch", ["1", "4", "16", "32"], "Decode batch sizes.")
flags.DEFINE_list("context", ["32", "256"], "Decode context lengths.")
flags.DEFINE_list("drafts", [], "Draft lengths k (e.g. 1,4,8): every decode batch is measured again with a chain "
                  "draft of k tokens per sequence to verify (k + 1 tokens and sampled rows each), and a table "
                  "puts each drafted step beside the plain one (the speculation's cost per draft token). The "
                  "engine is then built as a speculating one (more sampled rows, a draft-tree mask on steps "
                  "that are not plain decodes), so its plain steps are a speculating engine's.")
flags.DEFINE_integer("repeats", 5, "Timed runs per step shape (median kept).", lower_bound=1)
flags.DEFINE_string("name", "", "Cost model name; empty: <model>-<device kind>.")
flags.DEFINE_string("out", "", "Write the fitted cost model as JSON here.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import dataclasses

    import jax
    from tqdm import tqdm

    from entrypoints.build import build_engine
    from jinfer.launch import resolve
    from jinfer.sampling_params import SamplingParams
    from jinfer.step_plan import ScheduledSeq, StepPlan
    from scheduler.cost_model import CostModel

    try:
        launch = resolve(CONFIG.value)
        launch = dataclasses.replace(launch, engine=dataclasses.replace(launch.engine, warmup=False))
        ints = lambda xs: [int(x) for x in xs]  # noqa: E731
        prefill, cached, batch, context = ints(FLAGS.prefill), ints(FLAGS.cached), ints(FLAGS.batch), ints(FLAGS.context)
        drafts = ints(FLAGS.drafts)
    except ValueError as e:
        sys.exit(f"error: {e} (--prefill, --cached, --batch, --context and --drafts take integers)")
    if drafts:  # a drafted step's k + 1 rows per sequence are sampled only where speculation is set up
        spec = launch.speculation
        launch = dataclasses.replace(launch, speculation=dataclasses.replace(
            spec, method=spec.method or "ngram", max_spec_tokens=max(drafts)))
    sched = launch.scheduler
    too_long = [x for x in prefill if x > sched.max_num_batched_tokens] + \
        [b for b in batch if b > sched.max_num_seqs] + \
        [f"{b} x (1 + {k})" for b in batch for k in drafts if b * (1 + k) > sched.max_num_batched_tokens]
    if too_long:
        sys.exit(f"error: {too_long} exceed the config's step budget (max_num_batched_tokens="
                 f"{sched.max_num_batched_tokens}, max_num_seqs={sched.max_num_seqs})")
    engine = build_engine(launch)
    runner = engine.runner
    page = runner.page_size
    greedy = SamplingParams(temperature=0)

    def seq(i, q, c, first_page, draft):
        pages = tuple(range(first_page, first_page + -(-(c + q) // page)))
        return ScheduledSeq(f"s{i}", tuple(range(1, q + 1)), c, pages, True, greedy, 0, 0, 0,
                            num_draft=draft), len(pages)

    # (the step's (tokens, cached) per sequence, draft length: None for a prefill chunk)
    shapes = [([(q, c)], None) for q in prefill for c in cached] + [
        ([(1 + k, c)] * b, k) for k in [0, *drafts] for b in batch for c in context]
    samples, drafted = [], {}
    for shape, k in tqdm(shapes, desc="profiling steps", unit="shape"):
        seqs, next_page = [], 0
        for i, (q, c) in enumerate(shape):
            s, used = seq(i, q, c, next_page, k or 0)
            seqs.append(s)
            next_page += used
        if next_page > runner.num_pages or max(c + q for q, c in shape) > sched.max_model_len:
            sys.exit(f"error: step {shape[:1]} x{len(shape)} needs {next_page} pages / more context than the "
                     f"config has ({runner.num_pages} pages, max_model_len={sched.max_model_len})")
        plan = StepPlan(tuple(seqs))
        runner.execute(plan)  # compile and warm
        times = []
        for _ in range(FLAGS.repeats):
            t0 = time.perf_counter()
            runner.execute(plan)
            times.append(time.perf_counter() - t0)
        tqdm.write(f"{len(shape)} x (tokens, cached) {shape[0]}, draft {k}: {1e3 * statistics.median(times):.2f} ms",
                   file=sys.stderr)
        if k is not None:  # a decode batch, plain or drafted
            drafted[len(shape), shape[0][1], k] = statistics.median(times)
        if not k:  # the cost model's samples: plain steps (a drafted step also samples k rows more)
            samples.append((shape, statistics.median(times)))
    device = jax.devices()[0].device_kind
    name = FLAGS.name or f"{launch.model.display_name}-{device}".replace(" ", "_")
    model = CostModel.fit(samples, name, notes=f"fitted by tools/profile_engine.py on {device}, "
                                               f"attention {engine.attention_backend}, {len(samples)} step shapes")
    print("| step | measured ms | fitted ms |\n|---|---:|---:|")
    for shape, t in samples:
        q, c = shape[0]
        label = f"prefill {q} after {c}" if q > 1 else f"decode x{len(shape)} at {c}"
        print(f"| {label} | {1e3 * t:.2f} | {1e3 * model.step_time(shape):.2f} |")
    print(f"\nmedian relative error {100 * model.relative_error(samples):.1f} %")
    if drafts:
        print(_draft_table(drafted, drafts, model))
    print(model.to_json())
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write(model.to_json() + "\n")


def _draft_table(drafted: dict, drafts: list[int], model) -> str:
    """Each decode batch's drafted steps beside its plain one: ms, the ratio, and what a draft
    token costs against the plain step's cost per sequence; the fitted model's estimate of the
    drafted step (it is fitted on plain steps) beside each."""
    lines = ["", "| batch | context | draft k | plain ms | drafted ms | drafted / plain | "
             "per draft token / per sequence | fitted drafted ms |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (b, c, k), t in sorted(drafted.items()):
        if not k:
            continue
        plain = drafted[b, c, 0]
        per_token = (t - plain) / (b * k) / (plain / b)
        lines.append(f"| {b} | {c} | {k} | {1e3 * plain:.2f} | {1e3 * t:.2f} | {t / plain:.2f} | {per_token:.3f} | "
                     f"{1e3 * model.step_time([(1 + k, c)] * b):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
