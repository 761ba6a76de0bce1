"""Static partitions against the adaptive-TP controller, in the simulator, on one workload.

Candidates (`static_partitions`): every multiset of TP degrees filling the devices with every
instance shared by all tiers; for each multiset, the tier assignment the controller's objective
ranks first at the workload's average arrival rates (dedicated instances); and the controller's
own plan for each phase's rates, held for the whole run. Each serves the same requests in
scheduler/simulation/nitsum_sim.py (StaticControl), as does the adaptive controller (NitsumControl); the
best static one is the one with the highest overall goodput (SLO-met requests per second over
every judged tier).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Callable, Mapping, Sequence

from jinfer.config import Tier
from scheduler.adaptive_tp.nitsum import (Controller, InstancePlan, NitsumControl, Partition, Profile, predicted_goodput,
                                          size_multisets)
from scheduler.adaptive_tp.profile import Phase, average_rates
from scheduler.cost_model import CostModel
from scheduler.simulation.nitsum_sim import AdaptiveSimulator, ReconfigModel, StaticControl
from scheduler.simulation.simulator import ReplicaConfig
from scheduler.simulation.workloads import WorkItem


def best_assignment(controller: Controller, sizes: Sequence[int], rates: Mapping[str, float]) -> Partition:
    """The tier for each instance of `sizes` that maximises the controller's objective at
    `rates` (ties: the smallest capacity / arrivals any tier is left with, largest first), as
    Controller.plan ranks assignments, restricted to this multiset."""
    active = sorted(t for t, r in rates.items() if r > 0 and t in controller.tiers and controller.tiers[t].judged)
    if not active:
        return Partition(tuple(InstancePlan(d) for d in sizes)).canonical()
    best, best_key, seen = None, None, set()
    for tiers in itertools.product(active, repeat=len(sizes)):
        p = Partition(tuple(InstancePlan(d, t) for d, t in zip(sizes, tiers))).canonical()
        if p in seen:
            continue
        seen.add(p)
        cap = {t: sum(controller.profile.rate(t, i.tp) for i in p.instances if i.tier == t) for t in active}
        headroom = min(min(cap[t] / rates[t], 10.0) for t in active)
        key = (round(controller.objective(p, rates, {}), 9), round(headroom, 9))
        if best_key is None or key > best_key:
            best, best_key = p, key
    return best


def static_partitions(controller: Controller, phases: Sequence[Phase]) -> list[tuple[str, Partition]]:
    """(how it was chosen, partition) for every static candidate (module docstring), each
    partition once (the first way it was found)."""
    out: list[tuple[str, Partition]] = []
    seen: set[Partition] = set()

    def add(label, p):
        p = p.canonical()
        if p not in seen:
            seen.add(p)
            out.append((label, p))

    multisets = size_multisets(controller.num_devices, controller.degrees)
    for sizes in multisets:
        add("shared", Partition(tuple(InstancePlan(d) for d in sizes)))
    avg = average_rates(phases)
    for sizes in multisets:
        add("dedicated, average rates", best_assignment(controller, sizes, avg))
    for k, phase in enumerate(phases):
        add(f"plan for phase {phase.name or k + 1}", controller.plan(phase.rates, {}))
    return out


def dedicated_partitions(controller: Controller) -> list[Partition]:
    """Every partition of the controller's devices into instances of its degrees, each
    dedicated to one of its judged tiers (equal ones once)."""
    tiers = sorted(t.name for t in controller.tiers.values() if t.judged)
    out = set()
    for sizes in size_multisets(controller.num_devices, controller.degrees):
        for names in itertools.product(tiers, repeat=len(sizes)):
            out.add(Partition(tuple(InstancePlan(d, t) for d, t in zip(sizes, names))).canonical())
    return sorted(out, key=str)


def profile_bound(controller: Controller, phases: Sequence[Phase]) -> tuple[float, Partition, float]:
    """What the profile alone promises (predicted goodput: sum over tiers of min(profile
    capacity, arrivals), dedicated instances, no interference, switches free): (the best single
    partition's req/s averaged over the phases, that partition, the req/s of the best partition
    for each phase, averaged). Their ratio bounds what switching partitions can gain."""
    parts = dedicated_partitions(controller)
    total = sum(p.duration_s for p in phases)
    per_phase = [[predicted_goodput(part, controller.profile, p.rates) for part in parts] for p in phases]
    static = [sum(g[k] * p.duration_s for g, p in zip(per_phase, phases)) / total for k in range(len(parts))]
    best = max(range(len(parts)), key=lambda k: static[k])
    switching = sum(max(g) * p.duration_s for g, p in zip(per_phase, phases)) / total
    return static[best], parts[best], switching


@dataclasses.dataclass
class StudyRun:
    """One configuration's run: its tier_stats (scheduler.simulation.simulator.SimResult.tier_stats), the
    reconfigurations the simulator made, the controller's decisions (adaptive only)."""

    label: str
    partition: str  # the static partition, or "adaptive"
    policy: str
    stats: dict
    reconfigurations: list
    decisions: list = dataclasses.field(default_factory=list)
    wall_s: float = 0.0

    @property
    def goodput(self) -> float:
        return self.stats["all"]["goodput_rps"]

    def weighted_goodput(self, tiers: Sequence[Tier]) -> float:
        return sum(t.weight * self.stats["tiers"][t.name]["goodput_rps"] for t in tiers if t.judged)


