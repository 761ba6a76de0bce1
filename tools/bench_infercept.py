"""InferCept, side by side with its baselines: what paused requests' K/V costs under each pause
policy, simulated at 8B-on-H100 cost on InferCept's six augment types.

  python tools/bench_infercept.py --out=benchmarks/infercept.md
  python tools/bench_infercept.py --rates=2,4,8 --num_requests=300 --policies=discard,infercept
  python tools/bench_infercept.py --parts=live --config.cache.num_pages=96    # the default model, this host

Simulated (scheduler/simulation/simulator.py, one replica): jinfer's Scheduler on
cost_model.analytic_8b_h100_tp(1), a pool of --num_pages pages of 16 tokens, K/V of
--kv_bytes_per_token bytes per token (8B bf16 with 8 KV heads: 128 KiB) and a host link of
--host_gbps GB/s each way (an assumption: PCIe 4.0 x16 moves ~25 GB/s); a swap copy overlaps
its step (the step takes the longer of the two). Requests of the augment types
(scheduler/infercept/workloads.py: InferCept's Table 1), Poisson arrivals at each --rates.
Policies (scheduler/infercept/policies.py): discard (into the prefix cache, queue place kept:
InferCept's improved discard), vllm-discard (the same, the continuation queued as a new
arrival, as vLLM takes it), preserve, swap (all, whatever it costs), pin-ttl (Continuum-like,
--ttl_s), infercept (least waste; T_INT = time paused so far), infercept-oracle (T_INT = the
remaining pause, known to the simulator).

Reported per rate and policy: completed requests/s (requests finishing between a quarter of the
arrival span and the last arrival, per second: the steady state, since a request lasts minutes
with its tools), normalized latency (end to end minus tool time, per output token; median and p99),
memory waste (page-seconds held by paused requests over the pool's page-seconds), recompute
share (tokens computed again after a pause over all tokens computed), K/V swapped out (GB).
Then, per policy, the highest rate whose median normalized latency stays within --slo_ms
(throughput at equal normalized latency, as InferCept reports it), against discard's.

Live (--parts=live; harness/tool_calls.py): the --config model (default: SmolLM2-135M-Instruct)
built as tools/launch_server.py builds it, the same augmented workload scaled down
(--live_scale, --live_pause_scale) replayed in wall-clock time, each policy in turn on one
engine (reset between); the calls at the workload's positions (Engine intercept_after), tools
as timers returning random tokens. InferCept's profile is measured on the engine first
(T_fwd per step bucket, T_swap of 16 pages to the host tier and back; on a CPU swaps are not
hidden behind the step, so InferCept weighs their waste against the others').
"""

from __future__ import annotations

import math
import os
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jinfer.launch import define_config_flag, parse_flags  # noqa: E402 - after the path

FLAGS = flags.FLAGS
CONFIG = define_config_flag(os.path.join(ROOT, "configs", "default.py"))
flags.DEFINE_list("parts", ["sim"], "sim (8B-on-H100 cost) and/or live (the --config model on this host).")
flags.DEFINE_string("out", "", "Write the Markdown report here (else stdout only).")
flags.DEFINE_integer("live_requests", 40, "live: requests per run.", lower_bound=1)
flags.DEFINE_float("live_rate", 1.0, "live: arrival rate, requests/s.", lower_bound=1e-3)
flags.DEFINE_float("live_scale", 8.0, "live: divide every length by this.", lower_bound=1)
flags.DEFINE_float("live_pause_scale", 0.05, "live: multiply every tool's pause by this.", lower_bound=0)
flags.DEFINE_list("live_policies", ["discard", "preserve", "swap", "infercept", "infercept-oracle"],
                  "live: pause policies (infercept-oracle: T_INT is the tool's remaining time, which the replay knows).")
flags.DEFINE_list("rates", ["4", "5", "6", "7", "8", "9", "10", "11", "12", "14", "16"], "Arrival rates, requests/s.")
flags.DEFINE_integer("num_requests", 1500, "Requests per run.", lower_bound=1)
flags.DEFINE_list("types", ["math", "qa", "virtual-env", "chatbot", "image", "tts"], "Augment types, drawn evenly.")
flags.DEFINE_list("policies", ["discard", "vllm-discard", "preserve", "swap", "pin-ttl", "infercept",
                                "infercept-oracle"],
                  "Pause policies to compare.")
