"""The live router: a gRPC server in front of N jinfer replica servers, routing with the same
policy objects the simulator drives (a jinfer.routing.Router: scheduler/routing/policies.py has Preble E2
and the baselines), and beside it (RouterConfig.http_port) the OpenAI-compatible HTTP API
(jinfer/router/http.py) over the same routing. This is mechanism (relaying, failover, load
reports); which replica a request goes to is the policy's.

It serves `jinfer.v1.Inference` itself (jinfer/router/services.py), so clients and
tools/benchmark_serving.py talk to it as to one server: each Generate (or HTTP completion) is routed (`Router.route`) and forwarded to the
chosen replica as token ids, its stream relayed back (`RouterServer.generate`); the first token
and the end feed `on_first_token` and `on_finish`. Every replica's `WatchReplica` stream feeds
`on_load` and `on_evict` (jinfer/router/links.py), so the policy's global radix tree follows
what the replicas really cache. `jinfer.v1.Router/GetRouterStats` shows what the policy sees (per
replica: routed, outstanding, cached tokens in its tree, last load report, evicted tokens,
failures; E2's decision counts).

Failover (links.py): a replica whose watch stream ends, whose health checks fail or whose
Generate fails with UNAVAILABLE is marked down and routed around until it is back. A request
whose replica fails before anything was relayed is routed again (at most `max_reroutes` times);
one that had started streaming fails with UNAVAILABLE naming the replica.

All policy calls run on the router's one event-loop thread, so the (single-threaded) policy
objects need no locks; the HTTP API runs its requests there too.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import time
import uuid
from typing import AsyncIterator, Callable

import grpc

from jinfer.config import ServingConfig
from jinfer.errors import shorten
from jinfer.router.config import RouterConfig
from jinfer.router.http import RouterFrontend
from jinfer.router.links import ReplicaLinks
from jinfer.router.pauses import Pause, Resuming
from jinfer.router.services import RouterInferenceServicer, RouterStatsServicer
from jinfer.routing import NoReplicaUp, RouteRequest, Router
from jinfer.serving import inference_pb2 as pb
from jinfer.serving.frontend import ServingError, check_prompt_text
from jinfer.serving.grpc_host import GrpcHost, add_service
from jinfer.serving.openai import HttpHost, OpenAIApi
from jinfer.serving.server import SERVICE, sampling_params

log = logging.getLogger(__name__)

ROUTER_SERVICE = pb.DESCRIPTOR.services_by_name["Router"].full_name  # "jinfer.v1.Router"

__all__ = ["ROUTER_SERVICE", "RouterConfig", "RouterServer"]


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


class RouterServer(Resuming):
    """Routes Inference calls (and, with config.http_port, OpenAI HTTP requests) across replica
    servers with a policy; runs on its own thread.

    policy: a Router (jinfer.routing), or a function (num_replicas, capacity_tokens) -> Router
    called once the replicas answered, with capacity_tokens = the smallest replica's KV pool
    (entrypoints.router.router_server builds one from a policy name). tokenizer:
    encodes text prompts; "auto" loads the one the replicas' launch config names (their
    GetServerInfo config_json); None accepts token-id prompts only (and no HTTP API).
    """

    def __init__(self, targets: list[str], policy: Router | Callable[[int, int], Router],
                 config: RouterConfig = RouterConfig(), tokenizer=None):
        if not targets:
            raise ValueError("no replicas: give at least one target host:port")
        if len(set(targets)) != len(targets):
            raise ValueError(f"replica targets {targets} repeat")
        self.targets = list(targets)
        self.config = config
        self.tokenizer = tokenizer
        self._policy_spec = policy
        self.policy: Router | None = None
        self._t0 = time.monotonic()
        self.links = ReplicaLinks(self.targets, config, self.now)
        # Requests paused at a tool call -> (replica holding their K/V, its epoch then), oldest
        # first; bounded: the oldest are forgotten (their replica aborts them after its timeout).
        self._paused: collections.OrderedDict[str, Pause] = collections.OrderedDict()
        self.port: int | None = None
        self.http_port: int | None = None
        self._host = GrpcHost("router")
        self._http: HttpHost | None = None

    def now(self) -> float:
        return time.monotonic() - self._t0

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The router's event loop: policy calls and relays run there, and nowhere else."""
        return self._host.loop

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> "RouterServer":
        """Connects to every replica (waiting up to connect_timeout_s), builds the policy, starts
        the watch streams and binds the ports. Raises ValueError / ConnectionError on failure,
        RuntimeError when a port is taken."""
        cfg = self.config
        try:
            self._host.run(self._connect())
            if cfg.http_port is not None:
                if self.tokenizer is None:
                    raise ValueError("http_port needs a tokenizer (the HTTP API takes text and chats): start "
                                     "the router with one")
                self._http = HttpHost(OpenAIApi(RouterFrontend(self), self._http_config()).app, cfg.host,
                                      cfg.http_port, name="router-http")
                self.http_port = self._http.port
            self.port = self._host.run(self._serve())
            if self._http is not None:
                self._http.start()
        except BaseException:
            if self._http is not None:
                self._http.stop(0)
            self._host.close()
            raise
        log.info("routing %s across %d replicas with %s on %s:%d", SERVICE, len(self.links), self.policy.name,
                 cfg.host, self.port)
        if self._http is not None:
            log.info("serving the OpenAI-compatible API on http://%s:%d/v1", cfg.host, self.http_port)
        return self

    def _channel_options(self) -> list[tuple[str, int]]:
        limit = self.config.max_message_bytes
        return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]

    async def _connect(self) -> None:
        await self.links.connect(self._channel_options())
        first = self.links[0].info
        if isinstance(self.tokenizer, str) and self.tokenizer == "auto":
            self.tokenizer = _replica_tokenizer(first)
        if not hasattr(self._policy_spec, "route"):  # a function that builds it
            capacity = min(rep.info.num_pages * rep.info.page_size for rep in self.links)
            self.policy = self._policy_spec(len(self.links), capacity)
        else:
            self.policy = self._policy_spec
            if getattr(self.policy, "num_replicas", len(self.links)) != len(self.links):
                raise ValueError(f"the policy was built for {self.policy.num_replicas} replicas, "
                                 f"{len(self.links)} targets given")
        await self.links.start(self.policy)

    async def _serve(self) -> int:
        cfg = self.config

        def register(server):
            add_service(server, RouterInferenceServicer(self), pb.DESCRIPTOR.services_by_name["Inference"])
            add_service(server, RouterStatsServicer(self), pb.DESCRIPTOR.services_by_name["Router"])

        return await self._host.serve(register, (SERVICE, ROUTER_SERVICE), f"{cfg.host}:{cfg.port}",
                                      auth_token=cfg.auth_token, options=self._channel_options())

    def _http_config(self) -> ServingConfig:
        """What the HTTP API needs of a server's config: the replicas' model and tiers, the
        router's token and message limit."""
        info = self.links[0].info
        return ServingConfig(tiers=tuple(info.tiers) or ("default",), model_name=info.model,
                             auth_token=self.config.auth_token, max_request_bytes=self.config.max_message_bytes)

    def stop(self, grace: float | None = None) -> None:
        """grace: seconds in-flight streams (gRPC and HTTP) may take to finish."""
        grace = self.config.shutdown_grace_s if grace is None else grace
        if self._http is not None:  # drains beside gRPC, within the same grace
            self._http.begin_stop(grace)

        async def drain():
            self.links.closing = True
            await self._host.drain(grace)

        self._host.run(drain())
        if self._http is not None:
            self._http.join()  # its relays end (or are cancelled) before the channels close
        self._host.run(self.links.close())
        self._host.close()

    # -- one request -----------------------------------------------------------------------

    async def generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        """Routes one request and relays its replica's stream; on the router's loop only.

        A replica that fails before anything was relayed is replaced (at most max_reroutes
        times). Raises ServingError: INVALID_ARGUMENT (a bad prompt or parameter; never routed),
        UNAVAILABLE (no replica up, or the replica failed mid-stream or too often), or the
        replica's own status, its message naming the replica. Close the generator to abort
        the request (the replica frees its pages)."""
        ids = await self._prompt_ids(request)
        request_id = request.request_id or uuid.uuid4().hex
        rreq = RouteRequest(request_id, tuple(ids), sampling_params(request).max_tokens)
        forward = pb.GenerateRequest()
        forward.CopyFrom(request)
        forward.token_ids.ids[:] = ids  # the oneof: replaces text, so replica and router agree on tokens
        forward.request_id = request_id
        start = self.now()
        for attempt in itertools.count():
            try:
                r = self.policy.route(rreq, self.now())
            except NoReplicaUp:
                raise ServingError("UNAVAILABLE", self.links.why_none_up()) from None
            except ValueError as e:
                raise ServingError("INVALID_ARGUMENT", str(e)) from None
            try:
                async with contextlib.aclosing(self._relay(r, rreq, forward, start)) as relay:
                    async for msg in relay:
                        yield msg
                return
            except _ReplicaFailed as e:
                if e.relayed or attempt >= self.config.max_reroutes:
                    raise ServingError("UNAVAILABLE", str(e)) from None
                log.info("request %s: %s; routing it again", request_id, e)

    async def _prompt_ids(self, request: pb.GenerateRequest) -> list[int]:
        kind = request.WhichOneof("prompt")
        if kind == "text" and request.text:
            if self.tokenizer is None:
                raise ServingError("INVALID_ARGUMENT", "this router has no tokenizer: send token_ids, or start "
                                                       "it with one")
            # Too long to fit is refused from its bytes, before a long text takes a while to tokenize.
            check_prompt_text(self.tokenizer, request.text, request.max_tokens if request.HasField("max_tokens")
                              else 1, self.info())
            ids = await asyncio.to_thread(self.tokenizer.encode, request.text)
        else:
            ids = list(request.token_ids.ids) if kind == "token_ids" else []
        if not ids:
            raise ServingError("INVALID_ARGUMENT", "prompt is empty: set text or token_ids")
        error = self.check(ids, request)
        if error:
            raise ServingError("INVALID_ARGUMENT", error)
        return ids

    async def _relay(self, r: int, rreq: RouteRequest, forward, start: float):
        """Forwards to replica r and relays its stream. Raises _ReplicaFailed when the replica is
        unavailable or marked down; ServingError with its status on any other replica error."""
        rep = self.links[r]
        epoch = rep.epoch
        rep.routed += 1
        call = rep.stub.Generate(forward, metadata=rep.metadata)
        rep.calls[call] = None
        first, relayed = True, False
        pauses = forward.n <= 1 and (forward.intercept_token_ids or forward.intercept)
        context = list(forward.token_ids.ids) if pauses else None  # a paused request's, to migrate it
        try:
            async for msg in call:
                if first and msg.token_ids:
                    first = False
                    now = self.now()
                    self.policy.on_first_token(r, rreq, now, now - start)
                if context is not None:
                    context.extend(msg.token_ids)
                if msg.paused:  # a tool call: its Resume comes back here (or migrates if r goes down)
                    self._remember_pause(rreq.request_id, Pause(r, epoch, context, forward))
                relayed = True
                yield msg
        except grpc.aio.AioRpcError as e:
            rep.failed += 1
            if e.code() != grpc.StatusCode.UNAVAILABLE:
                raise ServingError(e.code().name, f"replica {rep.target}: {e.details()}") from None
            self.links.mark_down(r, f"a Generate failed: {e.details()}", epoch=epoch)
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
                self.policy.on_finish(r, rreq, self.now())

    # -- what the policy sees --------------------------------------------------------------

    def check(self, ids: list[int], request: pb.GenerateRequest) -> str:
        """Why the replicas would refuse the request ('' if they would not): checked before
        routing so a refused prompt never enters the policy's tree."""
        info = self.links[0].info
        bad = [t for t in ids if not 0 <= t < info.vocab_size]
        if bad:
            return f"prompt token ids {bad[:5]} are outside the vocabulary [0, {info.vocab_size})"
        if request.tier and request.tier not in info.tiers:
            return f"unknown tier={shorten(request.tier)}; known: {list(info.tiers)}"
        try:
            params = sampling_params(request)
        except ValueError as e:
            return str(e)
        limit = min(rep.info.max_model_len for rep in self.links if not rep.removed)
        if len(ids) + params.max_tokens > limit:
            return f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds max_model_len={limit}"
        return ""

    def info(self) -> pb.ServerInfo:
        """GetServerInfo: the replicas' model as one server, the smallest of their limits (the
        longest request every replica takes, the smallest KV pool) and the sum of their queues.
        Thread-safe (the HTTP API reads it)."""
        reps = [rep for rep in self.links if not rep.removed]
        info = pb.ServerInfo()
        info.CopyFrom(min((rep.info for rep in reps), key=lambda i: i.num_pages * i.page_size))
        info.max_model_len = min(rep.info.max_model_len for rep in reps)
        info.max_queued_requests = sum(rep.info.max_queued_requests for rep in reps)
        info.config_json = json.dumps({"router": self.describe(), "replica": json.loads(info.config_json or "{}")})
        return info

    def describe(self) -> dict:
        cfg = self.config
        return {"policy": self.policy.name, "replicas": self.links.live_targets(), "http_port": self.http_port,
                "report_interval_s": cfg.report_interval_s, "health_interval_s": cfg.health_interval_s,
                "health_timeout_s": cfg.health_timeout_s, "health_failures": cfg.health_failures,
                "max_reroutes": cfg.max_reroutes,
                "options": getattr(self.policy, "describe", dict)()}

    def stats(self) -> pb.RouterStats:
        p = self.policy
        tree = getattr(p, "tree", None)
        out = pb.RouterStats(policy=p.name, decisions=dict(getattr(p, "decisions", {})))
        for i, rep in [(i, rep) for i, rep in enumerate(self.links) if not rep.removed]:  # removed: gone
            s = out.replicas.add(target=rep.target, connected=rep.up, routed=rep.routed,
                                 outstanding=p.outstanding[i] if hasattr(p, "outstanding") else 0,
                                 cached_tokens=tree.tokens_on[i] if tree is not None else 0,
                                 evicted_tokens=rep.evicted_tokens, failed=rep.failed)
            if rep.load is not None:
                s.load.CopyFrom(rep.load)
        return out

    def add_replica(self, target: str, timeout: float | None = None) -> int:
        """A replica joins while the router serves, cold (ReplicaLinks.add). Any thread."""
        return self._host.run(self.links.add(target, timeout))

    def remove_replica(self, target: str) -> int:
        """Takes a replica out for good; its streams finish (ReplicaLinks.remove). Any thread."""
        return self._host.run(self.links.remove(target))

    def replica_targets(self) -> list[str]:
        """The replicas in the router (up or down, not removed), in index order. Any thread."""
        return self.call(self.links.live_targets)

    def call(self, fn):
        """fn() on the router's event-loop thread, its result (to inspect the policy race-free)."""
        async def run():
            return fn()
        return self._host.run(run())
