"""SLO tiers, side by side: first_come vs strict_priority vs slo (scheduler/slo/policies.py) on a mixed
interactive / agent / batch workload (scheduler.simulation.workloads.slo_mix), simulated at 7B-on-H100 cost
and live on this machine.

  python tools/bench_slo.py --out=benchmarks/slo.md
  python tools/bench_slo.py --parts=sim --replicas=1,4 --sim_rates=10,12,14
  python tools/bench_slo.py --smoke --parts=sim     # tiny sizes, a check that it runs

Simulated (scheduler/simulation/simulator.py): N replicas, each jinfer's Scheduler with the policy, step
times from the cost model (default: the analytic 7B-class model on one H100), the tiers
--sim_tiers. For each load (--sim_rates requests/s per replica, Poisson arrivals for
--sim_duration_s) every policy serves the same requests.

Live: one server process per policy (tools/launch_server.py's server on --config, default the
test model (configs/test_5m.py), with --live_tiers), started once and kept; for each load
(--live_rates) the same requests, the mix scaled by --live_scale to the model's 512-token
context, are replayed through each server in turn (harness.benchmark, latencies on the
client), every prefix cache reset first; --live_rounds rounds of that, the policies' order
rotated each round (the machine's noise hits them alike), and the means reported.

Reported per load and policy: each tier's SLO attainment (requests meeting both its TTFT and
TPOT targets / requests) and goodput (those requests per second from the first arrival to the
last finish), overall goodput and attainment over the judged tiers, and goodput against
first_come's. Then the load where first_come's overall attainment first drops below --floor,
and there the slo / first_come goodput ratio and the first tier's attainment under slo.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

POLICIES = ("first_come", "strict_priority", "slo")
"""engine.scheduling_policy short names (jinfer.config.POLICIES); first_come is the baseline."""

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "", "Write the Markdown report here (else stdout only).")
flags.DEFINE_list("parts", ["sim", "live"], "sim (the simulator at --cost_model cost) and/or live (servers here).")
flags.DEFINE_list("policies", list(POLICIES), "Scheduling policies to compare; first_come must be one of them "
                  "(the baseline).")
flags.DEFINE_string("mix", "interactive:0.5,agent:0.2,batch:0.3", "Request classes and their shares "
                    "(scheduler.simulation.workloads.SLO_CLASSES); each class is the tier of its requests.")
flags.DEFINE_float("floor", 0.9, "Overall attainment below which first_come counts as missing.",
                   lower_bound=0, upper_bound=1)
flags.DEFINE_bool("slo_admission", False, "slo: refuse a request whose TTFT target cannot be met given the "
                  "queue (a refused request misses its SLO).")
flags.DEFINE_integer("seed", 0, "Workload seed (classes, lengths, ids, arrivals).")
flags.DEFINE_bool("smoke", False, "Tiny sizes: two loads, seconds of arrivals each.")
# -- simulated --
flags.DEFINE_list("sim_tiers", ["interactive:250:100:4", "agent:1000:150:2", "batch:15000:250:1"],
                  "Simulated tiers, highest first: name:ttft_ms:tpot_ms:weight (jinfer.config.Tier.parse).")
flags.DEFINE_list("sim_rates", ["8", "10", "11", "12", "13", "14", "16", "20"],
                  "Simulated loads, requests/s per replica.")
flags.DEFINE_float("sim_duration_s", 120.0, "Seconds of arrivals per simulated run.", lower_bound=1)
flags.DEFINE_float("sim_scale", 1.0, "slo_mix length divisor of the simulated runs (1: 7B-scale lengths).",
                   lower_bound=1)
flags.DEFINE_list("replicas", ["1"], "Simulated replica counts (the loads scale with it).")
flags.DEFINE_string("router", "least-load", "Router over several simulated replicas (scheduler/routing/policies.py).")
flags.DEFINE_string("cost_model", "", "Cost model JSON (tools/profile_engine.py); empty: analytic 7B on H100.")
flags.DEFINE_integer("page_size", 64, "Simulated KV page, tokens: 64 rather than 16 keeps the prefix cache's "
                     "eviction walk (one per page short) affordable at 400k cached tokens.", lower_bound=1)
flags.DEFINE_integer("kv_tokens", 400_000, "Simulated KV room per replica, tokens (an 80 GB GPU's for a 7B).",
                     lower_bound=1)
flags.DEFINE_integer("max_num_batched_tokens", 4096, "Simulated token budget per step.", lower_bound=1)
flags.DEFINE_integer("max_num_seqs", 256, "Simulated sequences per step.", lower_bound=1)
# -- live --
flags.DEFINE_string("config", os.path.join(ROOT, "configs", "test_5m.py"), "Launch config of the live servers.")
flags.DEFINE_multi_string("override", [], "Extra --config.<section>.<field>=value for the live servers.")
flags.DEFINE_list("live_tiers", ["interactive:300:60:4", "agent:3000:150:2", "batch:20000:1000:1"],
                  "Live tiers, highest first (the servers' serving.tiers).")
flags.DEFINE_list("live_rates", ["16", "40", "52", "64"], "Live loads, requests/s.")
flags.DEFINE_float("live_duration_s", 15.0, "Seconds of arrivals per live run.", lower_bound=1)
flags.DEFINE_integer("live_rounds", 2, "Live rounds: each runs every load and policy (the policies' order rotated); "
                     "the tables show the means, and the range of the overall goodput.", lower_bound=1)
flags.DEFINE_float("live_scale", 12.0, "slo_mix length divisor of the live runs (12 fits 512 tokens).",
                   lower_bound=1)


def _numbers(name: str) -> list[float]:
    try:
        return [float(x) for x in FLAGS[name].value]
    except ValueError:
        raise app.UsageError(f"--{name}={FLAGS[name].value} must be numbers") from None


def _tiers(name: str):
    from jinfer.config import Tier
    try:
        return tuple(Tier.parse(spec) for spec in FLAGS[name].value)
    except ValueError as e:
        raise app.UsageError(f"--{name}: {e}") from None


def _mix() -> dict[str, float]:
    mix = {}
    for part in FLAGS.mix.split(","):
        name, _, share = part.partition(":")
        try:
            mix[name] = float(share)
        except ValueError:
            raise app.UsageError(f"--mix entry {part!r} must be class:share") from None
    return mix


def _check_tiers(tiers, mix, flag: str) -> None:
    missing = sorted(set(mix) - {t.name for t in tiers})
    if missing:
        raise app.UsageError(f"--mix classes {missing} have no tier in --{flag} {[t.name for t in tiers]}")


# -- simulated ---------------------------------------------------------------------------------

def _sim_policy(name: str):
    """callable(clock) -> policy, as Simulator(policy=) takes it."""
    from scheduler.slo.policies import FirstCome, SloAware, StrictPriority
    if name == "slo":
        return lambda clock: SloAware(clock=clock, admission=FLAGS.slo_admission)
    return {"first_come": lambda clock: FirstCome(), "strict_priority": lambda clock: StrictPriority()}[name]


def simulate(tiers, mix, rates, replicas: int, cost):
    """[(rate, {policy: SimResult.tier_stats + demoted, preempted})] for `replicas` replicas."""
    from scheduler.simulation.workloads import slo_mix
    from scheduler.routing.policies import make_router
    from scheduler.simulation.simulator import ReplicaConfig, Simulator

    cfg = ReplicaConfig(page_size=FLAGS.page_size, num_pages=FLAGS.kv_tokens // FLAGS.page_size,
                        max_num_batched_tokens=FLAGS.max_num_batched_tokens, max_num_seqs=FLAGS.max_num_seqs)
    rows = []
    for rate in rates:
        total = rate * replicas
        items = slo_mix(round(total * FLAGS.sim_duration_s), rate=total, mix=mix, scale=FLAGS.sim_scale,
                        vocab=(10, 32_000), seed=FLAGS.seed)
        cells = {}
        for policy in FLAGS.policies:
            t0 = time.perf_counter()
            sim = Simulator(make_router(FLAGS.router, replicas, cost, cfg.capacity_tokens), replicas, cost, cfg,
                            tiers=tiers, policy=_sim_policy(policy))
            res = sim.run(items)
            stats = cells[policy] = res.tier_stats()
            stats["demoted"] = sum(sum(getattr(rep.sched.policy, "demotions", {}).values()) for rep in sim.replicas)
            stats["preempted"] = sum(r.preemptions for r in res.records)
            print(f"sim x{replicas} {total:g} req/s {policy:16s} goodput {stats['all']['goodput_rps']:6.2f} req/s, "
                  f"attainment {stats['all']['attainment']:.3f} ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
        rows.append((total, cells))
    return rows


# -- live --------------------------------------------------------------------------------------

def _live_stats(run, tiers) -> dict:
    """tier_stats' shape from what the client measured (harness.benchmark), and the
    requests the server's policy demoted during the run (its own count)."""
    from harness import benchmark as bm

    slos = {t.name: t for t in tiers if t.judged}
    summary = bm.summarize(run, slos)
    dur = run.duration_s
    out = {"span_s": dur, "tiers": {}}
    for t in tiers:
        rs = [r for r in run.results if r.tier == t.name]
        met = [r for r in rs if r.ok and (not t.judged or r.meets(slos[t.name]))]
        block = summary["tiers"].get(t.name, {})
        out["tiers"][t.name] = {"requests": len(rs), "met": len(met), "attainment": len(met) / len(rs) if rs else
                                float("nan"), "goodput_rps": len(met) / dur,
                                "goodput_tps": sum(r.output_tokens for r in met) / dur,
                                "ttft_p90_ms": block.get("ttft_ms", {}).get("p90"),
                                "tpot_p90_ms": block.get("tpot_ms", {}).get("p90"), "failed": block.get("failed", 0)}
    judged = [out["tiers"][t.name] for t in tiers if t.judged]
    total = {k: sum(b[k] for b in judged) for k in ("requests", "met", "goodput_rps", "goodput_tps", "failed")}
    total["attainment"] = total["met"] / total["requests"] if total["requests"] else float("nan")
    out["all"] = total
    server = summary.get("server") or {}  # the server's own count over the run (GetServerStats)
    out["demoted"] = sum(t.get("demoted", 0) for t in server.values())
    return out


