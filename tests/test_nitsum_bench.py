"""The Nitsum benchmark's parts: the shifting tiered workload, the SLO-safe rate search and the
profile it builds, the static-partition study in the simulator, the tool at smoke size, and a
live replay through an adaptive InstanceGroup on fake CPU devices."""

import json
import math
import os
import subprocess
import sys

import pytest

from jinfer.config import Tier
from scheduler.adaptive_tp.nitsum import Partition, Profile
from scheduler.adaptive_tp.profile import (Phase, TierShape, attainment_at, average_rates, bisect_rate, poisson_tier,
                                           profile_rates, shifting_workload)
from scheduler.cost_model import CostModel
from scheduler.simulation.simulator import ReplicaConfig
from scheduler.slo.policies import SloAware

SHAPES = {"fast": TierShape(64, 16), "bulk": TierShape(256, 32)}
TIERS = (Tier("fast", 0.05, 0.02, 4), Tier("bulk", 5.0, 0.2, 1))
CFG = ReplicaConfig(num_pages=2000, max_num_batched_tokens=512, max_num_seqs=32, max_model_len=1024)


def slo_policy(clock):
    return SloAware(clock=clock)


def test_phases_follow_each_other_with_their_rates():
    phases = [Phase(40, {"fast": 5.0}, "burst"), Phase(60, {"bulk": 2.0, "fast": 0.5}), Phase.parse("c=20:bulk:4")]
    assert phases[2] == Phase(20, {"bulk": 4.0}, "c")
    items = shifting_workload(phases, SHAPES, vocab=(5, 100), seed=1)
    assert items == shifting_workload(phases, SHAPES, vocab=(5, 100), seed=1)  # seeded
    assert [it.arrival_s for it in items] == sorted(it.arrival_s for it in items)
    count = lambda tier, a, b: sum(it.tier == tier and a <= it.arrival_s < b for it in items)  # noqa: E731
    assert count("bulk", 0, 40) == 0 and count("fast", 100, 120) == 0
    # Poisson counts within a few standard deviations of rate x duration.
    expected = (("fast", 0, 40, 200), ("bulk", 40, 100, 120), ("fast", 40, 100, 30), ("bulk", 100, 120, 80))
    for tier, a, b, want in expected:
        assert abs(count(tier, a, b) - want) < 4 * math.sqrt(want), (tier, a, b)
    for it in items:
        s = SHAPES[it.tier]
        assert s.prompt * (1 - s.spread) - 1 <= len(it.prompt) <= s.prompt * (1 + s.spread) + 1
        assert s.output * (1 - s.spread) - 1 <= it.max_tokens <= s.output * (1 + s.spread) + 1
        assert all(5 <= t < 100 for t in it.prompt)
    assert average_rates(phases) == pytest.approx({"fast": (200 + 30) / 120, "bulk": (120 + 80) / 120})
    with pytest.raises(ValueError, match="no TierShape"):
        shifting_workload([Phase(1, {"other": 1.0})], SHAPES, vocab=(0, 10))
    with pytest.raises(ValueError, match="name=seconds:tier:rate"):
        Phase.parse("x=ten:fast:1")


def test_a_higher_rate_gives_the_same_requests_earlier_then_more():
    slow = poisson_tier("fast", SHAPES["fast"], 2.0, 50, vocab=(0, 50), seed=3)
    fast = poisson_tier("fast", SHAPES["fast"], 4.0, 50, vocab=(0, 50), seed=3)
    assert len(fast) > len(slow)
    for a, b in zip(slow, fast):
        assert (a.prompt, a.max_tokens) == (b.prompt, b.max_tokens)
        assert b.arrival_s == pytest.approx(a.arrival_s / 2)


