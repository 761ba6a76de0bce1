"""Discrete-event simulation of adaptive tensor parallelism: instances of different TP degrees
on one node's devices, a topology controller that re-partitions them while requests run.

Each instance is jinfer's own Scheduler (as in scheduler/simulation/simulator.py) clocked by the cost
model of its TP degree. Requests go where the control routes them (NitsumControl: the tier's
least-loaded instance; StaticControl: a fixed partition), where the instance's policy may
refuse them at admission as the engine's does (SloAware(admission=True): the record then holds
the reason as its error and counts as a miss). Every `window_s` the control hears
the window's arrivals and SLO-met finishes per tier and may return new sizes; the simulator
then applies them as InstanceGroup.regroup does live:
  - instances are matched to the new device groups as Instances.regroup matches them (busy
    ones first, each to the free group it overlaps most); a kept instance keeps its scheduler
    (its requests and their KV) and takes the cost model of its new degree; a dropped busy
    instance's requests move to the new instance it overlaps most, keeping their computed
    tokens where the receiver has KV room (else they recompute, like a preemption);
  - every instance touched (kept with a new degree or group, created, or receiving migrants)
    finishes the step it is running, then pauses for the reconfiguration time
    `ReconfigModel.seconds` of the bytes that move, then resumes;
  - requests arriving while the running steps finish are held and routed once the new
    partition is in place (the control already routes by it, as InstanceGroup's does after
    its regroup).
The KV room of an instance is `ReplicaConfig.num_pages` whatever its degree (at 8B on 80 GB
devices KV room does not bind at these loads: an assumption, written here). Deterministic: the
same items, control and models give the same records.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Callable, Mapping, Sequence

from jinfer.config import Tier
from jinfer.device_groups import consecutive_groups, match_groups
from jinfer.request import Request
from scheduler.adaptive_tp.nitsum import Partition, route
from scheduler.cost_model import CostModel
from scheduler.simulation.core import EventQueue, ReplicaConfig, SimReplica, greedy
from jinfer.records import RequestRecord
from scheduler.simulation.records import SimResult
from scheduler.simulation.workloads import WorkItem

_ARRIVAL, _STEP_DONE, _WINDOW, _RESUME = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class ReconfigModel:
    """How long a reconfiguration pauses the instances it touches: fixed_s (synchronisation,
    switching to the new degree's precompiled programs) plus the bytes that cross devices at
    `bandwidth` bytes/s. weight_bytes: the model's weights (a device of a degree-d instance
    holds weight_bytes / d); kv_bytes_per_token: K and V of one token, all layers. The defaults
    are assumptions for an 8B bf16 model over NVLink (16 GB; 128 KiB; 300 GB/s; 0.25 s)."""

    fixed_s: float = 0.25
    bandwidth: float = 300e9
    weight_bytes: float = 16e9
    kv_bytes_per_token: float = 128 * 1024

    def weight_move(self, old: Sequence[tuple[int, frozenset]], new: Sequence[tuple[int, frozenset]],
                    source: Mapping[int, int]) -> float:
        """Bytes the new groups' devices lack: each device of a new instance of degree b needs
        1/b of the weights; a device that held a shard of degree a of the instance it comes
        from keeps min(1/a, 1/b) of it (the aligned part; what sharding.reshard moves)."""
        total = 0.0
        for j, (b, devices) in enumerate(new):
            i = source.get(j)
            a, held = old[i] if i is not None else (0, frozenset())
            for d in devices:
                have = min(1 / a, 1 / b) if d in held else 0.0
                total += (1 / b - have) * self.weight_bytes
        return total

    def seconds(self, weight_bytes: float, kv_tokens: int) -> float:
        return self.fixed_s + (weight_bytes + kv_tokens * self.kv_bytes_per_token) / self.bandwidth

    @classmethod
    def fit(cls, pauses: Sequence[tuple[float, float]], weight_bytes: float,
            kv_bytes_per_token: float) -> "ReconfigModel":
        """The model of measured pauses, (seconds, bytes moved) each: least squares of
        seconds = fixed_s + bytes / bandwidth with fixed_s >= 0 and bandwidth > 0 (when the fit
        gives neither, the pauses do not grow with bytes: fixed_s their median, bandwidth
        infinite). weight_bytes, kv_bytes_per_token: the measured model's."""
        if not pauses:
            raise ValueError("fit needs at least one measured pause")
        median = statistics.median(p for p, _ in pauses)
        n = len(pauses)
        mean_b, mean_s = sum(b for _, b in pauses) / n, sum(p for p, _ in pauses) / n
        var = sum((b - mean_b) ** 2 for _, b in pauses)
        slope = sum((b - mean_b) * (p - mean_s) for p, b in pauses) / var if var > 0 else 0.0
        if slope <= 0:
            return cls(median, float("inf"), weight_bytes, kv_bytes_per_token)
        fixed = mean_s - slope * mean_b
        if fixed < 0:  # through the origin instead
            fixed, slope = 0.0, sum(p * b for p, b in pauses) / sum(b * b for _, b in pauses)
        return cls(fixed, 1 / slope, weight_bytes, kv_bytes_per_token)