def _mean(values):
    """Element-wise mean of the rounds' stats (nested dicts of numbers; None where one is None)."""
    if isinstance(values[0], dict):
        return {k: _mean([v[k] for v in values]) for k in values[0]}
    return None if any(v is None for v in values) else sum(values) / len(values)


def live(tiers, mix, rates):
    """[(rate, {policy: stats, the mean of --live_rounds runs})] measured against one server process
    per policy."""
    from harness import benchmark as bm
    from jinfer.serving.client import Client
    from entrypoints.process import ServerProcess
    from scheduler.simulation.workloads import slo_mix

    specs = "(" + ",".join(repr(s) for s in FLAGS.live_tiers) + ",)"
    base = [f"--config={FLAGS.config}", "--config.serving.port=0", "--config.serving.metrics_port=0",
            "--config.serving.max_queued_requests=100000", f"--config.serving.tiers={specs}", *FLAGS.override]
    procs = {}
    print(f"starting {len(FLAGS.policies)} servers (each compiles its step buckets) ...", file=sys.stderr)
    for policy in FLAGS.policies:
        extra = [f"--config.engine.scheduling_policy={policy}"]
        if policy == "slo" and FLAGS.slo_admission:
            extra.append("--config.engine.slo_admission=true")
        procs[policy] = ServerProcess(base + extra).start()
    rows = []
    try:
        for p in procs.values():
            p.wait_ready(900)
        with Client(procs[FLAGS.policies[0]].target) as c:
            info = c.server_info(timeout=30)
        runs = {(rate, policy): [] for rate in rates for policy in procs}
        for k in range(FLAGS.live_rounds):  # each round: every load, the policies in turn (rotated)
            order = FLAGS.policies[k % len(procs):] + FLAGS.policies[:k % len(procs)]
            for rate in rates:
                items = slo_mix(round(rate * FLAGS.live_duration_s), rate=rate, mix=mix, scale=FLAGS.live_scale,
                                vocab=(10, info.vocab_size), seed=FLAGS.seed)
                for policy in order:
                    with Client(procs[policy].target) as c:
                        c.reset_prefix_cache()
                    run = bm.replay(procs[policy].target, items, progress=False)
                    runs[(rate, policy)].append(_live_stats(run, tiers))
                    a = runs[(rate, policy)][-1]["all"]
                    print(f"live round {k} {rate:g} req/s {policy:16s} goodput {a['goodput_rps']:6.2f} req/s, "
                          f"attainment {a['attainment']:.3f}, failed {a['failed']} ({run.duration_s:.0f} s)",
                          file=sys.stderr, flush=True)
        for rate in rates:
            cells = {}
            for policy in FLAGS.policies:
                cells[policy] = _mean(runs[(rate, policy)])
                goodputs = [st["all"]["goodput_rps"] for st in runs[(rate, policy)]]
                cells[policy]["all"]["goodput_range"] = (min(goodputs), max(goodputs))
            rows.append((rate, cells))
    finally:
        codes = [p.stop() for p in procs.values()]
    if any(codes):
        print(f"warning: servers exited with {codes}", file=sys.stderr)
    return rows, info