def test_bisection_finds_the_threshold_within_tolerance():
    calls = []

    def ok(rate):
        calls.append(rate)
        return rate <= 7.3

    found = bisect_rate(ok, 1.0, rel_tol=0.02)
    assert found <= 7.3 and found >= 7.3 * (1 - 0.02)
    assert bisect_rate(lambda r: r <= 0.3, 10.0, rel_tol=0.02) == pytest.approx(0.3, rel=0.02)
    assert bisect_rate(lambda r: False, 1.0) == 0.0
    assert bisect_rate(lambda r: True, 1.0, max_rate=100) == 100


def _tiny_costs():
    # Two "degrees": the second twice as fast at everything.
    base = CostModel("tiny", fixed_s=4e-3, per_token_s=2e-5, per_attn_s=1e-9, per_kv_s=1e-8, per_seq_s=5e-5)
    fast = CostModel("tiny-x2", *(v / 2 for v in base.coefficients))
    return {1: base, 2: fast}


def test_profile_rate_is_safe_and_the_next_step_up_is_not():
    costs, tol = _tiny_costs(), 0.05
    kw = dict(replica=CFG, policy=slo_policy, requests=100, vocab=(0, 1000), seed=0)
    profile = profile_rates(costs, TIERS[:1], SHAPES, rel_tol=tol, **kw)
    for tp, cost in costs.items():
        rate = profile.rate("fast", tp)
        assert rate > 0
        assert attainment_at(cost, TIERS[0], SHAPES["fast"], rate, **kw) >= 0.9
        assert attainment_at(cost, TIERS[0], SHAPES["fast"], rate * (1 + 2 * tol), **kw) < 0.9
    # Searching every (tier, degree) at once (through a pool's map) finds the same rates.
    parallel = profile_rates(costs, TIERS[:1], SHAPES, rel_tol=tol, pool_map=map, **kw)
    for tp in costs:
        assert parallel.rate("fast", tp) == pytest.approx(profile.rate("fast", tp), rel=2 * tol)
    # Monotone in the cost: the faster model serves more.
    assert profile.rate("fast", 2) > profile.rate("fast", 1)
    # Attainment falls as the rate rises (the same requests, closer together).
    rate = profile.rate("fast", 1)
    att = [attainment_at(costs[1], TIERS[0], SHAPES["fast"], rate * f, **kw) for f in (0.25, 0.5, 1, 1.5, 2)]
    assert att == sorted(att, reverse=True) and att[0] == 1.0 and att[-1] < 0.6


def test_the_adaptive_simulator_runs_the_policys_admission_check():
    from scheduler.simulation.nitsum_sim import AdaptiveSimulator, StaticControl

    items = poisson_tier("fast", SHAPES["fast"], 2000.0, 0.2, vocab=(0, 1000), seed=2)  # a flood
    control = StaticControl(Partition.parse("tp1:fast"))
    sim = AdaptiveSimulator(control, {1: _tiny_costs()[1]}, TIERS[:1], CFG, num_devices=1,
                            policy=lambda clock: SloAware(clock=clock, admission=True))
    res = sim.run(items)
    refused = [r for r in res.records if r.error]
    assert refused and all(r.error.startswith("refused: tier 'fast' cannot meet its TTFT") for r in refused)
    assert len(refused) < len(items)
    stats = res.tier_stats()["tiers"]["fast"]
    assert stats["finished"] == len(items) - len(refused) and stats["met"] <= stats["finished"]
    inst = sim.instances[0]
    assert not inst.reqs and not inst.sched.running and not inst.sched.waiting
    inst.sched.prefix_cache.clear()
    assert inst.sched.kv.num_free == CFG.num_pages


def _tool(*args):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, os.path.join(root, "tools", "bench_nitsum.py"), "--smoke", *args],
                         capture_output=True, text=True, timeout=900, cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_the_tool_compares_static_partitions_and_the_controller_in_the_simulator(tmp_path):
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(Profile({"interactive": {1: 0.0, 2: 10.0, 4: 50.0, 8: 100.0},
                                           "agent": {1: 0.0, 2: 1.0, 4: 5.0, 8: 12.0},
                                           "batch": {1: 10.0, 2: 16.0, 4: 25.0, 8: 40.0}}).to_dict()))
    out = _tool("--parts=sim", f"--sim_profile={profile}", f"--out={tmp_path / 'report.md'}")
    report = (tmp_path / "report.md").read_text()
    assert out.strip() in report
    assert "| `tp8:*` | shared | slo |" in report and "| `adaptive` | controller | slo |" in report
    assert "| fcfs |" in report  # the best static partition again, FCFS inside
    assert "Best static partition: `" in report and "the best static (target >= 1.2x:" in report
    assert "Reconfigurations: " in report