class StaticControl:
    """A fixed partition as a TopologyControl (the baselines): requests to the least-loaded
    instance serving their tier (every instance, for shared "*" ones)."""

    def __init__(self, partition: Partition, window_s: float = 1.0):
        self.partition, self.window_s = partition, window_s
        self.degrees = tuple(sorted(set(partition.sizes)))  # it never regroups: nothing else to compile

    @property
    def sizes(self) -> tuple[int, ...]:
        return self.partition.sizes

    def route(self, tier: str, outstanding: Sequence[int]) -> int:
        return route(self.partition, tier, outstanding)[0]

    def observe(self, arrived, served) -> None:
        pass

    def decide(self, now: float):
        return None


@dataclasses.dataclass
class SimReconfiguration:
    time_s: float
    old: tuple[int, ...]
    new: tuple[int, ...]
    pause_s: float
    weight_bytes: float
    weight_minimum: float  # the same bytes (the model moves only what devices lack)
    weight_full_reload: float  # every new device loading its whole shard
    kv_tokens: int
    requests_migrated: int


class _Instance(SimReplica):
    """A SimReplica on a device group, at a TP degree."""

    def __init__(self, tp: int, devices: frozenset, cfg: ReplicaConfig, cost: CostModel, policy):
        super().__init__(cfg, cost, policy)
        self.tp, self.devices = tp, devices