# -- report ------------------------------------------------------------------------------------

def _pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.1f} %"


def table(rows, tiers, live_extra: bool = False) -> str:
    names = [t.name for t in tiers]
    head = (["rate req/s", "policy"] + [f"{n} att." for n in names] + ["all att."]
            + [f"{n} goodput" for n in names] + ["all goodput req/s", "all goodput tok/s", "vs first_come"]
            + ["demoted"] + (["all goodput range", f"{names[0]} TTFT p90 ms", f"{names[0]} TPOT p90 ms", "failed"]
                             if live_extra
                             else ["preempted", f"{names[0]} TTFT / TPOT misses"]))
    lines = ["| " + " | ".join(head) + " |", "|---:|---|" + "---:|" * (len(head) - 2)]
    for rate, cells in rows:
        base = cells["first_come"]
        for policy, st in cells.items():
            t, a = st["tiers"], st["all"]
            row = ([f"{rate:g}", policy] + [_pct(t[n]["attainment"]) for n in names] + [_pct(a["attainment"])]
                   + [f"{t[n]['goodput_rps']:.2f}" for n in names]
                   + [f"{a['goodput_rps']:.2f}", f"{a['goodput_tps']:.0f}", f"{_ratio(st, base):.2f}x"])
            row.append(f"{st['demoted']:g}")
            first = t[names[0]]
            if live_extra:
                ttft, tpot = first["ttft_p90_ms"], first["tpot_p90_ms"]
                row += ["{:.2f}-{:.2f}".format(*a["goodput_range"]), "-" if ttft is None else f"{ttft:.0f}",
                        "-" if tpot is None else f"{tpot:.1f}", f"{a['failed']:g}"]
            else:
                row += [str(st["preempted"]), f"{first['ttft_misses']} / {first['tpot_misses']}"]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _ratio(st: dict, base: dict) -> float:
    return st["all"]["goodput_rps"] / base["all"]["goodput_rps"] if base["all"]["goodput_rps"] else float("inf")


