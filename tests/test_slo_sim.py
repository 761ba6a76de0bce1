"""SLO tiers in the simulator: tiers and policies per replica, per-tier attainment and goodput,
the mixed SLO workload, and tools/bench_slo.py."""

import collections
import os
import subprocess
import sys

import pytest

from jinfer.config import ServingConfig, Tier
from scheduler.cost_model import CostModel, analytic_7b_h100
from scheduler.routing.policies import make_router
from scheduler.simulation.simulator import ReplicaConfig, Simulator
from scheduler.simulation.workloads import SLO_CLASSES, WorkItem, slo_mix
from scheduler.slo.policies import FirstCome, SloAware, StrictPriority

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIERS = ServingConfig(tiers=("interactive:100:30:4", "agent:500:60:2", "batch:5000:200:1")).tier_table
POLICIES = {"first_come": lambda clock: FirstCome(), "strict_priority": lambda clock: StrictPriority(),
            "slo": lambda clock: SloAware(clock=clock)}


def _sim(policy, *, num_pages=1000, tiers=TIERS, fast_forward=True, cost=None, **cfg):
    cost = cost or analytic_7b_h100()
    rc = ReplicaConfig(page_size=16, num_pages=num_pages, **{"max_num_batched_tokens": 512, "max_num_seqs": 32, **cfg})
    return Simulator(make_router("round-robin", 1, cost, rc.capacity_tokens), 1, cost, rc, fast_forward=fast_forward,
                     tiers=tiers, policy=POLICIES[policy] if policy else None)


def _overload(n=150, rate=200.0):
    """7B-class lengths / 8 arriving far faster than one small replica serves them."""
    return slo_mix(n, rate=rate, scale=8, vocab=(10, 32_000), seed=0)


def _records(res):
    return [(r.tier, r.first_token_s, r.finish_s, r.output_tokens, r.preemptions, r.error) for r in res.records]


def test_the_simulator_with_tiers_and_the_slo_policy_is_deterministic():
    items = _overload()
    a, b = _sim("slo").run(items), _sim("slo").run(items)
    assert _records(a) == _records(b) and a.steps == b.steps
    assert a.tier_stats() == b.tier_stats()
    assert [r.tier for r in a.records] == [it.tier for it in items]


def test_fast_forward_stays_exact_under_an_interleaving_policy_and_is_off_for_a_per_step_one():
    """StrictPriority interleaves but has no per-step hook: a pure-decode stretch with nothing
    waiting plans every running request either way, so fast-forward changes nothing. SloAware
    revises itself every step (on_schedule, observe_step): fast-forward turns off."""
    items = _overload(60, rate=40.0)
    fast, slow = _sim("strict_priority").run(items), _sim("strict_priority", fast_forward=False).run(items)
    assert _records(fast) == _records(slow) and fast.steps == slow.steps
    assert _sim("strict_priority").fast_forward and not _sim("slo").fast_forward


def test_tier_stats_count_a_hand_worked_trace():
    """Every step takes 1/8 s (exact in binary), budget 64 tokens, FCFS within tiers; the
    replica starts on r0 as it arrives, before the others at the same instant:
    step 1 (ends 0.125): r0's 8 prompt tokens -> r0's first token.
    step 2 (0.25): r0 decodes, r1's 60, r2's first 3 of 8 -> r1's first token.
    step 3 (0.375): r0 (done), r1 (done), r2's last 5, r3's 4 -> first tokens of r2 and r3 (done);
    then r2 alone at 0.5, 0.625 and 0.75 (done). interactive: r0 TTFT 0.125 TPOT 0.125 met;
    r1 TTFT 0.25 > 0.2. batch: r2 TPOT 0.125 > 0.1. background is best effort: met, outside
    "all". The span is 0.75 s."""
    tiers = (Tier("interactive", 0.2, 0.125), Tier("batch", 1.0, 0.1), Tier("background", best_effort=True))
    cost = CostModel("eighth", fixed_s=0.125, per_token_s=0, per_attn_s=0, per_kv_s=0, per_seq_s=0)
    items = [WorkItem(0.0, tuple(range(10, 18)), 3, "interactive"), WorkItem(0.0, tuple(range(100, 160)), 2, ""),
             WorkItem(0.0, tuple(range(200, 208)), 4, "batch"), WorkItem(0.0, tuple(range(300, 304)), 1, "background")]
    res = _sim(None, tiers=tiers, cost=cost, max_num_batched_tokens=64, max_num_seqs=4).run(items)
    assert [(r.first_token_s, r.finish_s) for r in res.records] == [(0.125, 0.375), (0.25, 0.375), (0.375, 0.75),
                                                                     (0.375, 0.375)]
    st = res.tier_stats()
    assert st["span_s"] == 0.75
    assert st["tiers"]["interactive"] == {"requests": 2, "finished": 2, "met": 1, "ttft_misses": 1, "tpot_misses": 0,
                                          "attainment": 0.5, "goodput_rps": 1 / 0.75, "goodput_tps": 3 / 0.75}
    assert st["tiers"]["batch"] == {"requests": 1, "finished": 1, "met": 0, "ttft_misses": 0, "tpot_misses": 1,
                                    "attainment": 0.0, "goodput_rps": 0.0, "goodput_tps": 0.0}
    assert st["tiers"]["background"]["met"] == 1 and st["tiers"]["background"]["goodput_rps"] == 1 / 0.75
    assert st["all"] == {"requests": 3, "finished": 3, "met": 1, "ttft_misses": 1, "tpot_misses": 1,
                         "attainment": 1 / 3, "goodput_rps": 1 / 0.75, "goodput_tps": 3 / 0.75}