def test_arrivals_while_a_reconfiguration_waits_are_routed_by_the_new_partition():
    from scheduler.adaptive_tp.nitsum import Controller, NitsumControl
    from scheduler.simulation.nitsum_sim import AdaptiveSimulator

    # Steps of ~0.1 s: requests arrive while the one instance finishes its step before splitting;
    # the controller already routes by the new partition.
    slow = CostModel("slow", *(20 * c for c in _tiny_costs()[1].coefficients))
    costs = {tp: slow for tp in (1, 2, 4, 8)}
    profile = Profile({"fast": {1: 5.0, 2: 12.0, 4: 20.0, 8: 30.0}, "bulk": {1: 4.0, 2: 6.0, 4: 8.0, 8: 9.0}})
    controller = Controller(profile, TIERS, 8, window_s=0.25, confirm=1, min_dwell_s=0.0, hysteresis=0.0,
                            reconfig_s=lambda old, new: 0.0, initial=Partition.parse("tp8:*"))
    items = shifting_workload([Phase(3, {"fast": 10.0, "bulk": 2.0}), Phase(3, {"fast": 2.0, "bulk": 8.0})], SHAPES,
                              vocab=(0, 1000), seed=4)
    sim = AdaptiveSimulator(NitsumControl(controller), costs, TIERS, CFG, policy=lambda clock: SloAware(clock=clock))
    res = sim.run(items)
    assert sim.reconfigurations and len(sim.reconfigurations[0].new) > 1  # the one instance split
    assert all(not r.error and r.output_tokens == it.max_tokens for r, it in zip(res.records, items))
    for r, it in zip(res.records, items):
        assert r.arrival_s == it.arrival_s and r.first_token_s > r.arrival_s


@pytest.mark.slow  # builds every instance of two partitions on 8 fake CPU devices (minutes)
def test_the_tool_serves_the_live_workload_statically_and_adaptively(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = _tool("--parts=live", "--nofcfs", "--noslow_knobs", f"--live_profile_out={tmp_path / 'cpu.json'}",
                f"--config={os.path.join(root, 'configs', 'test_5m.py')}", "--config.engine.warmup=false")
    profile = Profile.from_dict(json.loads((tmp_path / "cpu.json").read_text()))
    assert set(profile.rates) == {"interactive", "agent", "batch"} and profile.degrees == [1, 2, 4, 8]
    assert "### Live" in out and "| `adaptive` | live | slo |" in out
    assert "### Regroups measured before the runs" in out and "Fitted reconfiguration model" in out
    # Every finished request's tokens equal a single engine's greedy run, regrouped or not.
    for line in out.splitlines():
        if line.startswith("Outputs: "):
            for part in line[len("Outputs: "):].rstrip(".").split("; "):
                same, _, rest = part.partition(" of ")
                assert int(same.split(": ")[1]) == int(rest.split(" ")[0]) > 0, part


def test_the_tool_measures_regroups_of_any_model():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = _tool("--parts=regroups", "--num_devices=2", "--degrees=1,2", "--initial=2",
                f"--config={os.path.join(root, 'configs', 'test_5m.py')}", "--config.engine.warmup=false")
    assert "## Regroups: test-5m on 2 fake CPU devices" in out
    rows = [line for line in out.splitlines() if line.startswith("| (")]
    assert [r.split(" | ")[:2] for r in rows] == [["| (2,)", "(1, 1)"], ["| (1, 1)", "(2,)"]]
    assert "Median pause" in out and "Fitted reconfiguration model" in out
