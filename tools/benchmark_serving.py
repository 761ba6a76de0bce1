"""Replays a workload against a running jinfer server (gRPC, or its OpenAI-compatible HTTP API)
and reports what it measured.

  python tools/benchmark_serving.py --target=127.0.0.1:50051 --workload=shared_prefix \
      --num_requests=200 --rate=8 --tiers=interactive:0.7,batch:0.3 \
      --slo=interactive:500:50 --slo=batch:5000:200 --result_file=run.json --plot=run.png
  python tools/benchmark_serving.py --workload=trace --trace=requests.jsonl --rate=0   # trace times
  python tools/benchmark_serving.py --target=http://127.0.0.1:8000 --workload=random  # the HTTP API
  python tools/benchmark_serving.py --workload=demo --save_trace=demo.jsonl --dry_run   # write, don't send

Workloads (scheduler/simulation/workloads.py): random (independent prompts), shared_prefix (groups of a shared
prefix, Zipf popularity), multi_turn (sessions; each turn resends the conversation so far),
demo (the short mix `make demo` runs), trace (a JSONL file; format in scheduler/simulation/workloads.py).
Synthetic prompts are random token ids from the server's vocabulary, so lengths are exact.

Reports throughput, TTFT / TPOT / latency mean and p50/p90/p99 overall and per tier, and per
tier with an --slo (or, without one, the targets the server gives the tier) the SLO attainment
and goodput (requests meeting both targets per second). Against a gRPC server it also prints
the server's own count over the run (GetServerStats): finished, met and missed per tier. Over
HTTP it first times --small_requests 1-token completions on one kept-alive connection (the
`small_request` row): a few ms on a healthy server, +40 ms when responses wait behind Nagle.
"""

from __future__ import annotations

import json
import math
import os
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FLAGS = flags.FLAGS
flags.DEFINE_string("target", "127.0.0.1:50051", "host:port of the server (gRPC), or http(s)://host:port of its "
                    "OpenAI-compatible HTTP API (serving.http_port): streamed completions, timed the same way.")
flags.DEFINE_string("token", "", "Bearer token, if the server requires one.")
flags.DEFINE_string("root_cert", "", "PEM root certificate: connect with TLS.")
flags.DEFINE_enum("workload", "shared_prefix", ["random", "shared_prefix", "multi_turn", "demo", "trace"],
                  "Which workload to replay.")
flags.DEFINE_string("trace", "", "JSONL trace file (--workload=trace).")
flags.DEFINE_integer("num_requests", 100, "Requests (random, shared_prefix) or sessions (multi_turn).",
                     lower_bound=1)
flags.DEFINE_integer("input_len", 128, "Mean prompt tokens (random); suffix tokens (shared_prefix); user "
                     "message tokens per turn (multi_turn).", lower_bound=1)
flags.DEFINE_integer("output_len", 32, "Mean output tokens per request.", lower_bound=1)
flags.DEFINE_float("spread", 0.5, "Lengths are uniform within ±spread × the mean.", lower_bound=0, upper_bound=0.99)
flags.DEFINE_integer("num_groups", 8, "shared_prefix: number of distinct shared prefixes.", lower_bound=1)
flags.DEFINE_integer("prefix_len", 256, "shared_prefix: tokens of each shared prefix.", lower_bound=1)
flags.DEFINE_float("zipf_a", 1.0, "shared_prefix: group popularity ~ 1/rank^a (0 = even).", lower_bound=0)
flags.DEFINE_integer("turns", 4, "multi_turn: turns per session.", lower_bound=1)
flags.DEFINE_integer("system_len", 64, "multi_turn: tokens of each session's system prompt.", lower_bound=0)
flags.DEFINE_string("tiers", "", "Tier mix of synthetic requests, e.g. interactive:0.7,batch:0.3; empty: "
                    "every request in the server's first tier.")
flags.DEFINE_float("rate", 4.0, "Poisson arrival rate in requests/s; inf: all at once. With a trace: 0 keeps "
                   "its times, > 0 rescales them to this average rate.", lower_bound=0)
flags.DEFINE_multi_string("slo", [], "tier:ttft_ms:tpot_ms (repeat per tier): report SLO attainment and "
                          "goodput for that tier. A tier of the workload without one is judged by the targets "
                          "the server gives it (GetServerInfo; serving.tiers), if any.")
flags.DEFINE_bool("ignore_eos", True, "Generate exactly max_tokens (synthetic prompts would stop at random "
                  "EOS otherwise).")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature of every request (0: greedy).", lower_bound=0)
flags.DEFINE_integer("max_concurrency", 0, "Cap on requests in flight from this client; 0: none.", lower_bound=0)
flags.DEFINE_float("timeout_s", 600.0, "Deadline of each request.", lower_bound=0)
flags.DEFINE_integer("small_requests", 20, "Over HTTP: 1-token completions timed one after another on one "
                     "kept-alive connection before the run (0: none).", lower_bound=0)
flags.DEFINE_integer("seed", 0, "Seed of the workload (lengths, ids, groups, tiers, arrivals).")
flags.DEFINE_string("result_file", "", "Write settings, server info, summary and every request as JSON.")
flags.DEFINE_string("plot", "", "Write latency CDFs per tier to this image (needs matplotlib: "
                    "pip install 'jinfer[plot]').")
