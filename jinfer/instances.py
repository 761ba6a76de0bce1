"""A host's devices split into instances: disjoint device groups, each an engine replica on its
own tp mesh (8 devices as 2xTP4, 4xTP2, 1xTP8, or mixed 4+2+1+1), and regrouping them while
requests run.

Regrouping maps old instances onto new device groups so that as many devices as possible keep
what they hold:
- instances with unfinished requests are placed first, each on the free group it overlaps most,
  then idle ones; an old instance left without a group is dropped, its unfinished requests
  handed to the new instance it overlaps most (Engine.export_requests / import_requests: the
  K/V of their computed tokens gathered in one batch and written into the receiver's pool,
  so they continue, token for token, where they were);
- a kept instance reshards onto its group (Engine.reshard: weights move only the slices each
  device lacks, KV pages migrate with their tables, running requests continue);
- a group left without an instance gets a new replica whose weights are copied from the old
  instance that overlapped it most, again moving only the slices its devices lack. Its KV pool
  is new and empty.
New replicas are built before kept instances move, so for a moment a device may hold both its
old and its new shards.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from typing import Mapping, Protocol, Sequence

import jax
from flax import nnx

from jinfer.config import Tier
from jinfer.device_groups import match_groups
from jinfer.engine import Engine, EngineLoad
from jinfer.programs import ProgramStore
from jinfer.request import RequestOutput
from jinfer.step_plan import SpecStats
from sharding.devices import partition_devices
from sharding.reshard import MoveStats, reshard_tree
from sharding.tp import TPLayout


def _device_set(mesh) -> set:
    return set(mesh.devices.flat)


@dataclasses.dataclass
class RegroupReport:
    """What regroup() did. Indices are instance positions before (old) and after (new)."""

    kept: dict[int, int]  # old -> new
    created: dict[int, int]  # new -> old instance its weights were copied from
    dropped: list[int]  # old
    weights: dict[int, MoveStats]  # new -> bytes its weights moved (kept or created)
    kv: dict[int, MoveStats]  # new -> bytes its KV pool moved (kept only)
    migrated: dict[int, tuple[int, int, MoveStats | None]] = dataclasses.field(default_factory=dict)
    """old (dropped) -> (new instance that took its requests, requests moved, K/V bytes moved)"""


class Instances:
    """Engine replicas on disjoint device groups of one host.

    `engines[i]` serves on `meshes[i]`. Every replica gets the same tokenizer and the same
    Engine keyword arguments (cache, scheduler, backend...), so each has its own KV pool and
    queue; a router in front decides which replica gets a request.
    """

    def __init__(self, model, tokenizer, sizes: Sequence[int], *, devices=None, policy_factory=None,
                 **engine_kwargs):
        """model: the weights (anywhere: each replica copies them onto its own shards). For a
        model too large for one device, load it sharded onto the first group's mesh
        (jinfer.loader.hf.load_sharded): the others then copy only the slices they lack.
        policy_factory: builds each replica's own SchedulingPolicy (policies keep per-engine
        state), bound to its scheduler when it has `bind`; None: the engines' default."""
        self.devices = list(jax.devices() if devices is None else devices)
        self.tokenizer = tokenizer
        self.engine_kwargs = engine_kwargs
        self.policy_factory = policy_factory
        # Every replica's compiled step programs, by mesh: a regroup takes those precompile()
        # or an earlier instance compiled instead of reading them back from disk.
        self.programs = ProgramStore()
        self.meshes = partition_devices(sizes, self.devices)
        for mesh in self.meshes:  # ValueError naming what tp fails to divide, before any copy
            TPLayout.for_model(model.config, mesh)
        self.engines = [self._engine(model, mesh) for mesh in self.meshes]

    def _engine(self, model, mesh) -> Engine:
        policy = self.policy_factory() if self.policy_factory is not None else None
        engine = Engine(model, self.tokenizer, mesh=mesh, policy=policy, programs=self.programs, **self.engine_kwargs)
        if hasattr(policy, "bind"):
            policy.bind(engine.scheduler)
        return engine

    @property
    def sizes(self) -> list[int]:
        return [m.size for m in self.meshes]

    def __len__(self) -> int:
        return len(self.engines)

    def precompile(self, degrees: Sequence[int], progress: bool = False) -> int:
        """Compiles the step programs of every device group a partition into `degrees`
        (largest first, each degree dividing the next: the aligned groups) can use and no
        instance uses now, so that regroup() takes them from the instances' ProgramStore
        instead of compiling while requests wait. Nothing is placed on those devices.
        Returns the programs compiled. ValueError when a degree does not fit the model or the
        devices."""
        engine = self.engines[0]
        held = {tuple(d.id for d in m.devices.flat) for m in self.meshes}
        groups = {}
        for d in sorted(set(degrees), reverse=True):
            if d < 1 or len(self.devices) % d:
                raise ValueError(f"degree {d!r} does not divide the {len(self.devices)} devices")
            for mesh in partition_devices([d] * (len(self.devices) // d), self.devices):
                key = tuple(x.id for x in mesh.devices.flat)
                if key not in held:
                    groups.setdefault(key, mesh)
        meshes = list(groups.values())
        if progress:
            from tqdm import tqdm
            meshes = tqdm(meshes, desc="precompiling device groups", unit="group")
        compiled = 0
        for mesh in meshes:
            layout = TPLayout.for_model(engine.model_config, mesh, engine.vocab_parallel)
            compiled += engine.runner.precompile(layout)
        return compiled

    def regroup(self, sizes: Sequence[int]) -> RegroupReport:
        """Re-partitions the devices into `sizes` (module docstring). Checks everything first:
        on ValueError nothing has moved."""
        meshes = partition_devices(sizes, self.devices)
        config = self.engines[0].model_config
        for mesh in meshes:
            TPLayout.for_model(config, mesh)
        old_sets = [_device_set(m) for m in self.meshes]
        new_sets = [_device_set(m) for m in meshes]
        match = match_groups(old_sets, new_sets, [e.has_unfinished() for e in self.engines])
        kept, dropped = match.kept, match.dropped(len(self.engines))
        report = RegroupReport(kept=kept, created={}, dropped=dropped, weights={}, kv={})
        # dropped old instance -> (new instance taking its requests, its Migration)
        leaving = {i: (j, self.engines[i].export_requests()) for i, j in match.heirs.items()}
        engines: list = [None] * len(meshes)
        for j, src in match.sources.items():
            engines[j], report.weights[j] = self._copy(self.engines[src], meshes[j])
            report.created[j] = src
        for i in dropped:
            self.engines[i] = None  # its weights and pool are freed with the engine
        for i, j in kept.items():
            engines[j] = self.engines[i]
            report.weights[j], report.kv[j] = engines[j].reshard(meshes[j])
        for i, (j, migration) in leaving.items():
            report.migrated[i] = (j, len(migration.groups), engines[j].import_requests(migration))
        self.engines, self.meshes = engines, meshes
        return report

    def _copy(self, engine, mesh):
        """A new replica on mesh with engine's weights, moving only the slices mesh lacks."""
        layout = TPLayout.for_model(engine.model_config, mesh, engine.vocab_parallel)
        runner = engine.runner
        state, stats = reshard_tree(runner.state, layout.state_shardings(runner.state))
        model = nnx.merge(runner.graphdef, state)
        return self._engine(model, mesh), stats


class TopologyControl(Protocol):
    """What InstanceGroup asks of an adaptive-TP controller (scheduler.adaptive_tp.nitsum.NitsumControl)."""

    window_s: float
    degrees: Sequence[int]  # the TP degrees its partitions may use (what Instances.precompile takes)

    def route(self, tier: str, outstanding: Sequence[int]) -> int:
        """The instance a new request of `tier` goes to, given each instance's unfinished requests."""

    def observe(self, arrived: Mapping[str, int], served: Mapping[str, int]) -> None:
        """One window's arrivals per tier and its finished requests that met their SLO."""

    def decide(self, now: float) -> Sequence[int] | None:
        """New instance sizes to regroup into now (instance i then serves what the controller
        routes to i), or None to keep the current ones."""


@dataclasses.dataclass
class Reconfiguration:
    """One regroup an InstanceGroup made: when, from and to which sizes, how long the pause
    took, and what moved."""

    time_s: float
    old: tuple[int, ...]
    new: tuple[int, ...]
    seconds: float
    weights_moved: int
    weights_minimum: int
    weights_full_reload: int
    kv_moved: int
    requests_migrated: int


class InstanceGroup:
    """Instances behind one engine interface (what EngineLoop and Server drive), so one server
    endpoint serves every instance: a request goes to the instance `control.route` picks,
    every busy instance steps in turn, and once per control window the controller hears the
    window's arrivals and SLO-met finishes per tier and may regroup the devices (between steps:
    requests keep running, KV migrates, only missing weight slices move). `control=None`: a
    static partition, requests to the least-loaded instance."""

    def __init__(self, instances: Instances, control: TopologyControl | None = None, clock=time.monotonic):
        self.instances, self.control, self.clock = instances, control, clock
        self.tokenizer = instances.tokenizer
        self.scheduler = self.policy = None  # no single scheduler (and policy) to report
        self._where: dict[str, Engine] = {}  # public request id -> the engine serving it
        self._tier: dict[str, Tier | None] = {}
        self._arrived: collections.Counter = collections.Counter()
        self._served: collections.Counter = collections.Counter()
        self._window_start = clock()
        self.reconfigurations: list[Reconfiguration] = []

    @property
    def engines(self) -> list[Engine]:
        return self.instances.engines

    def _outstanding(self) -> list[int]:
        counts = collections.Counter(id(e) for e in self._where.values())
        return [counts[id(e)] for e in self.engines]

    # -- the Engine interface the serving layer uses ---------------------------------------------

    def add_request(self, prompt, params=None, request_id: str | None = None, priority: int = 0,
                    tier: Tier | None = None) -> str:
        if request_id is not None and request_id in self._where:
            raise ValueError(f"request_id={request_id!r} is already in use or contains '/'")
        outstanding = self._outstanding()
        if self.control is None:
            k = min(range(len(self.engines)), key=lambda i: (outstanding[i], i))
        else:
            k = self.control.route(tier.name if tier else "", outstanding)
        engine = self.engines[k]
        request_id = engine.add_request(prompt, params, request_id=request_id, priority=priority, tier=tier)
        self._where[request_id] = engine
        self._tier[request_id] = tier
        self._arrived[tier.name if tier else ""] += 1
        return request_id

    def abort(self, request_id: str) -> bool:
        engine = self._where.pop(request_id, None)
        self._tier.pop(request_id, None)
        return engine.abort(request_id) if engine is not None else False

    def step(self) -> list[RequestOutput]:
        self._maybe_reconfigure()
        outputs = []
        for engine in self.engines:
            if engine.has_unfinished():
                outputs += engine.step()
        for out in outputs:
            engine = self._where.get(out.request_id)
            if out.finished and engine is not None and not engine.is_unfinished(out.request_id):
                self._where.pop(out.request_id)
                tier = self._tier.pop(out.request_id)
                if tier is not None and out.first_token_time is not None and out.finish_reason != "abort":
                    n = len(out.token_ids)
                    tpot = (out.finish_time - out.first_token_time) / (n - 1) if n > 1 else math.nan
                    if tier.met(out.first_token_time - out.arrival_time, tpot):
                        self._served[tier.name] += 1
        return outputs

    def has_unfinished(self) -> bool:
        return bool(self._where)

    def is_unfinished(self, request_id: str) -> bool:
        engine = self._where.get(request_id)
        return engine is not None and engine.is_unfinished(request_id)

    def check_prompt(self, ids, params) -> None:
        self.engines[0].check_prompt(ids, params)

    def info(self):
        return dataclasses.replace(self.engines[0].info(), tp=max(self.instances.sizes))

    def load(self) -> EngineLoad:
        loads = [e.load() for e in self.engines]
        return EngineLoad(*(sum(getattr(x, f.name) for x in loads) for f in dataclasses.fields(EngineLoad)
                            if f.name != "page_size"), loads[0].page_size)

    def spec_stats(self) -> SpecStats:
        total = SpecStats()
        for e in self.engines:
            s = e.spec_stats()
            for f in dataclasses.fields(SpecStats):
                setattr(total, f.name, getattr(total, f.name) + getattr(s, f.name))
        return total

    def eviction_log(self, wanted=lambda: True):
        return None  # routers watch single engines; a group is routed inside

    def release_warmup(self) -> None:
        """Engine.release_warmup on every instance."""
        for engine in self.engines:
            engine.release_warmup()

    def stop_warmup(self, timeout: float | None = None) -> None:
        """Engine.stop_warmup on every instance."""
        for engine in self.engines:
            engine.stop_warmup(timeout)

    def warming_up(self) -> bool:
        """Engine.warming_up of any instance."""
        return any(engine.warming_up() for engine in self.engines)

    def reset_prefix_cache(self) -> int:
        return sum(e.reset_prefix_cache() for e in self.engines)

    # -- control -------------------------------------------------------------------------------

    def _maybe_reconfigure(self) -> None:
        if self.control is None:
            return
        now = self.clock()
        if now - self._window_start < self.control.window_s:
            return
        self.control.observe(dict(self._arrived), dict(self._served))
        self._arrived.clear()
        self._served.clear()
        self._window_start = now
        sizes = self.control.decide(now)
        if sizes is not None and list(sizes) != self.instances.sizes:
            self.regroup(sizes, now)

    def regroup(self, sizes: Sequence[int], now: float | None = None) -> Reconfiguration:
        """Regroups the instances now (between steps) and records what it cost."""
        old = tuple(self.instances.sizes)
        by_engine = {}
        for rid, engine in self._where.items():
            by_engine.setdefault(id(engine), []).append(rid)
        t0 = time.perf_counter()
        report = self.instances.regroup(sizes)
        for engine in self.engines:  # requests follow their engine (kept) or their migration
            for rid in list(self._where):
                if engine.is_unfinished(rid):
                    self._where[rid] = engine
        jax.block_until_ready([(e.runner.kv, e.runner.state) for e in self.engines])
        seconds = time.perf_counter() - t0
        w = [report.weights[j] for j in report.weights]
        rec = Reconfiguration(self.clock() if now is None else now, old, tuple(self.instances.sizes), seconds,
                              sum(x.moved for x in w), sum(x.minimum for x in w), sum(x.full_reload for x in w),
                              sum(x.moved for x in report.kv.values())
                              + sum(m.moved for _, _, m in report.migrated.values() if m is not None),
                              sum(n for _, n, _ in report.migrated.values()))
        self.reconfigurations.append(rec)
        return rec
