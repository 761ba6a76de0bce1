"""The adaptive-TP simulator (scheduler/simulation/nitsum_sim.py): reconfigurations mid-run finish every
request, return every page, cost what the model says, and repeat exactly."""

import numpy as np
import pytest

from jinfer.config import Tier
from scheduler.adaptive_tp.nitsum import Partition
from scheduler.cost_model import analytic_8b_h100_tp
from scheduler.simulation.nitsum_sim import AdaptiveSimulator, ReconfigModel, StaticControl
from scheduler.simulation.simulator import ReplicaConfig
from scheduler.simulation.workloads import WorkItem
from scheduler.slo.policies import SloAware

TIERS = (Tier("interactive", 0.25, 0.03, 4), Tier("batch", 5.0, 0.1, 1))
COSTS = {tp: analytic_8b_h100_tp(tp) for tp in (1, 2, 4, 8)}
CFG = ReplicaConfig(num_pages=4000, max_num_batched_tokens=2048, max_num_seqs=64)


class Scripted(StaticControl):
    """Plays a list of partitions, one per window."""

    def __init__(self, partitions, window_s=1.0):
        super().__init__(Partition.parse(partitions[0]), window_s)
        self.script = [Partition.parse(p) if p else None for p in partitions[1:]]

    def decide(self, now):
        nxt = self.script.pop(0) if self.script else None
        if nxt is not None:
            self.partition = nxt
        return None if nxt is None else nxt.sizes


def _items(n=120, seed=0):
    rng = np.random.default_rng(seed)
    out, t = [], 0.0
    for _ in range(n):
        t += rng.exponential(0.05)
        tier = "interactive" if rng.random() < 0.6 else "batch"
        out.append(WorkItem(prompt=tuple(rng.integers(0, 30000, int(rng.integers(100, 1500))).tolist()),
                            max_tokens=int(rng.integers(20, 300)), arrival_s=t, tier=tier))
    return out


def _run(control, items, **kw):
    sim = AdaptiveSimulator(control, COSTS, TIERS, CFG, policy=lambda clock: SloAware(clock=clock), **kw)
    return sim, sim.run(items)


def test_reconfigurations_mid_run_finish_everything_and_return_every_page():
    items = _items()
    script = ["tp2:* + tp2:* + tp2:* + tp2:*", None, "tp8:*", None, "tp4:interactive + tp2:batch + tp1:batch + tp1:batch",
              "tp2:* + tp2:* + tp2:* + tp2:*"]
    sim, res = _run(Scripted(script, window_s=1.0), items)
    assert [r.new for r in sim.reconfigurations] == [(8,), (4, 2, 1, 1), (2, 2, 2, 2)]
    assert all(not r.error and r.output_tokens == it.max_tokens for r, it in zip(res.records, items))
    assert sum(r.requests_migrated for r in sim.reconfigurations) > 0  # 2+2+2+2 -> 8 merged busy instances
    for r in sim.reconfigurations:
        assert r.weight_bytes <= r.weight_full_reload
        assert r.pause_s == pytest.approx(ReconfigModel().seconds(r.weight_bytes, r.kv_tokens))
    for inst in sim.instances:
        assert not inst.reqs and not inst.sched.running and not inst.sched.waiting
        inst.sched.prefix_cache.clear()
        assert inst.sched.kv.num_free == CFG.num_pages
    # Deterministic: the same run gives the same records.
    _, again = _run(Scripted(script, window_s=1.0), items)
    assert [(r.first_token_s, r.finish_s, r.replica) for r in again.records] == \
        [(r.first_token_s, r.finish_s, r.replica) for r in res.records]