flags.DEFINE_integer("num_pages", 4000, "KV pages of 16 tokens in the replica's pool.", lower_bound=1)
flags.DEFINE_float("kv_bytes_per_token", 128 * 1024, "K/V bytes of one token, all layers.", lower_bound=1)
flags.DEFINE_float("host_gbps", 25.0, "Host link bandwidth each way, GB/s (an assumption).", lower_bound=0.001)
flags.DEFINE_float("ttl_s", 1.0, "pin-ttl: seconds a paused request keeps its K/V.", lower_bound=0)
flags.DEFINE_float("slo_ms", 50.0, "Median normalized latency (ms per output token) a rate must keep.", lower_bound=0)
flags.DEFINE_float("scale", 1.0, "Divide every length by this.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Workload seed.")


def _policy(name: str, profile, ttl_s: float, remaining=None):
    """The pause policy `name` as a factory of the clock it reads (remaining: an oracle of the
    remaining pause, for infercept-oracle; the simulator sets its own after construction)."""
    from scheduler.infercept import policies as ip
    makers = {"discard": lambda clock: ip.DiscardAll(), "vllm-discard": lambda clock: ip.RequeueDiscard(),
              "preserve": lambda clock: ip.PreserveAll(), "swap": lambda clock: ip.SwapAll(),
              "pin-ttl": lambda clock: ip.PinTTL(ttl_s, clock),
              "infercept": lambda clock: ip.InferCept(profile, clock),
              "infercept-oracle": lambda clock: ip.InferCept(profile, clock, remaining=remaining)}
    if name not in makers:
        raise app.UsageError(f"unknown policy {name!r}; known: {sorted(makers)}")
    return makers[name]


def run_one(items, policy_name: str, cfg, cost, profile) -> dict:
    """One simulated run; its figures."""
    import numpy as np
    from scheduler.routing.policies import make_router
    from scheduler.simulation.simulator import Simulator
    sim = Simulator(make_router("round-robin", 1, cost, cfg.capacity_tokens), 1, cost, cfg,
                    pause_policy=_policy(policy_name, profile, FLAGS.ttl_s))
    rep = sim.replicas[0]
    if policy_name == "infercept-oracle":
        rep.sched.pause_policy.remaining = lambda rid: max(0.0, sim.tool_end[rid] - sim.now)
    res = sim.run(items)
    ok = [r for r in res.records if not r.error]
    # Completed requests/s in the steady part: finishes from a quarter of the arrival span to
    # the last arrival (requests last minutes with their tools: the tail is not a rate).
    first, last = items[0].arrival_s, items[-1].arrival_s
    start = first + (last - first) / 4
    done = sum(start <= r.finish_s <= last for r in ok)
    nl = np.array([r.normalized_latency_s for r in ok]) * 1e3
    ps = rep.sched.pause_stats
    return {"completed_rps": done / (last - start), "nl_p50": float(np.median(nl)), "nl_p99": float(np.percentile(nl, 99)),
            "waste": ps.idle_page_s / (cfg.num_pages * res.sim_time_s),
            "recompute": ps.recomputed_tokens / max(rep.computed_tokens, 1),
            "swapped_gb": ps.swapped_out_tokens * FLAGS.kv_bytes_per_token / 1e9, "failed": len(res.records) - len(ok)}