def verdict(rows, tiers) -> str:
    """Where first_come starts missing, and how the others do there against the target."""
    first = tiers[0].name
    missing = [(rate, cells) for rate, cells in rows if cells["first_come"]["all"]["attainment"] < FLAGS.floor]
    if not missing:
        return (f"first_come's overall attainment stays at or above {_pct(FLAGS.floor)} at every load: "
                "no point where it starts missing.")
    rate, cells = missing[0]
    fcfs = cells["first_come"]
    parts = [f"first_come's overall attainment first drops below {_pct(FLAGS.floor)} at {rate:g} req/s "
             f"({_pct(fcfs['all']['attainment'])}, goodput {fcfs['all']['goodput_rps']:.2f} req/s)."]
    for policy in (p for p in FLAGS.policies if p != "first_come"):
        st = cells[policy]
        parts.append(f"{policy}: goodput {st['all']['goodput_rps']:.2f} req/s = {_ratio(st, fcfs):.2f}x, {first} "
                     f"attainment {_pct(st['tiers'][first]['attainment'])}.")
    if "slo" in cells:
        st = cells["slo"]
        met = _ratio(st, fcfs) >= 1.5 and st["tiers"][first]["attainment"] >= 0.9
        parts.append(f"Target (slo >= 1.5x first_come's goodput there, {first} attainment >= 90 %): "
                     f"{'met' if met else 'missed'}.")
    return " ".join(parts)