def test_weights_move_only_what_devices_lack():
    model = ReconfigModel(weight_bytes=8.0)
    old = [(4, frozenset(range(4))), (4, frozenset(range(4, 8)))]
    # 4+4 -> 8 keeping the first: devices 0-3 already hold their 1/8 (inside their 1/4); devices
    # 4-7 receive theirs (live, the kept instance reshards from its own arrays only).
    assert model.weight_move(old, [(8, frozenset(range(8)))], {0: 0}) == pytest.approx(4 * 8.0 / 8)
    # 4+4 -> 2+2+2+2: every device keeps its half of what it needs... it needs 1/2 and holds 1/4.
    new = [(2, frozenset({0, 1})), (2, frozenset({2, 3})), (2, frozenset({4, 5})), (2, frozenset({6, 7}))]
    assert model.weight_move(old, new, {0: 0, 1: 0, 2: 1, 3: 1}) == pytest.approx(8 * (0.5 - 0.25) * 8.0)


def test_the_reconfiguration_model_fits_measured_pauses():
    # Pauses of 0.2 s + bytes at 1 GB/s are recovered exactly.
    fit = ReconfigModel.fit([(0.2 + b / 1e9, b) for b in (0.0, 1e8, 5e8, 2e8)], weight_bytes=3e8,
                            kv_bytes_per_token=100.0)
    assert fit.fixed_s == pytest.approx(0.2) and fit.bandwidth == pytest.approx(1e9)
    assert (fit.weight_bytes, fit.kv_bytes_per_token) == (3e8, 100.0)
    assert fit.seconds(1e8, 10) == pytest.approx(0.2 + (1e8 + 1000) / 1e9)
    # Pauses that do not grow with bytes: their median, bytes free.
    flat = ReconfigModel.fit([(0.5, 1e8), (0.3, 2e8), (0.4, 3e8)], 1.0, 1.0)
    assert flat.fixed_s == pytest.approx(0.4) and flat.seconds(1e12, 0) == pytest.approx(0.4)
    # A fit whose intercept would be negative goes through the origin.
    steep = ReconfigModel.fit([(0.0, 1e8), (1.0, 2e8)], 1.0, 1.0)
    assert steep.fixed_s == 0.0 and steep.bandwidth > 0
    with pytest.raises(ValueError, match="at least one"):
        ReconfigModel.fit([], 1.0, 1.0)


def test_a_static_partition_routes_tiers_to_their_instances():
    sim, res = _run(StaticControl(Partition.parse("tp4:interactive + tp4:batch")), _items(40))
    assert not sim.reconfigurations
    assert {r.replica for r in res.records if r.tier == "interactive"} == {0}
    assert {r.replica for r in res.records if r.tier == "batch"} == {1}
    with pytest.raises(ValueError, match=r"no cost model for TP degrees \[16\]"):
        AdaptiveSimulator(StaticControl(Partition.parse("tp16:*")), COSTS, TIERS, num_devices=16)


def test_group_matching_keeps_busy_instances_on_their_devices():
    """jinfer.device_groups.match_groups, which Instances.regroup and the simulator share: busy
    instances first, each to the free group it overlaps most; a dropped busy one hands its
    requests to the group it overlaps most; a new group copies weights from its best overlap."""
    from jinfer.device_groups import consecutive_groups, match_groups
    old = consecutive_groups([2, 2, 2, 2])  # {0,1} {2,3} {4,5} {6,7}
    new = consecutive_groups([4, 2, 2])  # {0..3} {4,5} {6,7}
    m = match_groups(old, new, [False, True, False, True])
    assert m.kept == {1: 0, 3: 2, 2: 1}  # busy 1 and 3 first (ties: lower new index), then idle 2
    assert m.heirs == {} and m.dropped(4) == [0] and m.sources == {}
    m = match_groups(consecutive_groups([4, 4]), consecutive_groups([8]), [True, True])
    assert m.kept == {0: 0} and m.heirs == {1: 0} and m.sources == {}
    m = match_groups(consecutive_groups([8]), consecutive_groups([2, 2, 4]), [True])
    assert m.kept == {0: 2} and m.sources == {0: 0, 1: 0} and not m.heirs  # to its largest overlap