def test_the_slo_policy_beats_first_come_on_interactive_attainment_when_overloaded():
    items = _overload()
    fcfs, slo = _sim("first_come").run(items).tier_stats(), _sim("slo").run(items).tier_stats()
    assert fcfs["tiers"]["interactive"]["attainment"] < 0.5
    assert slo["tiers"]["interactive"]["attainment"] > 0.9
    assert slo["all"]["goodput_rps"] > 1.5 * fcfs["all"]["goodput_rps"]


@pytest.mark.parametrize("policy", list(POLICIES))
def test_every_request_finishes_and_every_page_returns_under_preemption(policy):
    sim = _sim(policy, num_pages=120)  # 1920 tokens of KV for dozens of requests: preemption
    items = _overload()
    res = sim.run(items)
    assert all(not r.error and r.output_tokens == it.max_tokens for r, it in zip(res.records, items))
    assert sum(r.preemptions for r in res.records) > 0
    sched = sim.replicas[0].sched
    assert not sched.running and not sched.waiting
    assert sched.kv.num_free + sched.kv.num_cached == 120


def test_the_simulator_refuses_what_it_cannot_judge():
    with pytest.raises(ValueError, match=r"request 1: tier='gold' is not one of the simulator's tiers"):
        _sim("slo").run([WorkItem(0.0, (1, 2, 3), 2, "batch"), WorkItem(0.0, (1, 2, 3), 2, "gold")])
    with pytest.raises(ValueError, match="policy= or ReplicaConfig"):
        _sim("slo", priority_groups=True)


def test_slo_admission_refusals_are_recorded_as_misses():
    cost = analytic_7b_h100()
    rc = ReplicaConfig(page_size=16, num_pages=1000, max_num_batched_tokens=512, max_num_seqs=32)
    sim = Simulator(make_router("round-robin", 1, cost, rc.capacity_tokens), 1, cost, rc, tiers=TIERS,
                    policy=lambda clock: SloAware(clock=clock, admission=True))
    res = sim.run(_overload(rate=1000.0))
    refused = [r for r in res.records if r.error]
    assert refused and all(r.error.startswith("refused: tier") for r in refused)
    st = res.tier_stats()
    assert st["all"]["finished"] == len(res.records) - len(refused)
    assert sum(sim.replicas[0].sched.policy.refusals.values()) == len(refused)


def test_slo_mix_classes_lengths_and_prefixes():
    items = slo_mix(600, rate=10.0, vocab=(10, 32_000), seed=3)
    assert items == slo_mix(600, rate=10.0, vocab=(10, 32_000), seed=3)
    assert items != slo_mix(600, rate=10.0, vocab=(10, 32_000), seed=4)
    counts = collections.Counter(it.tier for it in items)
    assert set(counts) == set(SLO_CLASSES) and counts["interactive"] > counts["batch"] > counts["agent"]
    agents = [it for it in items if it.tier == "agent"]
    assert {it.prompt[:4096] for it in agents} == {it.prompt[:4096] for it in agents if it.group < 8}
    assert len({it.prompt[:4096] for it in agents}) == 8 and all(it.prompt_len >= 4096 + 256 for it in agents)
    assert all(512 <= it.max_tokens <= 1536 for it in items if it.tier == "batch")
    assert all(b.arrival_s >= a.arrival_s for a, b in zip(items, items[1:]))
    small = slo_mix(600, rate=10.0, scale=12, vocab=(10, 4096), seed=3)
    assert max(it.prompt_len + it.max_tokens for it in small) <= 512
    with pytest.raises(ValueError, match=r"slo_mix classes \['chat'\] are unknown"):
        slo_mix(10, rate=1.0, mix={"chat": 1.0}, vocab=(10, 100))
    with pytest.raises(ValueError, match="scale=0.5 must be >= 1"):
        slo_mix(10, rate=1.0, scale=0.5, vocab=(10, 100))


def _tool(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_slo.py"), *args], capture_output=True,
                          text=True, timeout=300)


def test_bench_slo_simulated_part_runs_at_tiny_size(tmp_path):
    out = tmp_path / "slo.md"
    proc = _tool("--smoke", "--parts=sim", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    assert "## Simulated: 1 replica" in text and "| 16 | slo |" in text and "| 4 | first_come |" in text
    proc = _tool("--parts=sim", "--policies=slo")
    assert proc.returncode != 0 and "must include first_come" in proc.stderr


@pytest.mark.slow  # ~80 s: three server processes start and serve two loads each
def test_bench_slo_live_part_runs_at_tiny_size():
    proc = _tool("--smoke", "--parts=live", f"--config={os.path.join(ROOT, 'configs', 'test_5m.py')}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "## Live: test-5m" in proc.stdout and "| 16 | strict_priority |" in proc.stdout
