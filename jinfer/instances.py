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

import dataclasses
from typing import Sequence

import jax
from flax import nnx

from jinfer.engine import Engine
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

    def __init__(self, model, tokenizer, sizes: Sequence[int], *, devices=None, **engine_kwargs):
        """model: the weights (anywhere: each replica copies them onto its own shards). For a
        model too large for one device, load it sharded onto the first group's mesh
        (jinfer.loader.hf.load_sharded): the others then copy only the slices they lack."""
        self.devices = list(jax.devices() if devices is None else devices)
        self.tokenizer = tokenizer
        self.engine_kwargs = engine_kwargs
        self.meshes = partition_devices(sizes, self.devices)
        for mesh in self.meshes:  # ValueError naming what tp fails to divide, before any copy
            TPLayout.for_model(model.config, mesh)
        self.engines = [Engine(model, tokenizer, mesh=mesh, **engine_kwargs) for mesh in self.meshes]

    @property
    def sizes(self) -> list[int]:
        return [m.size for m in self.meshes]

    def __len__(self) -> int:
        return len(self.engines)

    def regroup(self, sizes: Sequence[int]) -> RegroupReport:
        """Re-partitions the devices into `sizes` (module docstring). Checks everything first:
        on ValueError nothing has moved."""
        meshes = partition_devices(sizes, self.devices)
        config = self.engines[0].model_config
        for mesh in meshes:
            TPLayout.for_model(config, mesh)
        old_sets = [_device_set(m) for m in self.meshes]
        new_sets = [_device_set(m) for m in meshes]
        busy = [e.has_unfinished() for e in self.engines]
        pairs = sorted(((not busy[i], -len(old_sets[i] & new_sets[j]), i, j)
                        for i in range(len(old_sets)) for j in range(len(new_sets))))
        kept: dict[int, int] = {}
        for _, _, i, j in pairs:
            if i not in kept and j not in kept.values():
                kept[i] = j
        dropped = [i for i in range(len(self.engines)) if i not in kept]
        report = RegroupReport(kept=kept, created={}, dropped=dropped, weights={}, kv={})
        leaving = {}  # dropped old instance -> (new instance taking its requests, its Migration)
        for i in dropped:
            if busy[i]:
                j = max(range(len(new_sets)), key=lambda j: (len(old_sets[i] & new_sets[j]), -j))
                leaving[i] = (j, self.engines[i].export_requests())
        engines: list = [None] * len(meshes)
        for j in range(len(meshes)):
            if j in kept.values():
                continue
            src = max(range(len(old_sets)), key=lambda i: (len(old_sets[i] & new_sets[j]), -i))
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
        return Engine(model, self.tokenizer, mesh=mesh, **self.engine_kwargs), stats