def _live_profile(engine):
    """T_fwd and T_swap on this engine, measured: a prefill of each step bucket's size (median
    of 3, distinct prompts: no prefix hits; a step's time is its bucket's), and 16 pages to
    the host tier and back. A CPU has no copy engine beside its cores: swaps are not hidden."""
    import bisect
    import statistics
    import numpy as np
    import jax
    from jinfer.sampling_params import SamplingParams
    from scheduler.infercept.policies import PauseProfile
    buckets = list(engine.runner.token_buckets)
    one = SamplingParams(temperature=0, max_tokens=1)
    step_s, at = {}, 10
    for b in buckets:
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            engine.generate([list(range(at, at + b))], one)
            runs.append(time.perf_counter() - t0)
            at += b + 1
        step_s[b] = statistics.median(runs)

    def fwd_s(n: int) -> float:
        if n > buckets[-1]:
            return -(-n // buckets[-1]) * step_s[buckets[-1]]
        return step_s[buckets[bisect.bisect_left(buckets, max(n, 1))]]

    pages = list(range(16))
    engine.warm_swaps()  # every swap size compiled before anything is timed
    np.asarray(engine.runner.kv.k[0][0, 0, 0])
    t0 = time.perf_counter()
    for _ in range(3):
        data = engine.runner.read_pages(pages)
        engine.host_kv.put("probe", data, 16)
        engine.runner.write_pages(pages, engine.host_kv.take("probe", 16))
    np.asarray(engine.runner.kv.k[0][0, 0, 0])  # wait for the copies
    per_token = (time.perf_counter() - t0) / 3 / 2 / (16 * engine.runner.page_size)
    engine.reset()
    gpu = jax.devices()[0].platform == "gpu"
    return (PauseProfile(fwd_s, lambda n: per_token * n, 1.0, buckets[-1], swap_overlaps=gpu),
            step_s, per_token)


def live_part() -> list[str]:
    """The live runs: the --config model on this host, each pause policy on the same workload."""
    import numpy as np
    from entrypoints.build import build_engine
    from harness.tool_calls import replay
    from jinfer.launch import resolve
    from scheduler.infercept.workloads import augmented
    for name in FLAGS.live_policies:
        _policy(name, None, 0.0)  # names checked before the engine is built
    launch = resolve(CONFIG.value)
    engine = build_engine(launch)
    engine.release_warmup()
    engine.runner.wait_warmup(600)  # every bucket compiled before anything is timed
    vocab = engine.model_config.vocab_size
    profile, step_s, per_token = _live_profile(engine)
    items = augmented(FLAGS.live_requests, FLAGS.live_rate, tuple(FLAGS.types), scale=FLAGS.live_scale,
                      pause_scale=FLAGS.live_pause_scale, seed=FLAGS.seed)
    cache = launch.cache
    lines = ["", "## Live", "", f"`{launch.model.path or 'smollm2-135m-instruct'}` on this host ({os.cpu_count()} CPUs), "
             f"{cache.num_pages} pages x {cache.page_size} tokens, {FLAGS.live_requests} requests at "
             f"{FLAGS.live_rate:g} req/s, lengths / {FLAGS.live_scale:g}, pauses x {FLAGS.live_pause_scale:g}, "
             f"greedy; tool calls at the workload's positions (Engine intercept_after). Measured profile: "
             "T_fwd by step bucket (tokens: ms) " + ", ".join(f"{b}: {t * 1e3:.0f}" for b, t in step_s.items())
             + f"; T_swap = {per_token * 1e6:.2f} us/token each way, not hidden (swap_overlaps="
             f"{profile.swap_overlaps}).", "",
             "| policy | finished | wall s | norm. latency p50 ms/tok | p99 | memory waste | recompute share | "
             "swapped out tokens |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    tool_end: dict[str, float] = {}  # the replay's oracle of remaining tool time
    oracle = lambda rid: max(0.0, tool_end.get(rid, 0.0) - time.perf_counter())  # noqa: E731
    for name in FLAGS.live_policies:
        engine.scheduler.pause_policy = _policy(name, profile, FLAGS.ttl_s, oracle)(time.monotonic)
        records, wall = replay(engine, items, vocab, FLAGS.seed, tool_end)
        sched = engine.scheduler
        ps = sched.pause_stats
        ps.hold(0, time.monotonic())
        ok = [r for r in records if not math.isnan(r.finish_s)]
        nl = np.array([r.normalized_latency_s for r in ok]) * 1e3
        lines.append(f"| {name} | {len(ok)}/{len(records)} | {wall:.1f} | {np.median(nl):.1f} | "
                     f"{np.percentile(nl, 99):.1f} | {ps.idle_page_s / (cache.num_pages * wall):.2%} | "
                     f"{ps.recomputed_tokens / max(sched.num_scheduled_tokens, 1):.2%} | {ps.swapped_out_tokens} |")
        print(lines[-1], file=sys.stderr)
        engine.reset()
    return lines


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    unknown = sorted(set(FLAGS.parts) - {"sim", "live"})
    if unknown:
        raise app.UsageError(f"unknown --parts {unknown}: sim and/or live")
    lines = sim_part() if "sim" in FLAGS.parts else []
    if "live" in FLAGS.parts:
        lines += live_part()
    report = "\n".join(lines)
    print(report)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write("# InferCept: paused requests' K/V by least waste\n\nCommand: `python "
                    "tools/bench_infercept.py " + " ".join(sys.argv[1:]) + "`\n\n" + report + "\n")


def sim_part() -> list[str]:
    """The simulated runs (module docstring)."""
    from scheduler.cost_model import analytic_8b_h100_tp
    from scheduler.infercept.policies import PauseProfile
    from scheduler.infercept.workloads import augmented
    from scheduler.simulation.simulator import ReplicaConfig

    try:
        rates = [float(r) for r in FLAGS.rates]
    except ValueError:
        raise app.UsageError(f"--rates={FLAGS.rates} must be numbers") from None
    for p in FLAGS.policies:
        _policy(p, None, 0.0)  # names checked before anything runs
    cost = analytic_8b_h100_tp(1)
    bw = FLAGS.host_gbps * 1e9
    cfg = ReplicaConfig(num_pages=FLAGS.num_pages, swap_s_per_page=16 * FLAGS.kv_bytes_per_token / bw)
    profile = PauseProfile.from_cost_model(cost, FLAGS.kv_bytes_per_token, bw)
    lines = [f"Simulated: one replica, `{cost.name}`, {cfg.num_pages} pages x 16 tokens, K/V "
             f"{FLAGS.kv_bytes_per_token / 1024:g} KiB/token, host link {FLAGS.host_gbps:g} GB/s (assumed), "
             f"{FLAGS.num_requests} requests per run of types {', '.join(FLAGS.types)}, lengths / {FLAGS.scale:g}, "
             f"seed {FLAGS.seed}; pin-ttl keeps K/V {FLAGS.ttl_s:g} s.", "",
             "| rate req/s | policy | completed req/s | norm. latency p50 ms/tok | p99 | memory waste | "
             "recompute share | swapped out GB | failed |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    results: dict[tuple[float, str], dict] = {}
    t0 = time.perf_counter()
    for rate in rates:
        items = augmented(FLAGS.num_requests, rate, tuple(FLAGS.types), scale=FLAGS.scale, seed=FLAGS.seed)
        for p in FLAGS.policies:
            r = results[(rate, p)] = run_one(items, p, cfg, cost, profile)
            lines.append(f"| {rate:g} | {p} | {r['completed_rps']:.2f} | {r['nl_p50']:.1f} | {r['nl_p99']:.1f} | "
                         f"{r['waste']:.2%} | {r['recompute']:.2%} | {r['swapped_gb']:.1f} | {r['failed']} |")
            print(lines[-1], file=sys.stderr)
    lines += ["", f"Throughput at equal normalized latency: the highest rate of the grid whose median "
              f"normalized latency stays within {FLAGS.slo_ms:g} ms/token (every rate below it too), per policy; "
              "its ratio to discard's (a grid step is the resolution):", "",
              "| policy | rate req/s | next rate (over) | vs discard |", "|---|---:|---:|---:|"]
    best = {}
    for p in FLAGS.policies:
        ok = 0
        for rate in rates:
            if results[(rate, p)]["nl_p50"] > FLAGS.slo_ms:
                break
            ok = rate
        best[p] = ok
    for p in FLAGS.policies:
        over = next((r for r in rates if r > best[p]), None)
        ratio = f"{best[p] / best['discard']:.2f}x" if best.get("discard") else "-"
        lines.append(f"| {p} | {best[p]:g} | {'-' if over is None else f'{over:g}'} | {ratio} |")
    lines.append(f"\n({len(rates) * len(FLAGS.policies)} runs in {time.perf_counter() - t0:.0f} s of wall time.)")
    return ["## Simulated", ""] + lines


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
