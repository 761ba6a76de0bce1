"""Live routing comparison: N replica server processes, a router in front of them per policy,
scaled-down Preble workloads replayed through it; beside each measured row, the simulator's
prediction for the same requests with the replicas' fitted cost model.

  python tools/bench_live_routing.py --out=benchmarks/routing_live.md

Replicas: tools/launch_server.py with --config (default configs/test_5m.py: the test model, which
the committed results and cost models were measured on)
and --num_pages of KV each, started once, compiled at start, pinned one per CPU core when
--pin (the bench process itself, router and client, shares the cores). Before every run each
replica's prefix cache is reset, so every policy starts cold on the same requests. Rates are
multiples of the workload's base rate for N replicas under --cost_model (see
scheduler.routing.preble_workloads.base_rate). Latency = client send to last token.
"""

from __future__ import annotations

import os
import statistics
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from scheduler.routing.policies import ROUTERS  # noqa: E402 - after the path

DEFAULT_SCALE = {"toolbench": 8, "embodied": 8, "programming": 16, "videoqa": 32, "loogle": 64}
"""Length divisors that fit each workload in the test model's 512-token context."""

FLAGS = flags.FLAGS
flags.DEFINE_integer("replicas", 2, "Replica server processes.", lower_bound=1)
flags.DEFINE_string("config", os.path.join(ROOT, "configs", "test_5m.py"), "Launch config of every replica.")
flags.DEFINE_multi_string("override", [], "Extra --config.<section>.<field>=value for the replicas.")
flags.DEFINE_integer("num_pages", 256, "KV pages per replica (x page_size tokens): small enough that the "
                     "workloads' key portions do not all fit in one replica.", lower_bound=8)
flags.DEFINE_list("workloads", ["toolbench", "embodied", "programming", "videoqa", "loogle"], "Preble-like workloads.")
flags.DEFINE_list("scales", [], "workload:k length divisors overriding the defaults "
                  f"{DEFAULT_SCALE}.")
flags.DEFINE_integer("num_requests", 200, "Requests per run.", lower_bound=1)
flags.DEFINE_list("rate_factors", ["0.25", "0.5"], "Request rates as multiples of the base rate.")
flags.DEFINE_list("policies", list(ROUTERS), "Routing policies to compare (the first is the ratios' baseline "
                  "only if preble-e2 is absent).")
flags.DEFINE_string("cost_model", os.path.join(ROOT, "benchmarks", "cost_model_default_cpu.json"),
                    "Cost model of the replicas' engine (tools/profile_engine.py): E2's estimates, the base "
                    "rates and the simulator's clock.")
flags.DEFINE_bool("pin", True, "Pin replica i to CPU core i mod cores.")
flags.DEFINE_bool("simulate", True, "Also simulate each run with the cost model (predicted beside measured).")
flags.DEFINE_integer("seed", 0, "Workload seed.")
flags.DEFINE_string("out", "", "Write the tables (markdown) here too.")


