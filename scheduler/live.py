"""The live router: a gRPC server in front of N jinfer replica servers, routing with the same
policy objects the simulator drives (scheduler/routing.py).

It serves `jinfer.v1.Inference` itself, so clients and tools/benchmark_serving.py talk to it as
to one server: each Generate is routed (`Router.route`) and forwarded to the chosen replica as
token ids, its stream relayed back; the first token and the end feed `on_first_token` and
`on_finish`. Every replica's `WatchReplica` stream feeds `on_load` and `on_evict`, so the policy's
global radix tree follows what the replicas really cache. `jinfer.v1.Router/GetRouterStats`
shows what the policy sees (per replica: routed, outstanding, cached tokens in its tree, last
load report, evicted tokens, failures; E2's decision counts).

Failover: a replica is up while its watch stream delivers and its grpc.health.v1 Check (polled
every `health_interval_s`) answers SERVING. When its stream ends or fails, a Generate to it fails
with UNAVAILABLE, or `health_failures` checks in a row fail, it is marked down: the policy hears
`on_replica_down` (never routes there, forgets its tree entries and outstanding requests), and
its watch stream is restarted; the first report of the new stream (with health SERVING) takes it
back cold (`on_replica_up`). A Generate whose replica fails before anything was relayed is routed
again (at most `max_reroutes` times); one that had started streaming fails with UNAVAILABLE
naming the replica.

All policy calls run on the router's one event-loop thread, so the (single-threaded) policy
objects need no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import time
import uuid

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jinfer.serving import inference_pb2 as pb
from jinfer.serving import inference_pb2_grpc as pb_grpc
from jinfer.serving.server import SERVICE, GrpcHost, sampling_params
from scheduler.cost_model import CostModel
from scheduler.routing import E2Options, NoReplicaUp, ReplicaLoad, RouteRequest, Router, make_router

log = logging.getLogger(__name__)

ROUTER_SERVICE = pb.DESCRIPTOR.services_by_name["Router"].full_name  # "jinfer.v1.Router"


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """How the router listens and talks to its replicas."""

    host: str = "127.0.0.1"
    """Interface to bind."""
    port: int = 0
    """0 picks a free port (see RouterServer.port)."""
    auth_token: str | None = None
    """When set, clients need metadata `authorization: Bearer <token>`."""
    replica_token: str | None = None
    """Bearer token the router presents to its replicas (their serving.auth_token)."""
    report_interval_s: float = 0.05
    """Replicas report their load at most this often (evictions always at once)."""
    connect_timeout_s: float = 120.0
    """At start, wait this long for every replica to answer (they may still be compiling)."""
    shutdown_grace_s: float = 10.0
    """On stop, in-flight streams get this long to finish."""
    max_message_bytes: int = 64 << 20
    """gRPC message limit, both ways (prompts of long-document workloads are large)."""
    health_interval_s: float = 1.0
    """Every replica's health is checked this often; a down replica is reconnected (watch
    stream, channel backoff) at this pace too."""
    health_timeout_s: float = 1.0
    """Deadline of one health check (a replica that does not answer in time failed it)."""
    health_failures: int = 3
    """Failed health checks in a row that mark a replica down (its watch stream ending, or a
    Generate to it failing with UNAVAILABLE, marks it down at once)."""
    max_reroutes: int = 2
    """A Generate whose replica fails (UNAVAILABLE, or marked down) before anything was relayed
    is routed to another replica at most this many times."""

    def __post_init__(self):
        if not 0 < self.report_interval_s <= 3600:
            raise ValueError(f"report_interval_s={self.report_interval_s} must be in (0, 3600]")
        if self.connect_timeout_s <= 0:
            raise ValueError(f"connect_timeout_s={self.connect_timeout_s} must be > 0")
        if self.shutdown_grace_s < 0:
            raise ValueError(f"shutdown_grace_s={self.shutdown_grace_s} must be >= 0")
        if not 0 < self.health_interval_s <= 3600:
            raise ValueError(f"health_interval_s={self.health_interval_s} must be in (0, 3600]")
        if self.health_timeout_s <= 0:
            raise ValueError(f"health_timeout_s={self.health_timeout_s} must be > 0")
        if self.health_failures < 1:
            raise ValueError(f"health_failures={self.health_failures} must be >= 1")
        if self.max_reroutes < 0:
            raise ValueError(f"max_reroutes={self.max_reroutes} must be >= 0")


class _Replica:
    """One replica as the router sees it. up (what the policy was told) follows watching and
    healthy: down as soon as either fails, up again once both hold."""

    def __init__(self, target: str, channel, metadata):
        self.target = target
        self.channel = channel
        self.stub = pb_grpc.InferenceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)
        self.metadata = metadata
        self.info: pb.ServerInfo | None = None
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


class _ReplicaFailed(Exception):
    """A forwarded Generate's replica failed (or was marked down); the message names it.
    relayed: some of its stream had reached the client (so it cannot be routed again)."""

    def __init__(self, message: str, relayed: bool):
        super().__init__(message)
        self.relayed = relayed


def _replica_tokenizer(info: pb.ServerInfo):
    """The tokenizer of the model a replica's launch config names; None (text prompts refused)
    when the replica was built in code without one."""
    config = json.loads(info.config_json or "{}")
    model = config.get("model") or config.get("replica", {}).get("model")  # a replica, or a router's
    if model is None:
        log.warning("the replicas report no launch config: text prompts will be refused (send token ids)")
        return None
    from jinfer.launch import ModelSpec, load_tokenizer
    return load_tokenizer(ModelSpec(**model))


def _load(msg: pb.ReplicaLoad) -> ReplicaLoad:
    return ReplicaLoad(msg.waiting, msg.running, msg.num_pages, msg.free_pages, msg.cached_pages,
                       msg.page_size, msg.outstanding)


class _RouterInference(pb_grpc.InferenceServicer):
    def __init__(self, owner: "RouterServer"):
        self.o = owner

    async def Generate(self, request, context):
        o = self.o
        ids = await self._prompt_ids(request, context)
        request_id = request.request_id or uuid.uuid4().hex
        rreq = RouteRequest(request_id, tuple(ids), sampling_params(request).max_tokens)
        forward = pb.GenerateRequest()
        forward.CopyFrom(request)
        forward.token_ids.ids[:] = ids  # the oneof: replaces text, so replica and router agree on tokens
        forward.request_id = request_id
        start = o.now()
        for attempt in itertools.count():
            try:
                r = o.policy.route(rreq, o.now())
            except NoReplicaUp:
                await context.abort(grpc.StatusCode.UNAVAILABLE, o.why_none_up())
            except ValueError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            try:
                async with contextlib.aclosing(self._relay(r, rreq, forward, start, context)) as relay:
                    async for msg in relay:  # (closed at once if the client goes away mid-yield)
                        yield msg
                return
            except _ReplicaFailed as e:
                if e.relayed or attempt >= o.config.max_reroutes:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
                log.info("request %s: %s; routing it again", request_id, e)

    async def _prompt_ids(self, request, context) -> list[int]:
        o = self.o
        kind = request.WhichOneof("prompt")
        if kind == "text" and request.text:
            if o.tokenizer is None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    "this router has no tokenizer: send token_ids, or start it with one")
            ids = o.tokenizer.encode(request.text)
        else:
            ids = list(request.token_ids.ids) if kind == "token_ids" else []
        if not ids:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty: set text or token_ids")
        error = o.check(ids, request)
        if error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error)
        return ids

    async def _relay(self, r: int, rreq: RouteRequest, forward, start: float, context):
        """Forwards to replica r and relays its stream. Raises _ReplicaFailed when the replica is
        unavailable or marked down; any other replica error ends the call with its status."""
        o, rep = self.o, self.o.replicas[r]
        epoch = rep.epoch
        rep.routed += 1
        call = rep.stub.Generate(forward, metadata=rep.metadata)
        rep.calls[call] = None
        first, relayed = True, False
        try:
            async for msg in call:
                if first and msg.token_ids:
                    first = False
                    now = o.now()
                    o.policy.on_first_token(r, rreq, now, now - start)
                relayed = True
                yield msg
        except grpc.aio.AioRpcError as e:
            rep.failed += 1
            if e.code() != grpc.StatusCode.UNAVAILABLE:
                await context.abort(e.code(), f"replica {rep.target}: {e.details()}")
            o.mark_down(r, f"a Generate failed: {e.details()}", epoch=epoch)
            raise _ReplicaFailed(f"replica {rep.target} is unavailable: {e.details()}", relayed) from None
        except asyncio.CancelledError:
            if rep.calls.get(call) is None:
                raise  # the client went away
            rep.failed += 1
            raise _ReplicaFailed(f"replica {rep.target} is down: {rep.calls[call]}", relayed) from None
        finally:
            rep.calls.pop(call, None)
            call.cancel()  # the client went away (or nothing: the call is done): the replica aborts it
            if rep.epoch == epoch:  # else the policy forgot the request when the replica went down
                o.policy.on_finish(r, rreq, o.now())

    async def GetServerInfo(self, request, context):
        o = self.o
        info = pb.ServerInfo()
        info.CopyFrom(o.replicas[0].info)
        info.max_queued_requests = sum(rep.info.max_queued_requests for rep in o.replicas)
        info.config_json = json.dumps({"router": o.describe(),
                                       "replica": json.loads(info.config_json or "{}")})
        return info

    async def WatchReplica(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            "a router has no KV cache of its own: watch its replicas (GetRouterStats lists them)")

    async def ResetPrefixCache(self, request, context):
        """Resets every up replica's prefix cache; the evictions reach the policy's tree (a down
        replica's entries are gone already)."""
        o = self.o
        up = [rep for rep in o.replicas if rep.up]
        if not up:
            await context.abort(grpc.StatusCode.UNAVAILABLE, o.why_none_up())
        try:
            freed = await asyncio.gather(*(rep.stub.ResetPrefixCache(pb.ResetPrefixCacheRequest(),
                                                                     metadata=rep.metadata, timeout=60)
                                           for rep in up))
        except grpc.aio.AioRpcError as e:
            await context.abort(e.code(), f"a replica failed to reset: {e.details()}")
        return pb.ResetPrefixCacheResponse(freed_pages=sum(f.freed_pages for f in freed))


class _RouterStats(pb_grpc.RouterServicer):
    def __init__(self, owner: "RouterServer"):
        self.o = owner

    async def GetRouterStats(self, request, context):
        return self.o.stats()


class RouterServer:
    """Routes Inference calls across replica servers with a policy; runs on its own thread.

    policy: a name from scheduler.routing.ROUTERS (built once the replicas answered, with
    capacity = the smallest replica KV pool) or a Router object. cost: the cost model
    preble-e2 needs (tools/profile_engine.py fits one to the replicas' engine). tokenizer:
    encodes text prompts; "auto" loads the one the replicas' launch config names (their
    GetServerInfo config_json); None accepts token-id prompts only.
    """

    def __init__(self, targets: list[str], policy: str | Router = "preble-e2", cost: CostModel | None = None,
                 options: E2Options = E2Options(), config: RouterConfig = RouterConfig(), tokenizer=None):
        if not targets:
            raise ValueError("no replicas: give at least one target host:port")
        if len(set(targets)) != len(targets):
            raise ValueError(f"replica targets {targets} repeat")
        if isinstance(policy, str) and policy == "preble-e2" and cost is None:
            raise ValueError("policy preble-e2 needs a cost model (tools/profile_engine.py makes one)")
        self.targets = list(targets)
        self.config = config
        self.tokenizer = tokenizer
        self._policy_spec, self._cost, self._options = policy, cost, options
        self.policy: Router | None = None
        self.replicas: list[_Replica] = []
        self.port: int | None = None
        self._t0 = time.monotonic()
        self._closing = False
        self._health_task: asyncio.Task | None = None
        self._host = GrpcHost("router")

    def now(self) -> float:
        return time.monotonic() - self._t0

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> "RouterServer":
        """Connects to every replica (waiting up to connect_timeout_s), builds the policy, starts
        the watch streams and binds the port. Raises ValueError / ConnectionError on failure."""
        try:
            self._host.run(self._start())
        except BaseException:
            self._host.close()
            raise
        log.info("routing %s across %d replicas with %s on %s:%d", SERVICE, len(self.replicas),
                 self.policy.name, self.config.host, self.port)
        return self

    async def _start(self) -> None:
        cfg = self.config
        options = [("grpc.max_receive_message_length", cfg.max_message_bytes),
                   ("grpc.max_send_message_length", cfg.max_message_bytes)]
        backoff_ms = max(50, int(cfg.health_interval_s * 1000))  # a restarted replica is found this soon
        channel_options = options + [("grpc.initial_reconnect_backoff_ms", backoff_ms),
                                     ("grpc.max_reconnect_backoff_ms", backoff_ms)]
        metadata = (("authorization", f"Bearer {cfg.replica_token}"),) if cfg.replica_token else ()
        self.replicas = [_Replica(t, grpc.aio.insecure_channel(t, channel_options), metadata) for t in self.targets]

        async def info(rep):
            try:
                rep.info = await rep.stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=rep.metadata,
                                                        timeout=cfg.connect_timeout_s, wait_for_ready=True)
            except grpc.aio.AioRpcError as e:
                raise ConnectionError(f"replica {rep.target} did not answer: {e.code().name} {e.details()}") from None

        await asyncio.gather(*(info(rep) for rep in self.replicas))
        first = self.replicas[0].info
        for rep in self.replicas[1:]:
            if self._mismatch(rep.info):
                raise ValueError(f"replica {rep.target} {self._mismatch(rep.info)}")
        if isinstance(self.tokenizer, str) and self.tokenizer == "auto":
            self.tokenizer = _replica_tokenizer(first)
        if isinstance(self._policy_spec, str):
            capacity = min(rep.info.num_pages * rep.info.page_size for rep in self.replicas)
            self.policy = make_router(self._policy_spec, len(self.replicas), self._cost, capacity, self._options)
        else:
            self.policy = self._policy_spec
            if getattr(self.policy, "num_replicas", len(self.replicas)) != len(self.replicas):
                raise ValueError(f"the policy was built for {self.policy.num_replicas} replicas, "
                                 f"{len(self.replicas)} targets given")
        for i, rep in enumerate(self.replicas):
            rep.watch_task = asyncio.create_task(self._watch(i))
        try:
            await asyncio.wait_for(asyncio.gather(*(rep.first_report.wait() for rep in self.replicas)),
                                   cfg.connect_timeout_s)
        except TimeoutError:
            silent = [f"{rep.target} ({rep.down_reason})" for rep in self.replicas if not rep.first_report.is_set()]
            raise ConnectionError(f"no load report (WatchReplica) within {cfg.connect_timeout_s}s from "
                                  f"{', '.join(silent)}") from None
        self._health_task = asyncio.create_task(self._health())

        def register(server):
            pb_grpc.add_InferenceServicer_to_server(_RouterInference(self), server)
            pb_grpc.add_RouterServicer_to_server(_RouterStats(self), server)

        self.port = await self._host.serve(register, (SERVICE, ROUTER_SERVICE), f"{cfg.host}:{cfg.port}",
                                           auth_token=cfg.auth_token, options=options)

    def _mismatch(self, info: pb.ServerInfo) -> str:
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
        while not self._closing:
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
            if self._closing:
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
        if self._mismatch(info):
            if not rep.down_reason.startswith("it now"):
                log.error("replica %s is back but %s: it stays down", rep.target, self._mismatch(info))
            rep.down_reason = f"it now {self._mismatch(info)}"
            return False
        rep.info = info
        return True

    async def _health(self) -> None:
        """Checks every replica's grpc.health.v1 status each health_interval_s."""
        while not self._closing:
            await asyncio.gather(*(self._check(i) for i in range(len(self.replicas))))
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
        if self._closing:
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
        if rep.up or not (rep.watching and rep.healthy):
            return
        rep.up = True
        self.policy.on_replica_up(i, self.now())
        log.info("replica %s is back (was down: %s): routing to it again, cold", rep.target, rep.down_reason)

    def why_none_up(self) -> str:
        return "no replica is up: " + "; ".join(f"{rep.target} is down ({rep.down_reason})" for rep in self.replicas)

    def stop(self, grace: float | None = None) -> None:
        grace = self.config.shutdown_grace_s if grace is None else grace

        async def _stop():
            self._closing = True
            await self._host.drain(grace)
            tasks = [t for t in [self._health_task] + [rep.watch_task for rep in self.replicas] if t is not None]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for rep in self.replicas:
                await rep.channel.close()

        self._host.run(_stop())
        self._host.close()

    # -- what the policy sees --------------------------------------------------------------

    def check(self, ids: list[int], request: pb.GenerateRequest) -> str:
        """Why the replicas would refuse the prompt ('' if they would not): checked before
        routing so a refused prompt never enters the policy's tree."""
        info = self.replicas[0].info
        bad = [t for t in ids if not 0 <= t < info.vocab_size]
        if bad:
            return f"prompt token ids {bad[:5]} are outside the vocabulary [0, {info.vocab_size})"
        try:
            params = sampling_params(request)
        except ValueError as e:
            return str(e)
        limit = min(rep.info.max_model_len for rep in self.replicas)
        if len(ids) + params.max_tokens > limit:
            return f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds max_model_len={limit}"
        return ""

    def describe(self) -> dict:
        cfg = self.config
        return {"policy": self.policy.name, "replicas": self.targets,
                "report_interval_s": cfg.report_interval_s, "health_interval_s": cfg.health_interval_s,
                "health_timeout_s": cfg.health_timeout_s, "health_failures": cfg.health_failures,
                "max_reroutes": cfg.max_reroutes,
                "options": dataclasses.asdict(self._options) if self.policy.name == "preble-e2" else {}}

    def stats(self) -> pb.RouterStats:
        p = self.policy
        tree = getattr(p, "tree", None)
        out = pb.RouterStats(policy=p.name, decisions=dict(getattr(p, "decisions", {})))
        for i, rep in enumerate(self.replicas):
            s = out.replicas.add(target=rep.target, connected=rep.up, routed=rep.routed,
                                 outstanding=p.outstanding[i] if hasattr(p, "outstanding") else 0,
                                 cached_tokens=tree.tokens_on[i] if tree is not None else 0,
                                 evicted_tokens=rep.evicted_tokens, failed=rep.failed)
            if rep.load is not None:
                s.load.CopyFrom(rep.load)
        return out

    def call(self, fn):
        """Runs fn() on the router's event-loop thread and returns its result (tests and tools
        inspect the policy this way without racing it)."""
        async def run():
            return fn()
        return self._host.run(run())
