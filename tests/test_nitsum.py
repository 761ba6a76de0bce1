"""The adaptive-TP controller (scheduler/adaptive_tp/nitsum.py) on hand-built load shifts: its choice, its
hysteresis, and routing."""

import pytest

from jinfer.config import Tier
from scheduler.adaptive_tp.nitsum import Controller, InstancePlan, Partition, Profile, predicted_goodput, route

# Interactive requests need tp >= 2 to meet their TPOT; batch throughput per device is best at tp 1.
PROFILE = Profile({"interactive": {1: 0, 2: 4, 4: 10, 8: 16}, "batch": {1: 3, 2: 5, 4: 8, 8: 12},
                   "agent": {1: 1, 2: 3, 4: 6, 8: 9}})
TIERS = [Tier("interactive", 0.5, 0.05, 4), Tier("agent", 3.0, 0.2, 2), Tier("batch", 20.0, 1.0, 1),
         Tier("background", best_effort=True)]


def _controller(**kw):
    kw = {"confirm": 2, "min_dwell_s": 3.0, "horizon_s": 10.0, "reconfig_s": lambda old, new: 0.5, **kw}
    return Controller(PROFILE, TIERS, 8, **kw)


def test_partition_strings_round_trip_and_name_bad_parts():
    p = Partition.parse("tp4:interactive + tp2:batch + tp1:* + tp1:*")
    assert p.sizes == (4, 2, 1, 1) and p.instances[2] == InstancePlan(1, "")
    assert Partition.parse(str(p)) == p
    with pytest.raises(ValueError, match="'x4:batch'"):
        Partition.parse("tp4:a + x4:batch")


@pytest.mark.parametrize("rates, want", [
    # An interactive burst: most devices in high-degree interactive instances.
    ({"interactive": 12, "batch": 1}, "tp4:interactive + tp2:batch + tp2:interactive"),
    # A batch phase: tp-1 batch instances, but the small interactive stream keeps a tp-2 one
    # (tp 1 cannot serve it at all; a greedy pass by efficiency would have given it nothing).
    ({"interactive": 0.5, "batch": 20}, "tp2:interactive + " + " + ".join(["tp1:batch"] * 6)),
    # Three tiers at once.
    ({"interactive": 3, "batch": 6, "agent": 4}, "tp4:agent + tp2:interactive + tp1:batch + tp1:batch"),
    # No demand: every device a shared tp-1 instance.
    ({}, " + ".join(["tp1:*"] * 8)),
])
def test_plan_follows_the_load(rates, want):
    c = _controller()
    plan = c.plan(rates, {})
    assert str(plan) == want and plan.num_devices == 8
    # No other partition serves more weighted goodput (what the controller maximises).
    others = ["tp8:interactive", "tp8:batch", "tp4:interactive + tp4:batch", " + ".join(["tp2:batch"] * 4),
              "tp2:interactive + tp2:interactive + tp4:batch", " + ".join(["tp1:batch"] * 8)]
    assert all(_weighted(plan, rates) >= _weighted(Partition.parse(s), rates) for s in others)


def _weighted(partition, rates):
    weight = {t.name: t.weight for t in TIERS}
    return sum(weight[t] * predicted_goodput(partition, PROFILE, {t: r}) for t, r in rates.items())


def test_a_starving_tier_weighs_more():
    c = _controller()
    rates = {"interactive": 6, "batch": 9}
    assert str(c.plan(rates, {})) == "tp4:interactive + tp1:batch + tp1:batch + tp1:batch + tp1:batch"
    # batch served a quarter of its arrivals lately: it gets capacity for all of them
    starved = c.plan(rates, {"batch": 4.0})
    assert sum(PROFILE.rate("batch", i.tp) for i in starved.instances if i.tier == "batch") >= 9


def _feed(c, rates, windows, t0):
    out = []
    for k in range(windows):
        c.observe({t: int(r) for t, r in rates.items()})
        out.append(c.decide(t0 + k))
    return out


def test_a_load_shift_switches_once_after_confirmation_and_dwell():
    c = _controller(smoothing=1.0)
    burst = _feed(c, {"interactive": 12, "batch": 1}, 3, t0=10.0)
    assert burst[0] is None and str(burst[1]) == "tp4:interactive + tp2:batch + tp2:interactive"
    assert burst[2] is None and c.history[2].reason == "same partition"
    # A shift within the dwell time waits, then switches once confirmed.
    shift = _feed(c, {"interactive": 1, "batch": 20}, 5, t0=12.0)
    assert [d is not None for d in shift] == [False, False, True, False, False]
    assert "seen 1 of 2" in c.history[3].reason and "dwell" in c.history[4].reason
    assert str(c.current).startswith("tp2:interactive + tp1:batch")


def test_hysteresis_ignores_small_gains_and_costly_reconfigurations():
    c = _controller(smoothing=1.0, hysteresis=0.5)
    _feed(c, {"interactive": 8, "batch": 4}, 2, t0=0.0)
    current = c.current
    # A mild change whose best partition gains < 50%: kept.
    assert _feed(c, {"interactive": 9, "batch": 6}, 4, t0=10.0) == [None] * 4
    assert c.current == current and any("gain too small" in d.reason for d in c.history[-4:])
    # A reconfiguration pause that eats more than the gain over the horizon: kept.
    slow = _controller(smoothing=1.0, reconfig_s=lambda old, new: 60.0)
    _feed(slow, {"interactive": 8, "batch": 4}, 2, t0=0.0)
    before = slow.current
    assert _feed(slow, {"interactive": 0.5, "batch": 20}, 3, t0=10.0) == [None] * 3
    assert slow.current == before and "reconfiguration" in slow.history[-1].reason