def sim_section(mix) -> list[str]:
    from scheduler.cost_model import CostModel, analytic_7b_h100

    tiers, rates = _tiers("sim_tiers"), _numbers("sim_rates")
    _check_tiers(tiers, mix, "sim_tiers")
    cost = CostModel.load(FLAGS.cost_model) if FLAGS.cost_model else analytic_7b_h100()
    out = []
    for n in (int(r) for r in FLAGS.replicas):
        t0 = time.perf_counter()
        rows = simulate(tiers, mix, rates, n, cost)
        setup = (f"Tiers {', '.join(FLAGS.sim_tiers)}; mix {FLAGS.mix}"
                 + (f" with lengths / {FLAGS.sim_scale:g}" if FLAGS.sim_scale != 1 else "")
                 + f"; {FLAGS.sim_duration_s:g} s of Poisson "
                 f"arrivals per run, seed {FLAGS.seed}; {FLAGS.kv_tokens} KV tokens in pages of {FLAGS.page_size}, "
                 f"token budget {FLAGS.max_num_batched_tokens}, {FLAGS.max_num_seqs} sequences per step"
                 + (f", router {FLAGS.router}" if n > 1 else ""))
        out += [f"## Simulated: {n} replica{'s' if n > 1 else ''}, cost model `{cost.name}`", "",
                f"{setup}. {time.perf_counter() - t0:.0f} s of wall time.", "", table(rows, tiers), "",
                verdict(rows, tiers), ""]
    return out


def live_section(mix) -> list[str]:
    tiers, rates = _tiers("live_tiers"), _numbers("live_rates")
    _check_tiers(tiers, mix, "live_tiers")
    t0, load = time.perf_counter(), os.getloadavg()[0]
    rows, info = live(tiers, mix, rates)
    setup = (f"Tiers {', '.join(FLAGS.live_tiers)}; mix {FLAGS.mix} with lengths / {FLAGS.live_scale:g} "
             f"(max_model_len {info.max_model_len}); {FLAGS.live_duration_s:g} s of Poisson arrivals per run, "
             f"seed {FLAGS.seed}; means of {FLAGS.live_rounds} rounds (policies in rotated order); "
             f"{os.cpu_count()} CPU cores shared by the servers and the client, load average "
             f"{load:.1f} before the run and {os.getloadavg()[0]:.1f} after")
    return [f"## Live: {info.model}, one server process per policy", "",
            f"{setup}. {time.perf_counter() - t0:.0f} s of wall time.", "", table(rows, tiers, live_extra=True), "",
            verdict(rows, tiers), ""]


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    unknown = sorted(set(FLAGS.policies) - set(POLICIES)) + sorted(set(FLAGS.parts) - {"sim", "live"})
    if unknown or "first_come" not in FLAGS.policies:
        raise app.UsageError(f"--policies must include first_come and name only {list(POLICIES)}; "
                             f"--parts only sim and live; got unknown {unknown}")
    if FLAGS.smoke:
        FLAGS.sim_rates, FLAGS.sim_duration_s = ["4", "16"], 5.0
        FLAGS.live_rates, FLAGS.live_duration_s, FLAGS.live_rounds = ["4", "16"], 3.0, 1
    mix = _mix()
    out = (sim_section(mix) if "sim" in FLAGS.parts else []) + (live_section(mix) if "live" in FLAGS.parts else [])
    report = f"Command: `python tools/bench_slo.py {' '.join(sys.argv[1:])}`\n\n" + "\n".join(out)
    print(report)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write("# SLO tiers: first_come vs strict_priority vs slo\n\n" + report)


if __name__ == "__main__":
    app.run(main)