def _scales() -> dict[str, float]:
    scales = dict(DEFAULT_SCALE)
    for item in FLAGS.scales:
        name, _, k = item.partition(":")
        try:
            scales[name] = float(k)
        except ValueError:
            raise app.UsageError(f"--scales entry {item!r} must be workload:number") from None
    return scales


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import json

    from harness import benchmark as bm
    from jinfer.serving.client import Client
    from entrypoints.process import ServerProcess
    from scheduler.routing import preble_workloads as pw
    from scheduler.cost_model import CostModel
    from entrypoints.routing import router_server
    from scheduler.routing.policies import make_router
    from scheduler.simulation.simulator import ReplicaConfig, Simulator

    unknown = sorted(set(FLAGS.workloads) - set(pw.SPECS)) + sorted(set(FLAGS.policies) - set(ROUTERS))
    if unknown:
        raise app.UsageError(f"unknown workloads/policies {unknown}; known: {sorted(pw.SPECS)} / {list(ROUTERS)}")
    try:
        factors = [float(f) for f in FLAGS.rate_factors]
    except ValueError:
        raise app.UsageError(f"--rate_factors={FLAGS.rate_factors} must be numbers") from None
    scales = _scales()
    cost = CostModel.load(FLAGS.cost_model)
    n = FLAGS.replicas
    cpus = sorted(os.sched_getaffinity(0))
    args = [f"--config={FLAGS.config}", "--config.serving.port=0", "--config.serving.metrics_port=0",
            f"--config.cache.num_pages={FLAGS.num_pages}", "--config.serving.max_queued_requests=4096",
            *FLAGS.override]
    print(f"starting {n} replicas (each compiles its step buckets) ...", file=sys.stderr)
    procs = [ServerProcess(args, cpus={cpus[i % len(cpus)]} if FLAGS.pin else None).start() for i in range(n)]
    rows, sim_rows = [], []
    try:
        for p in procs:
            p.wait_ready(900)
        with Client(procs[0].target) as c:
            info = c.server_info(timeout=30)
            replica_cfg = json.loads(info.config_json)
        sched = replica_cfg["scheduler"]
        sim_cfg = ReplicaConfig(page_size=info.page_size, num_pages=info.num_pages,
                                max_num_batched_tokens=sched["max_num_batched_tokens"],
                                max_num_seqs=sched["max_num_seqs"], max_model_len=sched["max_model_len"])
        for name in FLAGS.workloads:
            spec, k = pw.SPECS[name], scales[name]
            base = pw.base_rate(spec, cost, n, k, batch=sched["max_num_seqs"])
            for f in factors:
                items = pw.generate(name, FLAGS.num_requests, rate=base * f, scale=k, max_len=info.max_model_len,
                                    vocab=(10, info.vocab_size), seed=FLAGS.seed)
                measured, predicted = {}, {}
                for policy in FLAGS.policies:
                    for p in procs:
                        with Client(p.target) as c:
                            c.reset_prefix_cache()
                    router = router_server([p.target for p in procs], policy, cost).start()
                    try:
                        run = bm.replay(f"127.0.0.1:{router.port}", items, progress=False)
                        stats = router.call(router.stats)
                    finally:
                        router.stop(grace=5)
                    s = bm.summarize(run)
                    measured[policy] = {"avg": s["latency_ms"]["mean"], "p99": s["latency_ms"]["p99"],
                                        "ttft": s["ttft_ms"]["mean"], "hit": s["prefix_hit_rate"],
                                        "failed": s["failed"], "routed": [r.routed for r in stats.replicas],
                                        "dur": run.duration_s}
                    if FLAGS.simulate:
                        sim = Simulator(make_router(policy, n, cost, sim_cfg.capacity_tokens), n, cost, sim_cfg)
                        st = sim.run(items).stats()
                        predicted[policy] = {"avg": st["latency"]["avg"] * 1e3, "p99": st["latency"]["p99"] * 1e3,
                                             "hit": st["cache_hit_rate"]}
                    m = measured[policy]
                    print(f"{name} x{f:g} {policy}: avg {m['avg']:.0f} ms, p99 {m['p99']:.0f} ms, hit "
                          f"{m['hit']:.2f}, failed {m['failed']}, routed {m['routed']}, {m['dur']:.1f} s",
                          file=sys.stderr)
                rows.append((name, k, base * f, measured))
                sim_rows.append((name, base * f, predicted, measured))
    finally:
        codes = [p.stop() for p in procs]
    if any(codes):
        print(f"warning: replicas exited with {codes}", file=sys.stderr)
    report = _report(rows, sim_rows, n, info, cost, FLAGS.policies)
    print(report)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write(report + "\n")


def _report(rows, sim_rows, n, info, cost, policies) -> str:
    short = {"round-robin": "RR", "least-load": "LL", "sglang": "SGLang", "preble-e2": "E2"}
    ref = "preble-e2" if "preble-e2" in policies else policies[0]
    others = [p for p in policies if p != ref]
    head = (["workload", "k", "rate req/s"] + [f"{short[p]} avg ms" for p in policies]
            + [f"{short[p]}/{short[ref]} avg" for p in others] + [f"{short[p]} p99 ms" for p in policies]
            + [f"{short[p]}/{short[ref]} p99" for p in others] + [f"{short[p]} hit" for p in policies] + ["failed"])
    lines = [f"{n} replicas x {info.num_pages} pages of {info.page_size} tokens ({info.model}, max_model_len "
             f"{info.max_model_len}), {FLAGS.num_requests} requests per run, seed {FLAGS.seed}, cost model "
             f"`{cost.name}`. Ratios > 1: {short[ref]} is better.", "",
             "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, k, rate, m in rows:
        cells = [name, f"{k:g}", f"{rate:.1f}"] + [f"{m[p]['avg']:.0f}" for p in policies]
        cells += [f"{m[p]['avg'] / m[ref]['avg']:.2f}" for p in others]
        cells += [f"{m[p]['p99']:.0f}" for p in policies] + [f"{m[p]['p99'] / m[ref]['p99']:.2f}" for p in others]
        cells += [f"{m[p]['hit']:.2f}" for p in policies] + [str(sum(m[p]["failed"] for p in policies))]
        lines.append("| " + " | ".join(cells) + " |")
    if FLAGS.simulate:
        lines += ["", "Simulator (same requests, same cost model) vs measured, average latency ms (simulated / measured):", "",
                  "| workload | rate req/s | " + " | ".join(short[p] for p in policies) + " |",
                  "|---|---:|" + "---:|" * len(policies)]
        ratios = []
        for name, rate, pred, meas in sim_rows:
            cells = [name, f"{rate:.1f}"]
            for p in policies:
                cells.append(f"{pred[p]['avg']:.0f} / {meas[p]['avg']:.0f}")
                ratios.append(pred[p]["avg"] / meas[p]["avg"])
            lines.append("| " + " | ".join(cells) + " |")
        lines.append(f"\nMedian simulated/measured average latency: {statistics.median(ratios):.2f} "
                     f"(range {min(ratios):.2f}-{max(ratios):.2f}).")
    return "\n".join(lines)


if __name__ == "__main__":
    app.run(main)