def test_alternating_load_does_not_thrash():
    c = _controller(smoothing=1.0, confirm=2)
    switches = 0
    for k in range(20):
        rates = {"interactive": 12, "batch": 1} if k % 2 else {"interactive": 0.5, "batch": 20}
        c.observe({t: int(r) for t, r in rates.items()})
        switches += c.decide(float(k)) is not None
    assert switches == 0  # no partition was the best two windows running


def test_a_shared_partition_that_serves_every_tier_stays_until_one_starves():
    shared = Partition.parse("tp2:* + tp2:* + tp2:* + tp2:*")
    c = _controller(smoothing=1.0, confirm=1, min_dwell_s=0.0, initial=shared)
    load = {"interactive": 3, "batch": 6}
    # Four shared tp2 instances have time for both tiers (3/4 + 6/5 instance-seconds of 4),
    # and every request met its SLO: no dedicated partition gains enough to switch to.
    for k in range(4):
        c.observe(load, served=load)
        assert c.decide(float(k)) is None
    assert "gain too small" in c.history[-1].reason and c.current == shared
    # Interactive requests now miss their targets in the shared batches (a quarter served).
    for k in range(4, 8):
        c.observe(load, served={"interactive": 0.75, "batch": 6})
        if c.decide(float(k)) is not None:
            break
    assert c.current != shared and c.current.serving("interactive") and "interactive" in str(c.current)
    # Overloaded alike, shared or dedicated, the same devices score the same (starvation is
    # counted once: a shared tier scores what it was seen to be served).
    over, starved = {"batch": 24}, {"batch": 2.0}
    assert c.objective(Partition.parse("tp8:*"), over, starved) == \
        c.objective(Partition.parse("tp8:batch"), over, starved) == 1 * 2.0 * 12


def test_flapping_between_two_partitions_doubles_the_dwell_until_a_calm_spell():
    c = _controller(smoothing=1.0, confirm=1, min_dwell_s=2.0, flap_window_s=20.0)
    loads = [{"interactive": 12, "batch": 1}, {"interactive": 0.5, "batch": 20}]
    changes = []
    for k in range(40):  # the load flips every 4 s: each flip wants the other partition
        c.observe(loads[(k // 4) % 2])
        if c.decide(float(k)) is not None:
            changes.append(k)
    # dwell 2 s, then 4, 8, 16 (each change within 20 s of the one before): the flips at 12
    # and 32 are not followed
    assert changes == [0, 4, 8, 20] and c.dwell_s() == 16.0
    assert "dwell: 4.0 s < 8 s" in c.history[12].reason
    # Without damping it follows every flip.
    plain = _controller(smoothing=1.0, confirm=1, min_dwell_s=2.0, flap_window_s=0.0)
    flips = 0
    for k in range(40):
        plain.observe(loads[(k // 4) % 2])
        flips += plain.decide(float(k)) is not None
    assert flips == 10
    # After a calm spell of flap_window_s the run is over: the next change waits min_dwell_s.
    c.observe(loads[0])
    assert c.decide(60.0) is not None and c.dwell_s() == 2.0
    c.observe(loads[1])
    assert c.decide(61.0) is None and c.decide(62.0) is not None
    # A flapper held at the cap stays in its run: changes at least flap_window_s apart for good.
    held = _controller(smoothing=1.0, confirm=1, min_dwell_s=2.0, flap_window_s=20.0)
    times = []
    for k in range(200):
        held.observe(loads[(k // 4) % 2])
        if held.decide(float(k)) is not None:
            times.append(k)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps[:3] == [4, 4, 12] and min(gaps[4:]) >= 20 and len(times) <= 12


def test_route_prefers_the_tiers_least_loaded_instance_else_best_effort():
    p = Partition.parse("tp4:interactive + tp2:interactive + tp1:batch + tp1:batch")
    assert route(p, "interactive", [5, 2, 0, 0]) == (1, True)
    assert route(p, "batch", [0, 0, 3, 1]) == (3, True)
    assert route(p, "agent", [5, 2, 3, 1]) == (3, False)  # no instance of its tier: least loaded of all
    shared = Partition.parse("tp4:* + tp4:*")
    assert route(shared, "interactive", [2, 1]) == (1, True)


def test_bad_controller_settings_are_named():
    with pytest.raises(ValueError, match=r"degrees=\[16\]"):
        Controller(PROFILE, TIERS, 8, degrees=(16,))
    with pytest.raises(ValueError, match="initial partition tp8:batch \\+ tp4:batch needs 12 devices"):
        Controller(PROFILE, TIERS, 8, initial=Partition.parse("tp8:batch + tp4:batch"))
    with pytest.raises(ValueError, match="tp=0"):
        Profile({"batch": {0: 1.0}})
