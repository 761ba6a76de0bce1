"""The live router: a gRPC server in front of N jinfer replica servers, routing with the same
policy objects the simulator drives (scheduler/routing.py).

It serves `jinfer.v1.Inference` itself, so clients and tools/benchmark_serving.py talk to it as
to one server: each Generate is routed (`Router.route`) and forwarded to the chosen replica as
token ids, its stream relayed back; the first token and the end feed `on_first_token` and
`on_finish`. Every replica's `WatchReplica` stream feeds `on_load` and `on_evict`, so the policy's
global radix tree follows what the replicas really cache. `jinfer.v1.Router/GetRouterStats`
shows what the policy sees (per replica: routed, outstanding, cached tokens in its tree, last
load report, evicted tokens, failures; E2's decision counts).

All policy calls run on the router's one event-loop thread, so the (single-threaded) policy
objects need no locks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid

import grpc

from jinfer.serving import inference_pb2 as pb
from jinfer.serving import inference_pb2_grpc as pb_grpc
from jinfer.serving.server import SERVICE, GrpcHost, sampling_params
from scheduler.cost_model import CostModel
from scheduler.routing import E2Options, ReplicaLoad, RouteRequest, Router, make_router

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

    def __post_init__(self):
        if not 0 < self.report_interval_s <= 3600:
            raise ValueError(f"report_interval_s={self.report_interval_s} must be in (0, 3600]")
        if self.connect_timeout_s <= 0:
            raise ValueError(f"connect_timeout_s={self.connect_timeout_s} must be > 0")
        if self.shutdown_grace_s < 0:
            raise ValueError(f"shutdown_grace_s={self.shutdown_grace_s} must be >= 0")


class _Replica:
    def __init__(self, target: str, channel, metadata):
        self.target = target
        self.channel = channel
        self.stub = pb_grpc.InferenceStub(channel)
        self.metadata = metadata
        self.info: pb.ServerInfo | None = None
        self.connected = False
        self.routed = self.failed = self.evicted_tokens = 0
        self.load: pb.ReplicaLoad | None = None
        self.watch_task: asyncio.Task | None = None


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
        request_id = request.request_id or uuid.uuid4().hex
        rreq = RouteRequest(request_id, tuple(ids), sampling_params(request).max_tokens)
        start = o.now()
        try:
            r = o.policy.route(rreq, start)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        rep = o.replicas[r]
        rep.routed += 1
        forward = pb.GenerateRequest()
        forward.CopyFrom(request)
        forward.token_ids.ids[:] = ids  # the oneof: replaces text, so replica and router agree on tokens
        forward.request_id = request_id
        call = rep.stub.Generate(forward, metadata=rep.metadata)
        first = True
        try:
            async for msg in call:
                if first and msg.token_ids:
                    first = False
                    now = o.now()
                    o.policy.on_first_token(r, rreq, now, now - start)
                yield msg
        except grpc.aio.AioRpcError as e:
            rep.failed += 1
            await context.abort(e.code(), f"replica {rep.target}: {e.details()}")
        finally:
            call.cancel()  # the client went away (or nothing: the call is done): the replica aborts it
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
        """Resets every replica's prefix cache; the evictions reach the policy's tree."""
        o = self.o
        try:
            freed = await asyncio.gather(*(rep.stub.ResetPrefixCache(pb.ResetPrefixCacheRequest(),
                                                                     metadata=rep.metadata, timeout=60)
                                           for rep in o.replicas))
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
        metadata = (("authorization", f"Bearer {cfg.replica_token}"),) if cfg.replica_token else ()
        self.replicas = [_Replica(t, grpc.aio.insecure_channel(t, options), metadata) for t in self.targets]

        async def info(rep):
            try:
                rep.info = await rep.stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=rep.metadata,
                                                        timeout=cfg.connect_timeout_s, wait_for_ready=True)
            except grpc.aio.AioRpcError as e:
                raise ConnectionError(f"replica {rep.target} did not answer: {e.code().name} {e.details()}") from None

        await asyncio.gather(*(info(rep) for rep in self.replicas))
        first = self.replicas[0].info
        for rep in self.replicas[1:]:
            if (rep.info.vocab_size, rep.info.model) != (first.vocab_size, first.model):
                raise ValueError(f"replica {rep.target} serves {rep.info.model!r} (vocab {rep.info.vocab_size}) but "
                                 f"{self.replicas[0].target} serves {first.model!r} (vocab {first.vocab_size})")
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
        def register(server):
            pb_grpc.add_InferenceServicer_to_server(_RouterInference(self), server)
            pb_grpc.add_RouterServicer_to_server(_RouterStats(self), server)

        self.port = await self._host.serve(register, (SERVICE, ROUTER_SERVICE), f"{cfg.host}:{cfg.port}",
                                           auth_token=cfg.auth_token, options=options)

    async def _watch(self, i: int) -> None:
        """Follows replica i's WatchReplica stream, reconnecting while the router runs."""
        rep = self.replicas[i]
        request = pb.WatchReplicaRequest(min_interval_s=self.config.report_interval_s)
        while not self._closing:
            call = rep.stub.WatchReplica(request, metadata=rep.metadata)
            try:
                async for event in call:
                    rep.connected = True
                    for ev in event.evictions:
                        self.policy.on_evict(i, tuple(ev.token_ids), ev.keep)
                        rep.evicted_tokens += len(ev.token_ids) - ev.keep
                    rep.load = event.load
                    self.policy.on_load(i, _load(event.load), self.now())
            except grpc.aio.AioRpcError as e:
                if not self._closing:
                    log.warning("replica %s: watch stream ended (%s); reconnecting", rep.target, e.code().name)
            finally:
                call.cancel()
            rep.connected = False
            if not self._closing:
                await asyncio.sleep(0.5)

    def stop(self, grace: float | None = None) -> None:
        grace = self.config.shutdown_grace_s if grace is None else grace

        async def _stop():
            self._closing = True
            await self._host.drain(grace)
            for rep in self.replicas:
                if rep.watch_task is not None:
                    rep.watch_task.cancel()
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
        return {"policy": self.policy.name, "replicas": self.targets,
                "report_interval_s": self.config.report_interval_s,
                "options": dataclasses.asdict(self._options) if self.policy.name == "preble-e2" else {}}

    def stats(self) -> pb.RouterStats:
        p = self.policy
        tree = getattr(p, "tree", None)
        out = pb.RouterStats(policy=p.name, decisions=dict(getattr(p, "decisions", {})))
        for i, rep in enumerate(self.replicas):
            s = out.replicas.add(target=rep.target, connected=rep.connected, routed=rep.routed,
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
