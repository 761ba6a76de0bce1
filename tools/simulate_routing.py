"""Routing policies compared in the discrete-event simulator (scheduler/simulation/simulator.py).

  python tools/simulate_routing.py --out=benchmarks/routing.md
  python tools/simulate_routing.py --workloads=toolbench --replicas=8 --num_requests=4000 --rate_factors=0.5,1

For each workload (scheduler/routing/preble_workloads.py) and request rate, every router serves the
same requests on N simulated replicas whose step times come from a cost model (default: the
analytic 7B-class H100 model; --cost_model=FILE.json for one fitted by tools/profile_engine.py).
Rates are multiples (--rate_factors) of a per-workload base rate: N replicas' throughput if every
request's shared prefix were already cached and decodes ran in batches of 64. Reports average
and p99 latency per router and their ratios to Preble E2, then an ablation of E2's parts.
"""

from __future__ import annotations

import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("workloads", ["toolbench", "embodied", "programming", "videoqa", "loogle"],
                  "Workloads from scheduler/routing/preble_workloads.py.")
flags.DEFINE_integer("replicas", 4, "Simulated replicas.", lower_bound=1)
flags.DEFINE_integer("num_requests", 2000, "Requests per run.", lower_bound=1)
flags.DEFINE_list("rate_factors", ["0.5", "0.75", "1.0"], "Request rates as multiples of the base rate.")
flags.DEFINE_float("zipf_a", 0.0, "Key-portion popularity: 0 even, else Zipf(a).", lower_bound=0)
flags.DEFINE_float("scale", 1.0, "Divide every length by this (scaled-down workloads).", lower_bound=1)
flags.DEFINE_string("cost_model", "", "Cost model JSON (tools/profile_engine.py); empty: analytic 7B H100.")
flags.DEFINE_integer("num_pages", 25_000, "KV pages per replica (x page_size tokens).", lower_bound=1)
flags.DEFINE_integer("page_size", 16, "Tokens per KV page.", lower_bound=1)
flags.DEFINE_bool("ablation", True, "Also run E2's ablation at the highest rate factor.")
flags.DEFINE_integer("seed", 0, "Workload seed.")
flags.DEFINE_string("out", "", "Write the tables (markdown) here too.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from scheduler.routing import preble_workloads as pw
    from scheduler.cost_model import CostModel
    from harness.experiments.routing import RoutingRuns, RoutingSetup
    from scheduler.routing.policies import ROUTERS as routers

    unknown = sorted(set(FLAGS.workloads) - set(pw.SPECS))
    if unknown:
        raise app.UsageError(f"unknown workloads {unknown}; known: {sorted(pw.SPECS)}")
    try:
        factors = [float(f) for f in FLAGS.rate_factors]
    except ValueError:
        raise app.UsageError(f"--rate_factors={FLAGS.rate_factors} must be numbers") from None
    setup = RoutingSetup(replicas=FLAGS.replicas, num_requests=FLAGS.num_requests, zipf_a=FLAGS.zipf_a,
                         scale=FLAGS.scale, num_pages=FLAGS.num_pages, page_size=FLAGS.page_size, seed=FLAGS.seed)
    runs = RoutingRuns(setup, CostModel.load(FLAGS.cost_model) if FLAGS.cost_model else None)
    cfg, cost, n = setup.replica, runs.cost, setup.replicas

    lines = [f"Simulator: {n} replicas x {cfg.num_pages} pages of {cfg.page_size} tokens, cost model "
             f"`{cost.name}`, {FLAGS.num_requests} requests per run, key portions "
             f"{'even' if FLAGS.zipf_a == 0 else f'Zipf({FLAGS.zipf_a})'}, lengths / {FLAGS.scale:g}, seed {FLAGS.seed}. "
             "Latency = arrival to last token (s). Ratios > 1: E2 is better.", "",
             "| workload | rate req/s | RR avg | LL avg | SGLang avg | E2 avg | RR/E2 avg | LL/E2 avg | SGLang/E2 avg | "
             "RR p99 | E2 p99 | RR/E2 p99 | LL/E2 p99 | SGLang/E2 p99 | E2 hit rate | RR hit rate |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ablation = ["", f"Ablation at rate factor {max(factors):g} (average / p99 latency, s):", "",
                "| workload | E2 alone | + rebalance & replication | + P/D balance | + priority groups |",
                "|---|---:|---:|---:|---:|"]
    for name in FLAGS.workloads:
        for f in factors:
            run = runs.compare(name, f, routers)
            st = {r: run.stats(r) for r in routers}
            lat = {r: st[r]["latency"] for r in routers}
            e2 = lat["preble-e2"]
            lines.append(
                f"| {name} | {run.rate:.1f} | {lat['round-robin']['avg']:.2f} | {lat['least-load']['avg']:.2f} | "
                f"{lat['sglang']['avg']:.2f} | {e2['avg']:.2f} | {lat['round-robin']['avg'] / e2['avg']:.2f} | "
                f"{lat['least-load']['avg'] / e2['avg']:.2f} | {lat['sglang']['avg'] / e2['avg']:.2f} | "
                f"{lat['round-robin']['p99']:.2f} | {e2['p99']:.2f} | {lat['round-robin']['p99'] / e2['p99']:.2f} | "
                f"{lat['least-load']['p99'] / e2['p99']:.2f} | {lat['sglang']['p99'] / e2['p99']:.2f} | "
                f"{st['preble-e2']['cache_hit_rate']:.2f} | {st['round-robin']['cache_hit_rate']:.2f} |")
            print(lines[-1], file=sys.stderr)
        if FLAGS.ablation:
            cells = [f"{s['latency']['avg']:.2f} / {s['latency']['p99']:.2f}"
                     for s in runs.ablation(name, max(factors))]
            ablation.append(f"| {name} | " + " | ".join(cells) + " |")
            print(ablation[-1], file=sys.stderr)
    total_requests, total_wall = runs.requests, runs.wall_s
    speed = f"\nSimulated {total_requests} requests in {total_wall:.1f} s of wall time ({total_requests / total_wall:.0f} requests/s, one core)."
    report = "\n".join(lines + (ablation if FLAGS.ablation else []) + [speed])
    print(report)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write("# Prefix-aware routing (Preble E2) vs baselines, simulated\n\nCommand: `python tools/simulate_routing.py "
                    + " ".join(a for a in sys.argv[1:]) + "`\n\n" + report + "\n")


if __name__ == "__main__":
    app.run(main)
