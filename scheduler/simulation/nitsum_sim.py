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
import heapq
from typing import Callable, Mapping, Sequence

from jinfer.config import CacheConfig, SchedulerConfig, Tier
from jinfer.request import Request, Status
from jinfer.sampling_params import SamplingParams
from jinfer.scheduling import Scheduler
from jinfer.scheduling_policy import AdmissionRefused
from scheduler.adaptive_tp.nitsum import Partition, route
from scheduler.cost_model import CostModel
from scheduler.simulation.simulator import ReplicaConfig, RequestRecord, SimResult
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


class _Instance:
    def __init__(self, tp: int, devices: frozenset, sched: Scheduler, cost: CostModel):
        self.tp, self.devices, self.sched, self.cost = tp, devices, sched, cost
        self.busy = False
        self.plan = None
        self.gen = 0
        self.paused_until = 0.0
        self.reqs: dict[str, tuple[Request, RequestRecord]] = {}


def _groups(sizes: Sequence[int]) -> list[frozenset]:
    out, at = [], 0
    for s in sizes:
        out.append(frozenset(range(at, at + s)))
        at += s
    return out


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
        self.instances = [self._instance(tp, g) for tp, g in zip(control.sizes, _groups(control.sizes))]
        self.reconfigurations: list[SimReconfiguration] = []
        self._params: dict[int, SamplingParams] = {}

    def _instance(self, tp: int, devices: frozenset) -> _Instance:
        cfg = self.cfg
        policy = self.policy(lambda: self.now) if self.policy is not None else None
        sched = Scheduler(CacheConfig(page_size=cfg.page_size, num_pages=cfg.num_pages),
                          SchedulerConfig(max_num_batched_tokens=cfg.max_num_batched_tokens,
                                          max_num_seqs=cfg.max_num_seqs, max_model_len=cfg.max_model_len),
                          cfg.num_pages, policy)
        if hasattr(policy, "bind"):
            policy.bind(sched)
        if tp not in self.costs:
            raise ValueError(f"no cost model for TP degree {tp}; have {sorted(self.costs)}")
        return _Instance(tp, devices, sched, self.costs[tp])

    def _sampling(self, max_tokens: int) -> SamplingParams:
        p = self._params.get(max_tokens)
        if p is None:
            p = self._params[max_tokens] = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        return p

    # -- the event loop --------------------------------------------------------------------------

    def run(self, items: list[WorkItem], until_s: float | None = None) -> SimResult:
        events: list = []
        seq = 0
        for i, it in enumerate(items):
            if isinstance(it.prompt, str):
                raise ValueError("the simulator needs token-id prompts")
            if it.tier and it.tier not in self._rank:
                raise ValueError(f"item {i} names tier {it.tier!r}; known: {list(self._rank)}")
            events.append((it.arrival_s, seq, _ARRIVAL, i))
            seq += 1
        end = until_s if until_s is not None else max((it.arrival_s for it in items), default=0.0)
        w = self.control.window_s
        for k in range(1, int(end / w) + 1):
            events.append((k * w, seq, _WINDOW, None))
            seq += 1
        heapq.heapify(events)
        self._events, self._seq = events, seq
        records: list[RequestRecord] = [None] * len(items)
        self._arrived: dict[str, int] = {}
        self._served: dict[str, int] = {}
        self._pending = None  # sizes waiting for the instances to finish their steps
        self._held: list[int] = []  # items that arrived meanwhile
        self._items, self._records = items, records
        steps = 0
        while events:
            now, _, kind, data = heapq.heappop(events)
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

    def _push(self, t: float, kind: int, data) -> None:
        heapq.heappush(self._events, (t, self._seq, kind, data))
        self._seq += 1

    def _arrive(self, items, i: int, records, counted: bool = False) -> None:
        """Routes item i now (at its arrival, or when a reconfiguration that held it applies)."""
        it = items[i]
        rank, tier = self._rank.get(it.tier or (self.tiers[0].name if self.tiers else ""), (0, None))
        name = tier.name if tier is not None else ""
        n = len(it.prompt)
        if n + it.max_tokens > min(self.cfg.max_model_len, self.cfg.capacity_tokens):
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
        req = Request(str(i), list(it.prompt), self._sampling(it.max_tokens), 0, it.arrival_s, i, priority=rank,
                      tier=tier)
        try:  # the policy's admission check, as the engine runs it (SloAware(admission=True))
            inst.sched.admit(req)
        except AdmissionRefused as e:
            rec.error = f"refused: {e}"
            return
        inst.reqs[req.request_id] = (req, rec)
        inst.sched.add(req)
        if not inst.busy:
            self._start(inst)

    def _start(self, inst: _Instance) -> None:
        if inst.busy or self.now < inst.paused_until or self._pending is not None:
            return  # (while a reconfiguration waits for running steps, none starts)
        plan = inst.sched.schedule()
        if not plan.seqs:
            return
        dt = inst.cost.step_time((len(s.token_ids), s.start_pos) for s in plan.seqs)
        inst.sched.observe_step(plan.num_tokens, dt)
        inst.busy, inst.plan = True, plan
        inst.gen += 1
        self._push(self.now + dt, _STEP_DONE, (inst, inst.gen))

    def _finish_step(self, inst: _Instance) -> None:
        plan = inst.plan
        reqs = [inst.reqs[s.request_id][0] for s in plan.seqs]
        tokens = [1_000_000 + len(r.output_ids) for r in reqs]
        for done in inst.sched.update(plan, reqs, tokens):
            req = done.req
            _, rec = inst.reqs[req.request_id]
            if req.first_token_time is None:
                req.first_token_time = rec.first_token_s = self.now
                rec.cached_tokens = req.num_cached_prompt_tokens
            if done.finish_reason:
                req.finish_time = rec.finish_s = self.now
                rec.output_tokens = len(req.output_ids)
                del inst.reqs[req.request_id]
                if req.tier is not None and req.tier.met(rec.ttft_s, rec.tpot_s):
                    self._served[req.tier.name] = self._served.get(req.tier.name, 0) + 1

    # -- reconfiguration -------------------------------------------------------------------------

    def _match(self, sizes) -> tuple[dict[int, int], list[frozenset]]:
        """Old instance -> new position, as Instances.regroup matches them."""
        groups = _groups(sizes)
        busy = [bool(i.reqs) for i in self.instances]
        pairs = sorted((not busy[i], -len(self.instances[i].devices & groups[j]), i, j)
                       for i in range(len(self.instances)) for j in range(len(groups)))
        kept: dict[int, int] = {}
        for _, _, i, j in pairs:
            if i not in kept and j not in kept.values():
                kept[i] = j
        return kept, groups

    def _try_reconfigure(self) -> None:
        if any(i.busy for i in self.instances):
            return  # each finishes the step it runs first
        sizes, self._pending = self._pending, None
        old = [(i.tp, i.devices) for i in self.instances]
        kept, groups = self._match(sizes)
        new: list[_Instance | None] = [None] * len(sizes)
        source: dict[int, int] = {}
        touched: set[int] = set()  # new positions that pause
        for i, j in kept.items():
            inst = self.instances[i]
            if (inst.tp, inst.devices) != (sizes[j], groups[j]):
                touched.add(j)
            inst.tp, inst.devices, inst.cost = sizes[j], groups[j], self.costs[sizes[j]]
            new[j], source[j] = inst, i
        for j in range(len(sizes)):
            if new[j] is None:
                new[j] = self._instance(sizes[j], groups[j])
                source[j] = max(range(len(old)), key=lambda i: (len(old[i][1] & groups[j]), -i))
                touched.add(j)
        migrated, kv_tokens = 0, 0
        for i, inst in enumerate(self.instances):
            if i in kept or not inst.reqs:
                continue
            j = max(range(len(groups)), key=lambda j: (len(inst.devices & groups[j]), -j))
            migrated += len(inst.reqs)
            kv_tokens += self._migrate(inst, new[j], j)
            touched.add(j)
        weights = self.reconfig.weight_move(old, [(n.tp, n.devices) for n in new], source)
        pause = self.reconfig.seconds(weights, kv_tokens)
        self.reconfigurations.append(SimReconfiguration(
            self.now, tuple(o[0] for o in old), tuple(sizes), pause, weights, weights,
            self.reconfig.weight_bytes * len(sizes), kv_tokens, migrated))
        self.instances = new
        for j, inst in enumerate(new):  # the touched ones pause; every one resumes stepping
            inst.paused_until = self.now + pause if j in touched else self.now
            self._push(inst.paused_until, _RESUME, inst)
        held, self._held = self._held, []
        for i in held:
            self._arrive(self._items, i, self._records, counted=True)

    def _migrate(self, src: _Instance, dst: _Instance, j: int) -> int:
        """Moves src's requests into dst with the scheduler's migration methods, as
        Engine.export_requests / import_requests do (Scheduler.detach, take_pages, adopt): K/V
        kept where dst has room, else recomputed; returns KV tokens moved."""
        moved, carried = 0, set()
        reqs = [r for r, _ in src.reqs.values()]
        src.sched.detach(reqs)
        page = self.cfg.page_size
        reqs.sort(key=lambda r: r.arrival_index)
        for req in reqs:
            computed = req.num_computed_tokens
            if req.status is Status.RUNNING and computed and dst.sched.take_pages(req, -(-computed // page) * page):
                carried.add(req.request_id)
                moved += computed
        dst.sched.adopt(reqs, carried, held=())
        for req in reqs:
            _, rec = src.reqs[req.request_id]
            rec.replica = j
            dst.reqs[req.request_id] = (req, rec)
        src.reqs.clear()
        return moved