flags.DEFINE_string("save_trace", "", "Write the workload as a JSONL trace.")
flags.DEFINE_bool("dry_run", False, "Build (and --save_trace) the workload, send nothing.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")


def _tier_mix(spec: str) -> dict[str, float] | None:
    if not spec:
        return None
    mix = {}
    for part in spec.split(","):
        name, _, weight = part.partition(":")
        try:
            mix[name] = float(weight) if weight else 1.0
        except ValueError:
            raise app.UsageError(f"--tiers: weight {weight!r} of {name!r} is not a number") from None
        if not name:
            raise app.UsageError(f"--tiers={spec!r}: empty tier name")
    return mix


def build_workload(vocab_size: int):
    from scheduler.simulation import workloads as w

    vocab = (min(8, vocab_size - 1), vocab_size)  # skip the lowest ids (BOS/EOS and friends)
    tiers, n, seed = _tier_mix(FLAGS.tiers), FLAGS.num_requests, FLAGS.seed
    if FLAGS.workload == "demo":
        return w.demo(vocab, seed)
    if FLAGS.workload == "trace":
        if not FLAGS.trace:
            raise app.UsageError("--workload=trace needs --trace=FILE.jsonl")
        items = w.load_trace(FLAGS.trace)
        return w.scale_arrivals(items, FLAGS.rate) if FLAGS.rate > 0 else items
    if FLAGS.workload == "random":
        items = w.random_lengths(n, input_len=FLAGS.input_len, output_len=FLAGS.output_len, spread=FLAGS.spread,
                                 vocab=vocab, tiers=tiers, seed=seed)
    elif FLAGS.workload == "shared_prefix":
        items = w.shared_prefix(n, num_groups=FLAGS.num_groups, prefix_len=FLAGS.prefix_len,
                                suffix_len=FLAGS.input_len, output_len=FLAGS.output_len, zipf_a=FLAGS.zipf_a,
                                spread=FLAGS.spread, vocab=vocab, tiers=tiers, seed=seed)
    else:
        items = w.multi_turn(n, turns=FLAGS.turns, system_len=FLAGS.system_len, user_len=FLAGS.input_len,
                             output_len=FLAGS.output_len, spread=FLAGS.spread, vocab=vocab, tiers=tiers, seed=seed)
    if FLAGS.rate == 0:
        raise app.UsageError("--rate=0 keeps a trace's times; synthetic workloads need a rate > 0 (or inf)")
    return w.poisson_arrivals(items, FLAGS.rate, seed)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from harness import benchmark as bm

    try:
        slos = bm.parse_slos(FLAGS.slo)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    if FLAGS.plot:
        try:
            import matplotlib  # noqa: F401 - checked before the run, not after it
        except ImportError:
            raise app.UsageError("--plot needs matplotlib: pip install 'jinfer[plot]'") from None
    vocab_size, info = 4096, None
    if not FLAGS.dry_run:
        try:
            info = bm.server_info(FLAGS.target, token=FLAGS.token or None, root_cert=FLAGS.root_cert or None)
        except bm.RequestFailed as e:
            sys.exit(f"error: cannot reach {FLAGS.target}: {e}")
        vocab_size = info["vocab_size"]
        unknown = sorted((set(slos) | set(_tier_mix(FLAGS.tiers) or ())) - set(info["tiers"]))
        if unknown:
            raise app.UsageError(f"tiers {unknown} are not served by {FLAGS.target}; it has {info['tiers']}")
    try:
        items = build_workload(vocab_size)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    if FLAGS.save_trace:
        from scheduler.simulation.workloads import save_trace
        save_trace(items, FLAGS.save_trace)
        print(f"wrote {len(items)} requests to {FLAGS.save_trace}", file=sys.stderr)
    if FLAGS.dry_run:
        return
    first = info["tiers"][0] if info["tiers"] else ""
    used = {it.tier or first for it in items}
    slos = {**{t: slo for t, slo in bm.server_tiers(info).items() if t in used}, **slos}
    run = bm.replay(FLAGS.target, items, token=FLAGS.token or None, root_cert=FLAGS.root_cert or None,
                    ignore_eos=FLAGS.ignore_eos, temperature=FLAGS.temperature,
                    max_concurrency=FLAGS.max_concurrency, progress=FLAGS.progress,
                    timeout_s=FLAGS.timeout_s or None, small_requests=FLAGS.small_requests)
    summary = bm.summarize(run, slos)
    print(bm.format_report(summary))
    if FLAGS.result_file:
        settings = {name: FLAGS[name].value for name in ("workload", "trace", "num_requests", "input_len",
                    "output_len", "spread", "num_groups", "prefix_len", "zipf_a", "turns", "system_len", "tiers",
                    "rate", "slo", "ignore_eos", "temperature", "max_concurrency", "seed", "small_requests")}
        settings["rate"] = None if math.isinf(settings["rate"]) else settings["rate"]
        with open(FLAGS.result_file, "w") as f:
            json.dump(bm.result_json(run, summary, settings), f, indent=1)
    if FLAGS.plot:
        bm.save_plot(run, FLAGS.plot)


if __name__ == "__main__":
    app.run(main)