class AdaptiveSimulator:
    def __init__(self, control, costs: Mapping[int, CostModel], tiers: Sequence[Tier],
                 replica: ReplicaConfig = ReplicaConfig(), policy: Callable | None = None,
                 reconfig: ReconfigModel = ReconfigModel(), num_devices: int = 8):
        """control: NitsumControl or StaticControl (its `sizes` is the starting partition);
        costs: TP degree -> CostModel (e.g. cost_model.analytic_8b_h100_tp); policy: a
        callable(clock) -> SchedulingPolicy per instance (scheduler/slo/policies.py), None: FCFS within
        tiers."""
        missing = sorted(set(control.sizes) - set(costs))
        if missing:
            raise ValueError(f"no cost model for TP degrees {missing}; have {sorted(costs)}")
        if sum(control.sizes) > num_devices:
            raise ValueError(f"partition {list(control.sizes)} needs more than {num_devices} devices")
        self.control, self.costs, self.cfg, self.policy, self.reconfig = control, costs, replica, policy, reconfig
        self.tiers = tuple(tiers)
        self._rank = {t.name: (k, t) for k, t in enumerate(self.tiers)}
        self.num_devices = num_devices
        self.now = 0.0
        self.instances = [self._instance(tp, g) for tp, g in zip(control.sizes, consecutive_groups(control.sizes))]
        self.reconfigurations: list[SimReconfiguration] = []

    def _instance(self, tp: int, devices: frozenset) -> _Instance:
        if tp not in self.costs:
            raise ValueError(f"no cost model for TP degree {tp}; have {sorted(self.costs)}")
        policy = self.policy(lambda: self.now) if self.policy is not None else None
        return _Instance(tp, devices, self.cfg, self.costs[tp], policy)

    # -- the event loop --------------------------------------------------------------------------

    def run(self, items: list[WorkItem], until_s: float | None = None) -> SimResult:
        events = self._events = EventQueue()
        for i, it in enumerate(items):
            if isinstance(it.prompt, str):
                raise ValueError("the simulator needs token-id prompts")
            if it.tier and it.tier not in self._rank:
                raise ValueError(f"item {i} names tier {it.tier!r}; known: {list(self._rank)}")
            events.push(it.arrival_s, _ARRIVAL, i)
        end = until_s if until_s is not None else max((it.arrival_s for it in items), default=0.0)
        w = self.control.window_s
        for k in range(1, int(end / w) + 1):
            events.push(k * w, _WINDOW, None)
        records: list[RequestRecord] = [None] * len(items)
        self._arrived: dict[str, int] = {}
        self._served: dict[str, int] = {}
        self._pending = None  # sizes waiting for the instances to finish their steps
        self._held: list[int] = []  # items that arrived meanwhile
        self._items, self._records = items, records
        steps = 0
        while events:
            now, kind, data = events.pop()
            self.now = now
            if kind == _ARRIVAL:
                self._arrive(items, data, records)
            elif kind == _STEP_DONE:
                inst, gen = data
                if gen != inst.gen:
                    continue
                steps += 1
                self._finish_step(inst)
                inst.busy = False
                if self._pending is not None:
                    self._try_reconfigure()
                if not inst.busy:
                    self._start(inst)
            elif kind == _WINDOW:
                self.control.observe(dict(self._arrived), dict(self._served))
                self._arrived, self._served = {}, {}
                sizes = self.control.decide(now)
                if sizes is not None and tuple(sizes) != tuple(i.tp for i in self.instances):
                    self._pending = tuple(sizes)
                    self._try_reconfigure()
            else:  # _RESUME
                inst = data
                if inst in self.instances and not inst.busy:
                    self._start(inst)
        return SimResult(records, self.now, steps, self.tiers)

    def _arrive(self, items, i: int, records, counted: bool = False) -> None:
        """Routes item i now (at its arrival, or when a reconfiguration that held it applies)."""
        it = items[i]
        rank, tier = self._rank.get(it.tier or (self.tiers[0].name if self.tiers else ""), (0, None))
        name = tier.name if tier is not None else ""
        n = len(it.prompt)
        if not self.cfg.fits(n, it.max_tokens):
            records[i] = RequestRecord(i, -1, self.now, n, error="prompt + max_tokens exceeds the instance", tier=name)
            return
        if not counted:
            self._arrived[name] = self._arrived.get(name, 0) + 1
        if self._pending is not None:  # the control routes by the partition it just chose: wait for it
            self._held.append(i)
            return
        outstanding = [len(inst.reqs) for inst in self.instances]
        k = self.control.route(name, outstanding)
        inst = self.instances[k]
        rec = records[i] = RequestRecord(i, k, it.arrival_s, n, tier=name)
        req = Request(str(i), list(it.prompt), greedy(it.max_tokens), 0, it.arrival_s, i, priority=rank, tier=tier)
        if inst.admit(req, rec) and not inst.busy:  # (the engine's admission check: SloAware(admission=True))
            self._start(inst)

    def _start(self, inst: _Instance) -> None:
        if inst.busy or self.now < inst.paused_until or self._pending is not None:
            return  # (while a reconfiguration waits for running steps, none starts)
        dt = inst.start(self.now)
        if dt is not None:
            self._events.push(self.now + dt, _STEP_DONE, (inst, inst.gen))

    def _finish_step(self, inst: _Instance) -> None:
        for done, rec, _, _ in inst.settle(self.now):
            tier = done.req.tier
            if done.finish_reason and tier is not None and tier.met(rec.ttft_s, rec.tpot_s):
                self._served[tier.name] = self._served.get(tier.name, 0) + 1

    # -- reconfiguration -------------------------------------------------------------------------

    def _try_reconfigure(self) -> None:
        if any(i.busy for i in self.instances):
            return  # each finishes the step it runs first
        sizes, self._pending = self._pending, None
        old = [(i.tp, i.devices) for i in self.instances]
        groups = consecutive_groups(sizes)
        match = match_groups([i.devices for i in self.instances], groups, [bool(i.reqs) for i in self.instances])
        new: list[_Instance | None] = [None] * len(sizes)
        source: dict[int, int] = dict(match.sources)
        touched: set[int] = set()  # new positions that pause
        for i, j in match.kept.items():
            inst = self.instances[i]
            if (inst.tp, inst.devices) != (sizes[j], groups[j]):
                touched.add(j)
            inst.tp, inst.devices, inst.cost = sizes[j], groups[j], self.costs[sizes[j]]
            new[j], source[j] = inst, i
        for j in match.sources:
            new[j] = self._instance(sizes[j], groups[j])
            touched.add(j)
        migrated, kv_tokens = 0, 0
        for i, j in match.heirs.items():
            migrated += len(self.instances[i].reqs)
            kv_tokens += self._migrate(self.instances[i], new[j], j)
            touched.add(j)
        weights = self.reconfig.weight_move(old, [(n.tp, n.devices) for n in new], source)
        pause = self.reconfig.seconds(weights, kv_tokens)
        self.reconfigurations.append(SimReconfiguration(
            self.now, tuple(o[0] for o in old), tuple(sizes), pause, weights, weights,
            self.reconfig.weight_bytes * len(sizes), kv_tokens, migrated))
        self.instances = new
        for j, inst in enumerate(new):  # the touched ones pause; every one resumes stepping
            inst.paused_until = self.now + pause if j in touched else self.now
            self._events.push(inst.paused_until, _RESUME, inst)
        held, self._held = self._held, []
        for i in held:
            self._arrive(self._items, i, self._records, counted=True)

    def _migrate(self, src: _Instance, dst: _Instance, j: int) -> int:
        """Moves src's requests into dst with the scheduler's migration methods, as
        Engine.export_requests / import_requests do (Scheduler.kv_to_carry, detach, take_in):
        K/V kept where dst has room, else recomputed; returns the KV tokens moved."""
        reqs = sorted((r for r, _, _ in src.reqs.values()), key=lambda r: r.arrival_index)
        carried = src.sched.kv_to_carry(reqs)
        src.sched.detach(reqs)
        by_id = {r.request_id: r for r in reqs}
        moved = sum(by_id[carried[k][0]].num_computed_tokens for k in dst.sched.take_in(reqs, carried))
        for req in reqs:
            _, rec, handle = src.reqs[req.request_id]
            rec.replica = j
            dst.reqs[req.request_id] = (req, rec, handle)
        src.reqs.clear()
        return moved
