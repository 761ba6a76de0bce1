"""Requests moving unfinished: out of one engine into another (export_requests ->
import_requests: an instance being dropped hands its requests to one that stays), or with their
engine onto another tensor-parallel mesh (reshard). The scheduler's side of it is
jinfer.migration."""

from __future__ import annotations

import dataclasses

import jax

from jinfer.errors import shorten
from jinfer.kv_cache import KVCache
from jinfer.request import Request, RequestOutput, Status
from sharding.tp import TPLayout


@dataclasses.dataclass
class Migration:
    """Requests on their way from one engine to another (Engine.export_requests ->
    import_requests), with the K/V of their computed tokens, so they continue where they were
    instead of recomputing."""

    groups: dict[str, list[Request]]  # public id -> its samples, as the engine holds them (with their text)
    carried: list[tuple[str, int]]  # (sample id, leading pages of it in kv), in kv's page order
    kv: KVCache | None  # those pages' K/V, on the exporting engine's devices
    outputs: list[RequestOutput]  # read back from the device but not yet returned by step()

    @property
    def num_pages(self) -> int:
        return sum(n for _, n in self.carried)


class Migrating:
    """The engine's side of moving requests (jinfer.engine.Engine mixes it in): it uses the
    engine's runner, scheduler, host tier, samples by public id (`_groups`) and held outputs,
    and settles the step in flight first."""

    def reshard(self, mesh):
        """Switches to a new tensor-parallel mesh between steps, requests kept running.

        The step in flight (async scheduling) is finished first; its outputs come with the next
        step(). Weights move only the slices each device lacks; the KV pool moves with its page
        tables unchanged. With options.warmup the step buckets compile for the new mesh before
        it returns (with Instances' ProgramStore, a regroup takes precompile's programs), as when the engine was built.
        Returns (weights, kv) sharding.reshard.MoveStats.
        """
        layout = TPLayout.for_model(self.model_config, mesh, self.vocab_parallel)  # ValueError before anything moves
        self._settle_inflight()
        moved = self.runner.reshard(layout)
        if self.options.warmup:
            self.runner.warmup()
        return moved

    def export_requests(self, request_ids=None) -> Migration:
        """Takes requests out of this engine, unfinished, for import_requests on another (an
        instance being dropped hands its requests to one that stays). request_ids: public ids
        (None: every unfinished request); ValueError naming an unknown one, before anything
        changes. The step in flight is read back first; what it produced for these requests
        travels with them (Migration.outputs). Their K/V pages are gathered in one batch; their
        pages here are released (into the prefix cache, like a finished request's). A request
        the step in flight finishes travels as its held output only; with request_ids None every
        held output goes, so an engine emptied this way has nothing left to return."""
        if request_ids is not None:
            ids = list(request_ids)
            unknown = [i for i in ids if i not in self._groups]
            if unknown:
                raise ValueError(f"request ids {[shorten(i) for i in unknown[:3]]} are not unfinished in this engine")
        self._settle_inflight()  # may finish some of them
        if request_ids is None:
            ids = list(self._groups) + [o.request_id for o in self._held_outputs]
        groups = {i: self._groups.pop(i) for i in ids if i in self._groups}
        samples = [r for g in groups.values() for r in g if r.status is not Status.FINISHED]
        carried = self.scheduler.kv_to_carry(samples)
        by_id = {r.request_id: r for r in samples}
        pages = [p for sid, n in carried for p in by_id[sid].pages[:n]]
        kv = self.runner.read_pages(pages) if pages else None
        self.scheduler.detach(samples)
        for r in samples:  # a swapped-out one computes its K/V again there (detach)
            self.host_kv.drop(r.request_id)
        mine = set(ids)
        outputs = [o for o in self._held_outputs if o.request_id in mine]
        self._held_outputs = [o for o in self._held_outputs if o.request_id not in mine]
        return Migration(groups, carried, kv, outputs)

    def import_requests(self, migration: Migration):
        """Takes in requests another engine exported; they continue from their computed tokens
        with their K/V written into pages of this pool (the data moving onto this engine's
        devices and sharding), or, for samples the pool cannot hold now, recompute them like a
        preempted request. Outputs they produced in flight come with this engine's next step().
        ValueError (nothing changes) if a request id is already in use here. Returns the
        sharding.reshard.MoveStats of the K/V move (None when no page was carried)."""
        clash = [i for i in migration.groups if i in self._groups]
        if clash:
            raise ValueError(f"request ids {[shorten(i) for i in clash[:3]]} are already in use in this engine")
        by_id = {r.request_id: r for g in migration.groups.values() for r in g}
        held = {f.request_id for r in by_id.values() for f in r.followers}  # unforked: their leader starts them
        starts = [0]
        for _, n in migration.carried:
            starts.append(starts[-1] + n)
        src, dst = [], []
        for k in self.scheduler.take_in(list(by_id.values()), migration.carried, held):
            src += range(starts[k], starts[k + 1])
            dst += by_id[migration.carried[k][0]].pages
        stats = None
        if dst:
            data = migration.kv
            if len(src) < migration.num_pages:
                idx = src + [src[-1]] * ((1 << (len(src) - 1).bit_length()) - len(src))
                data = jax.tree.map(lambda a: a[:, idx], data)
            stats = self.runner.write_pages(dst, data)
        self._groups.update(migration.groups)
        self._held_outputs += migration.outputs
        return stats
