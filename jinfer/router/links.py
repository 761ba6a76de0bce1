"""The router's links to its replicas: channels, watch streams, health checks, down and up.

A replica is up while its watch stream delivers and its grpc.health.v1 Check (polled every
`health_interval_s`) answers SERVING. When its stream ends or fails, a Generate to it fails with
UNAVAILABLE (the router calls `mark_down`), or `health_failures` checks in a row fail, it is
marked down: the policy hears `on_replica_down` (never routes there, forgets its tree entries
and outstanding requests), and its watch stream is restarted; the first report of the new
stream (with health SERVING, and the same model) takes it back cold (`on_replica_up`).

Every replica's `WatchReplica` stream feeds the policy's `on_load` and `on_evict`. Everything
here runs on the router's event-loop thread, as the (single-threaded) policy needs.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jinfer.router.config import RouterConfig
from jinfer.routing import ReplicaLoad, Router
from jinfer.serving import inference_pb2 as pb
from jinfer.serving import inference_pb2_grpc as pb_grpc
from jinfer.serving.server import SERVICE

log = logging.getLogger(__name__)


class Replica:
    """One replica as the router sees it. up (what the policy was told) follows watching and
    healthy: down as soon as either fails, up again once both hold."""

    def __init__(self, target: str, channel, metadata):
        self.target = target
        self.channel = channel
        self.stub = pb_grpc.InferenceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)
        self.metadata = metadata
        self.info: pb.ServerInfo | None = None  # replaced whole (never edited): other threads read it
        self.up = True  # the policy starts with every replica up
        self.watching = False  # the current watch stream delivered its first report
        self.healthy = True  # a health check answered SERVING since it was last marked down
        self.health_failures = 0  # in a row
        self.down_reason = ""
        self.epoch = 0  # times marked down: requests routed in an earlier epoch are forgotten
        self.routed = self.failed = self.evicted_tokens = 0
        self.load: pb.ReplicaLoad | None = None
        self.watch_task: asyncio.Task | None = None
        self.watch_call = None
        self.wake = asyncio.Event()  # health answered SERVING: reconnect the watch stream now
        self.first_report = asyncio.Event()
        self.calls: dict = {}  # Generate call in flight -> why the router cancelled it (None: it did not)
        self.removed = False  # taken out of the router for good (remove): never up again


def _load(msg: pb.ReplicaLoad) -> ReplicaLoad:
    return ReplicaLoad(msg.waiting, msg.running, msg.num_pages, msg.free_pages, msg.cached_pages,
                       msg.page_size, msg.outstanding)


class ReplicaLinks:
    """The replicas of one router and their up/down state. `connect()` opens the channels and
    reads every replica's ServerInfo; `start(policy)` follows them until `close()`."""

    def __init__(self, targets: list[str], config: RouterConfig, now: Callable[[], float]):
        self.targets, self.config, self.now = list(targets), config, now
        self.replicas: list[Replica] = []
        self.policy: Router | None = None
        self.closing = False  # the router is stopping: a failure now marks nothing down
        self._health_task: asyncio.Task | None = None

    def __getitem__(self, i: int) -> Replica:
        return self.replicas[i]

    def __iter__(self):
        return iter(self.replicas)

    def __len__(self) -> int:
        return len(self.replicas)

    async def connect(self, channel_options) -> None:
        """Opens a channel to every replica and waits (connect_timeout_s) for its ServerInfo.
        Raises ConnectionError if one does not answer, ValueError if they serve different models."""
        cfg = self.config
        backoff_ms = max(50, int(cfg.health_interval_s * 1000))  # a restarted replica is found this soon
        channel_options = list(channel_options) + [("grpc.initial_reconnect_backoff_ms", backoff_ms),
                                                   ("grpc.max_reconnect_backoff_ms", backoff_ms)]
        self._channel_options = channel_options
        self.replicas = [self._open(t) for t in self.targets]
        await asyncio.gather(*(self._info(rep) for rep in self.replicas))
        for rep in self.replicas[1:]:
            if self.mismatch(rep.info):
                raise ValueError(f"replica {rep.target} {self.mismatch(rep.info)}")

    def _open(self, target: str) -> Replica:
        cfg = self.config
        metadata = (("authorization", f"Bearer {cfg.replica_token}"),) if cfg.replica_token else ()
        return Replica(target, grpc.aio.insecure_channel(target, self._channel_options), metadata)

    async def _info(self, rep: Replica, timeout: float | None = None) -> None:
        try:
            rep.info = await rep.stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=rep.metadata,
                                                    timeout=timeout or self.config.connect_timeout_s,
                                                    wait_for_ready=True)
        except grpc.aio.AioRpcError as e:
            raise ConnectionError(f"replica {rep.target} did not answer: {e.code().name} {e.details()}") from None

    async def add(self, target: str, timeout: float | None = None) -> int:
        """A replica joins while the router runs (a cluster grew, or a restarted replica came back
        at a new address): it is routed to, cold, from its first load report on. Returns its
        index. ValueError if the target is already routed to or serves another model;
        ConnectionError if it does not answer GetServerInfo within `timeout` seconds
        (connect_timeout_s if None). A replica that answers but sends no report within the
        timeout joins down and comes up when it reports (as a restarted one does)."""
        timeout = self.config.connect_timeout_s if timeout is None else timeout
        self._check_new(target)
        rep = self._open(target)
        try:
            await self._info(rep, timeout)
            self._check_new(target)  # another add of the same target may have won the race
            if self.mismatch(rep.info):
                raise ValueError(f"replica {target} {self.mismatch(rep.info)}")
            i = self.policy.add_replica()
        except BaseException:
            await rep.channel.close()
            raise
        self.replicas.append(rep)
        assert i == len(self.replicas) - 1, f"the policy numbered the new replica {i}, the links {len(self.replicas) - 1}"
        rep.up, rep.down_reason = False, "it has not reported its load yet"  # down, as in the policy: up
        # (cold) with its first report (_maybe_up)
        rep.watch_task = asyncio.create_task(self._watch(i))
        try:
            await asyncio.wait_for(rep.first_report.wait(), timeout)
        except TimeoutError:
            log.warning("replica %s joined as replica %d but sent no load report within %.0fs", target, i, timeout)
        else:
            log.info("replica %s joined as replica %d", target, i)
        return i

    def _check_new(self, target: str) -> None:
        if any(rep.target == target and not rep.removed for rep in self.replicas):
            raise ValueError(f"replica {target} is already routed to")

    async def remove(self, target: str) -> int:
        """Takes a replica out of the router for good (a cluster shrank): it is marked down (the
        policy forgets it) and never taken back; its index is not reused, and its channel closes
        once the streams it is relaying ended (stop the replica itself with SIGTERM: it drains).
        Returns its index; ValueError if no replica in the router has that target, or if it is
        the last one (a router needs one)."""
        found = [i for i, rep in enumerate(self.replicas) if rep.target == target and not rep.removed]
        if not found:
            raise ValueError(f"no replica {target} in the router (it has {self.live_targets()})")
        if len(self.live_targets()) == 1:
            raise ValueError(f"replica {target} is the router's last: add another before removing it")
        i = found[0]
        rep = self.replicas[i]
        rep.removed = True
        self.mark_down(i, "removed from the router")
        if rep.watch_task is not None:
            rep.watch_task.cancel()
            await asyncio.gather(rep.watch_task, return_exceptions=True)
        asyncio.create_task(self._close_when_idle(rep))
        log.info("replica %s (replica %d) removed", target, i)
        return i

    async def _close_when_idle(self, rep: Replica) -> None:
        while rep.calls and not self.closing:
            await asyncio.sleep(self.config.health_interval_s)
        if not self.closing:  # close() closes every channel itself
            await rep.channel.close()

    def live_targets(self) -> list[str]:
        """The targets of the replicas in the router (up or down, not removed), in index order."""
        return [rep.target for rep in self.replicas if not rep.removed]

    async def start(self, policy: Router) -> None:
        """Starts every watch stream, waits for each one's first report, then polls health."""
        self.policy = policy
        for i, rep in enumerate(self.replicas):
            rep.watch_task = asyncio.create_task(self._watch(i))
        timeout = self.config.connect_timeout_s
        try:
            await asyncio.wait_for(asyncio.gather(*(rep.first_report.wait() for rep in self.replicas)), timeout)
        except TimeoutError:
            silent = [f"{rep.target} ({rep.down_reason})" for rep in self.replicas if not rep.first_report.is_set()]
            raise ConnectionError(f"no load report (WatchReplica) within {timeout}s from "
                                  f"{', '.join(silent)}") from None
        self._health_task = asyncio.create_task(self._health())

    async def close(self) -> None:
        self.closing = True
        tasks = [t for t in [self._health_task] + [rep.watch_task for rep in self.replicas] if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for rep in self.replicas:
            await rep.channel.close()

    def mismatch(self, info: pb.ServerInfo) -> str:
        """Why a replica serving `info` cannot stand beside the first one ('' if it can)."""
        first = self.replicas[0].info
        if (info.vocab_size, info.model) == (first.vocab_size, first.model):
            return ""
        return (f"serves {info.model!r} (vocab {info.vocab_size}) but {self.replicas[0].target} serves "
                f"{first.model!r} (vocab {first.vocab_size})")

    async def _watch(self, i: int) -> None:
        """Follows replica i's WatchReplica stream while the router runs. Each new stream's first
        report marks it watching (and up, if healthy); the stream's end marks it down and, after
        health_interval_s (sooner once health answers SERVING), it subscribes again."""
        rep, cfg = self.replicas[i], self.config
        request = pb.WatchReplicaRequest(min_interval_s=cfg.report_interval_s)
        while not self.closing and not rep.removed:
            if not rep.up and not await self._same_model(i):
                reason = rep.down_reason
            else:
                call = rep.watch_call = rep.stub.WatchReplica(request, metadata=rep.metadata)
                reason = "its watch stream ended"
                try:
                    async for event in call:
                        if not rep.watching:
                            rep.watching = True
                            rep.first_report.set()
                            self._maybe_up(i)
                        for ev in event.evictions:
                            self.policy.on_evict(i, tuple(ev.token_ids), ev.keep)
                            rep.evicted_tokens += len(ev.token_ids) - ev.keep
                        rep.load = event.load
                        self.policy.on_load(i, _load(event.load), self.now())
                except grpc.aio.AioRpcError as e:
                    reason = f"its watch stream failed: {e.code().name} {e.details()}"
                except asyncio.CancelledError:
                    if asyncio.current_task().cancelling():
                        raise  # the router stops
                    reason = rep.down_reason  # mark_down restarted the stream
                finally:
                    call.cancel()
            if self.closing:
                return
            self.mark_down(i, reason)
            rep.wake.clear()
            try:
                await asyncio.wait_for(rep.wake.wait(), cfg.health_interval_s)
            except TimeoutError:
                pass

    async def _same_model(self, i: int) -> bool:
        """Before taking a replica back: does it answer, and serve the same model (one restarted
        on the same port may not)?"""
        rep = self.replicas[i]
        try:
            info = await rep.stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=rep.metadata,
                                                timeout=self.config.health_timeout_s)
        except grpc.aio.AioRpcError:
            return False
        if self.mismatch(info):
            if not rep.down_reason.startswith("it now"):
                log.error("replica %s is back but %s: it stays down", rep.target, self.mismatch(info))
            rep.down_reason = f"it now {self.mismatch(info)}"
            return False
        rep.info = info
        return True

    async def _health(self) -> None:
        """Checks every replica's grpc.health.v1 status each health_interval_s."""
        while not self.closing:
            await asyncio.gather(*(self._check(i) for i, rep in enumerate(self.replicas) if not rep.removed))
            await asyncio.sleep(self.config.health_interval_s)

    async def _check(self, i: int) -> None:
        rep, cfg = self.replicas[i], self.config
        hung = False
        try:
            reply = await rep.health.Check(health_pb2.HealthCheckRequest(service=SERVICE),
                                           timeout=cfg.health_timeout_s)
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.aio.AioRpcError as e:
            status, hung = e.code().name, True
        if self.closing:
            return
        if status == "SERVING":
            rep.health_failures, rep.healthy = 0, True
            if not rep.watching:
                rep.wake.set()
            self._maybe_up(i)
            return
        rep.health_failures += 1
        if rep.health_failures == cfg.health_failures:  # once per failing streak
            # A replica that stopped answering never ends its streams: cancel them (those not yet
            # relaying are routed again). One that says NOT_SERVING is draining: let them finish.
            self.mark_down(i, f"{rep.health_failures} health checks in a row failed: {status}", cancel_calls=hung)

    def mark_down(self, i: int, reason: str, *, epoch: int | None = None, cancel_calls: bool = False) -> None:
        """Takes replica i out of routing (the policy forgets its tree entries and outstanding
        requests) and restarts its watch stream. epoch: only if still in this epoch (a failure of
        a request routed before an earlier down says nothing new). cancel_calls: fail the
        Generate calls in flight there (a hung replica never ends them)."""
        rep = self.replicas[i]
        if epoch is not None and epoch != rep.epoch:
            return
        rep.watching = rep.healthy = False  # back only with a fresh report and a SERVING check
        if rep.watch_call is not None:
            rep.watch_call.cancel()
        if cancel_calls:
            for call in rep.calls:
                rep.calls[call] = reason
                call.cancel()
        if rep.up:
            rep.up, rep.down_reason, rep.load = False, reason, None
            rep.epoch += 1
            self.policy.on_replica_down(i, self.now())
            log.warning("replica %s is down (%s): routing around it", rep.target, reason)

    def _maybe_up(self, i: int) -> None:
        rep = self.replicas[i]
        if rep.up or rep.removed or not (rep.watching and rep.healthy):
            return
        rep.up = True
        self.policy.on_replica_up(i, self.now())
        log.info("replica %s is back (was down: %s): routing to it again, cold", rep.target, rep.down_reason)

    def why_none_up(self) -> str:
        return "no replica is up: " + "; ".join(f"{rep.target} is down ({rep.down_reason})" for rep in self.replicas
                                                if not rep.removed)