@dataclasses.dataclass
class Study:
    """What every run shares: the simulated node and the workload."""

    costs: Mapping[int, CostModel]
    tiers: Sequence[Tier]
    items: list[WorkItem]
    replica: ReplicaConfig = ReplicaConfig()
    reconfig: ReconfigModel = ReconfigModel()
    num_devices: int = 8
    window_s: float = 1.0

    def run(self, control, label: str, partition: str, policy: Callable | None, policy_name: str) -> StudyRun:
        t0 = time.perf_counter()
        sim = AdaptiveSimulator(control, self.costs, self.tiers, self.replica, policy=policy,
                                reconfig=self.reconfig, num_devices=self.num_devices)
        res = sim.run(self.items)
        decisions = getattr(getattr(control, "controller", None), "history", [])
        return StudyRun(label, partition, policy_name, res.tier_stats(), sim.reconfigurations,
                        [d for d in decisions if d.switched], time.perf_counter() - t0)

    def static(self, label: str, partition: Partition, policy: Callable | None, policy_name: str) -> StudyRun:
        return self.run(StaticControl(partition, self.window_s), label, str(partition), policy, policy_name)


def modelled_pause(reconfig: ReconfigModel) -> Callable[[Partition, Partition], float]:
    """The controller's estimate of a reconfiguration's pause: the fixed part plus one full
    copy of the weights over the link (an upper bound on what a regroup moves)."""
    seconds = reconfig.seconds(reconfig.weight_bytes, 0)
    return lambda old, new: seconds


def reconfiguration_summary(run: StudyRun) -> dict:
    """count, pause_s (summed), weight bytes moved / minimum / full reload, KV tokens and
    requests migrated, over the run's reconfigurations."""
    rs = run.reconfigurations
    return {"count": len(rs), "pause_s": sum(r.pause_s for r in rs),
            "weight_bytes": sum(r.weight_bytes for r in rs), "weight_minimum": sum(r.weight_minimum for r in rs),
            "weight_full_reload": sum(r.weight_full_reload for r in rs),
            "kv_tokens": sum(r.kv_tokens for r in rs), "requests_migrated": sum(r.requests_migrated for r in rs)}


def goodput_table(runs: Sequence[StudyRun], tiers: Sequence[Tier], baseline: StudyRun | None = None) -> str:
    """Markdown: one row per run: per tier goodput req/s (attainment), overall and weighted
    goodput, and overall goodput / the baseline's."""
    judged = [t for t in tiers if t.judged]
    head = ["configuration", "chosen as", "policy"] + [f"{t.name} req/s (att.)" for t in judged] + \
        ["overall req/s", "overall att.", "weighted req/s"] + (["vs best static"] if baseline else [])
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (len(head) - 3)]
    for r in runs:
        cells = [f"`{r.partition}`", r.label, r.policy]
        for t in judged:
            s = r.stats["tiers"][t.name]
            cells.append(f"{s['goodput_rps']:.2f} ({s['attainment']:.2f})")
        cells += [f"{r.goodput:.2f}", f"{r.stats['all']['attainment']:.3f}", f"{r.weighted_goodput(tiers):.2f}"]
        if baseline:
            cells.append(f"{r.goodput / baseline.goodput:.2f}x" if baseline.goodput else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def make_controller(profile: Profile, tiers: Sequence[Tier], num_devices: int, *, initial: Partition | None = None,
                    **kw) -> Controller:
    """A Controller over the profile's degrees (those that fit), other arguments as Controller's."""
    degrees = [d for d in profile.degrees if d <= num_devices]
    return Controller(profile, tiers, num_devices, degrees=degrees, initial=initial, **kw)


def adaptive_control(profile: Profile, tiers: Sequence[Tier], num_devices: int, **kw) -> NitsumControl:
    return NitsumControl(make_controller(profile, tiers, num_devices, **kw))
