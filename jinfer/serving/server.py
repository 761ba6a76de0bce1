"""The gRPC server: a grpc.aio front end over one Engine driven by its own thread.

The engine is not thread-safe, so one thread owns it (`EngineLoop`): it takes commands (add,
abort) from a queue between steps and pushes each step's outputs to the asyncio queues of the
RPCs waiting on them. Requests that fail validation are answered INVALID_ARGUMENT with the
engine's message (which names the field) and never touch the engine's state; a full queue
answers RESOURCE_EXHAUSTED; a client that goes away aborts its request, freeing its pages.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import math
import queue
import threading
import time
import uuid

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import jinfer
from jinfer.config import ServingConfig  # noqa: F401  (part of this module's API)
from jinfer.sampling_params import SamplingParams
from jinfer.serving.metrics import ServerMetrics
from jinfer.serving import inference_pb2 as pb
from jinfer.serving import inference_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name  # "jinfer.v1.Inference"


class _Watcher:
    __slots__ = ("sink", "interval", "last_time", "last_load")

    def __init__(self, sink, interval: float):
        self.sink, self.interval = sink, interval
        self.last_time, self.last_load = -math.inf, None


@dataclasses.dataclass(frozen=True)
class _Add:
    prompt: object  # str | list[int]
    params: SamplingParams
    request_id: str
    priority: int
    sink: object  # called with each RequestOutput, or with an Exception
    done: concurrent.futures.Future  # the request id, or the engine's ValueError
    tier: str


@dataclasses.dataclass(frozen=True)
class _Abort:
    request_id: str
    sink: object  # the stream giving up: a later request that reused the id is not aborted


@dataclasses.dataclass(frozen=True)
class _Watch:
    watcher: "_Watcher"


@dataclasses.dataclass(frozen=True)
class _ResetPrefixCache:
    done: concurrent.futures.Future  # pages freed


@dataclasses.dataclass(frozen=True)
class _Wake:
    """Unblocks an idle loop (stop)."""


class EngineLoop:
    """Owns the engine on one thread; other threads talk to it through submit/abort.

    Watchers (routers) get (load dict, evictions) events: on subscribing, after a step that
    evicted prefix-cache pages, after changes at most every `interval` seconds, and whenever
    the loop goes idle with news. Evictions come as jinfer.prefix_cache.EvictionLog entries
    (a leaf and its parents evicted in one step: one (tokens, keep) entry).
    """

    def __init__(self, engine, metrics=None):
        self.engine = engine
        self.metrics = metrics  # ServerMetrics or None; touched only on the engine thread
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, callable] = {}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._watchers: list[_Watcher] = []
        self._watch_lock = threading.Lock()  # the list; unwatch comes from other threads
        # Not yet published; nobody listening: not even the token path of an eviction is built.
        self._evictions = engine.eviction_log(wanted=lambda: bool(self._watchers))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._commands.put(_Wake())
        self._thread.join()

    @property
    def num_outstanding(self) -> int:
        return len(self._sinks)

    def submit(self, prompt, params: SamplingParams, request_id: str, priority: int, sink, tier: str = ""
               ) -> concurrent.futures.Future:
        """Queues add_request; the future raises the engine's ValueError if it refuses. `sink`
        is called on the engine thread with each RequestOutput, or with an Exception."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(_Add(prompt, params, request_id, priority, sink, fut, tier))
        return fut

    def abort(self, request_id: str, sink) -> None:
        """Aborts the request `sink` was submitted with (if it is still that stream's)."""
        self._commands.put(_Abort(request_id, sink))

    def watch(self, sink, interval: float) -> _Watcher:
        """Subscribes `sink` (called on the engine thread with (load, evictions), or None when
        the loop ends the stream); returns the handle unwatch takes."""
        w = _Watcher(sink, interval)
        self._commands.put(_Watch(w))
        return w

    def unwatch(self, watcher: _Watcher) -> None:
        with self._watch_lock:
            if watcher in self._watchers:
                self._watchers.remove(watcher)

    def end_watches(self) -> None:
        """Ends every watch stream (server shutdown: they would otherwise never finish)."""
        with self._watch_lock:
            watchers, self._watchers = self._watchers, []
        for w in watchers:
            w.sink(None)

    def reset_prefix_cache(self) -> concurrent.futures.Future:
        """Evicts every unlocked prefix-cache page between steps; the future gives the count."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(_ResetPrefixCache(fut))
        return fut

    def load(self) -> dict:
        """The engine's load now, with the requests this server has outstanding (engine thread)."""
        return {**dataclasses.asdict(self.engine.load()), "outstanding": len(self._sinks)}

    def _publish(self, force: bool) -> None:
        """Sends news to watchers: evictions always; a changed load when its interval has
        passed, or at once when `force` (the loop is about to idle)."""
        with self._watch_lock:
            evictions = self._evictions.drain() if self._evictions is not None else []
            if not self._watchers:
                return
            now = time.monotonic()
            load = self.load()
            for w in self._watchers:
                if evictions or (load != w.last_load and (force or now - w.last_time >= w.interval)):
                    w.last_time, w.last_load = now, load
                    w.sink((load, evictions))

    def _handle_safely(self, cmd) -> None:
        """One command; whatever goes wrong with it is logged and the loop serves on."""
        try:
            self._handle(cmd)
        except Exception:  # noqa: BLE001 - the engine thread must outlive any one request
            log.exception("engine loop: command %s failed", type(cmd).__name__)

    def _handle(self, cmd) -> None:
        match cmd:
            case _Add():
                if not cmd.done.set_running_or_notify_cancel():
                    return  # the client went away before its request was added: add nothing
                try:
                    self.engine.add_request(cmd.prompt, cmd.params, request_id=cmd.request_id,
                                            priority=cmd.priority)
                except ValueError as e:
                    cmd.done.set_exception(e)
                    return
                self._sinks[cmd.request_id] = cmd.sink
                if self.metrics is not None:
                    self.metrics.on_admit(cmd.request_id, cmd.tier)
                cmd.done.set_result(cmd.request_id)
            case _Abort():
                if self._sinks.get(cmd.request_id) is cmd.sink:
                    del self._sinks[cmd.request_id]
                    self.engine.abort(cmd.request_id)
                    if self.metrics is not None:
                        self.metrics.on_done(cmd.request_id)
            case _Watch():
                w = cmd.watcher
                with self._watch_lock:
                    self._watchers.append(w)
                    w.last_time, w.last_load = time.monotonic(), self.load()
                w.sink((w.last_load, []))
            case _ResetPrefixCache():
                cmd.done.set_result(self.engine.reset_prefix_cache())
            case _Wake():
                pass
            case _:
                raise TypeError(f"unknown engine-loop command {cmd!r}")

    def _run(self) -> None:
        while not self._stopped.is_set():
            if self.metrics is not None:  # once per iteration, before blocking when idle
                self.metrics.update_engine(self.engine)
            busy = self.engine.has_unfinished()
            self._publish(force=not busy)
            try:  # block for work only when the engine is idle
                cmd = self._commands.get(block=not busy)
                self._handle_safely(cmd)
                while True:
                    self._handle_safely(self._commands.get_nowait())
            except queue.Empty:
                pass
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # noqa: BLE001 - reported to every waiting request
                log.exception("engine step failed")
                for request_id, sink in list(self._sinks.items()):
                    self.engine.abort(request_id)
                    if self.metrics is not None:
                        self.metrics.on_done(request_id)
                    sink(e)
                self._sinks.clear()
                continue
            if self.metrics is not None:
                self.metrics.on_outputs(outputs)
            # A request's stream ends with the last of its outputs that step: samples finishing
            # together are all delivered, and it stops counting as outstanding before that last
            # message goes out.
            last = {out.request_id: i for i, out in enumerate(outputs)}
            for i, out in enumerate(outputs):
                sink = self._sinks.get(out.request_id)
                if sink is None:
                    continue
                if last[out.request_id] == i and not self.engine.is_unfinished(out.request_id):
                    del self._sinks[out.request_id]
                    if self.metrics is not None:
                        self.metrics.on_done(out.request_id)
                sink(out)


def sampling_params(req: pb.GenerateRequest) -> SamplingParams:
    """The request's SamplingParams (ValueError naming a bad field)."""
    kw = {}
    for name in ("temperature", "top_k", "top_p", "min_p", "seed", "max_tokens", "n"):
        if req.HasField(name):
            kw[name] = getattr(req, name)
    kw.setdefault("temperature", 0.0)
    return SamplingParams(stop=tuple(req.stop), stop_token_ids=tuple(req.stop_token_ids),
                          ignore_eos=req.ignore_eos, logprobs=req.logprobs, **kw)


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, loop: EngineLoop, config: ServingConfig, config_json: str = ""):
        self.loop = loop
        self.config = config
        self.config_json = config_json

    async def Generate(self, request, context):
        cfg = self.config
        if request.ByteSize() > cfg.max_request_bytes:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"request is {request.ByteSize()} bytes; max_request_bytes={cfg.max_request_bytes}")
        kind = request.WhichOneof("prompt")
        if kind is None or (kind == "text" and not request.text) or (kind == "token_ids" and not request.token_ids.ids):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty: set text or token_ids")
        tier = request.tier or cfg.tiers[0]
        if tier not in cfg.tiers:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown tier={tier!r}; known: {list(cfg.tiers)}")
        try:
            params = sampling_params(request)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if self.loop.num_outstanding >= cfg.max_queued_requests:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"server is full ({cfg.max_queued_requests} requests queued or running); retry later")
        request_id = request.request_id or uuid.uuid4().hex
        prompt = request.text if kind == "text" else list(request.token_ids.ids)
        aio_loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        sink = lambda item: aio_loop.call_soon_threadsafe(outputs.put_nowait, item)  # noqa: E731
        finished, done = set(), False
        try:
            try:
                await asyncio.wrap_future(self.loop.submit(prompt, params, request_id, cfg.tiers.index(tier), sink,
                                                           tier))
            except ValueError as e:
                done = True  # refused: nothing was added
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            while len(finished) < params.n:
                out = await outputs.get()
                if isinstance(out, Exception):
                    await context.abort(grpc.StatusCode.INTERNAL, f"engine failed: {out}")
                first = out.first_token_time is not None and len(out.token_ids) == len(out.new_token_ids)
                msg = pb.GenerateResponse(
                    request_id=request_id, index=out.index, token_ids=out.new_token_ids, text=out.new_text,
                    logprobs=out.new_logprobs or [], finish_reason=out.finish_reason or "",
                    usage=pb.Usage(prompt_tokens=out.usage.prompt_tokens,
                                   completion_tokens=out.usage.completion_tokens,
                                   cached_prompt_tokens=out.usage.cached_prompt_tokens))
                if first and out.new_token_ids:
                    msg.ttft_s = out.first_token_time - out.arrival_time
                if out.finished:
                    finished.add(out.index)
                yield msg
            done = True
        finally:
            if not done:  # cancelled (even while being added), or the stream failed: free its pages
                self.loop.abort(request_id, sink)

    async def WatchReplica(self, request, context):
        interval = request.min_interval_s or 0.05
        if not 0 < interval <= 3600:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"min_interval_s={request.min_interval_s} must be in (0, 3600]")
        aio_loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        watcher = self.loop.watch(lambda item: aio_loop.call_soon_threadsafe(events.put_nowait, item), interval)
        try:
            while (item := await events.get()) is not None:
                load, evictions = item
                yield pb.ReplicaEvent(load=pb.ReplicaLoad(**load), evictions=[
                    pb.PrefixEviction(token_ids=tokens, keep=keep) for tokens, keep in evictions])
        finally:
            self.loop.unwatch(watcher)

    async def ResetPrefixCache(self, request, context):
        freed = await asyncio.wrap_future(self.loop.reset_prefix_cache())
        return pb.ResetPrefixCacheResponse(freed_pages=freed)

    async def GetServerInfo(self, request, context):
        info = self.loop.engine.info()
        return pb.ServerInfo(
            model=self.config.model_name, vocab_size=info.vocab_size, max_model_len=info.max_model_len,
            max_num_seqs=info.max_num_seqs, max_num_batched_tokens=info.max_num_batched_tokens,
            page_size=info.page_size, num_pages=info.num_pages,
            max_queued_requests=self.config.max_queued_requests, tiers=list(self.config.tiers),
            attention_backend=info.attention_backend, tp=info.tp, version=jinfer.__version__,
            config_json=self.config_json)


class BearerAuth(grpc.aio.ServerInterceptor):
    """Every call but health and reflection needs `authorization: Bearer <token>`."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}"

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny)

    async def intercept_service(self, continuation, details):
        if details.method.startswith(("/grpc.health.", "/grpc.reflection.")):
            return await continuation(details)
        if dict(details.invocation_metadata or ()).get("authorization") == self._expected:
            return await continuation(details)
        streaming = details.method.endswith(("/Generate", "/WatchReplica"))
        return self._deny_stream if streaming else self._deny_unary


class GrpcHost:
    """A grpc.aio server on its own event-loop thread: bearer auth on every call but health and
    reflection, grpc.health.v1 and reflection for the services given. The jinfer server and
    the router (scheduler/live.py) both run on one."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.server = None
        self.health = None
        self.services: tuple[str, ...] = ()

    def run(self, coro):
        """Runs a coroutine on the host's loop (started on first use) and returns its result."""
        if not self._thread.is_alive():
            self._thread.start()
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def serve(self, register, services: tuple[str, ...], address: str, *, auth_token: str | None = None,
                    options=(), credentials=None) -> int:
        """Builds the server, lets `register(server)` add the servicers, binds `address`
        (TLS with `credentials`), starts it and marks `services` SERVING; returns the port."""
        self.server = grpc.aio.server(interceptors=[BearerAuth(auth_token)] if auth_token else [],
                                      options=list(options))
        register(self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.services = tuple(services)
        reflection.enable_server_reflection(self.services + (health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            self.server)
        port = (self.server.add_secure_port(address, credentials) if credentials is not None
                else self.server.add_insecure_port(address))
        await self.server.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        return port

    async def _set_health(self, status) -> None:
        for name in ("",) + self.services:
            await self.health.set(name, status)

    async def drain(self, grace: float, before_stop=None) -> None:
        """Marks the services NOT_SERVING, runs before_stop(), then stops the server letting
        in-flight calls finish for up to `grace` seconds."""
        if self.server is None:
            return
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if before_stop is not None:
            before_stop()
        await self.server.stop(grace)

    def close(self) -> None:
        """Stops the event loop and joins its thread."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()


class Server:
    """The gRPC server and the engine loop, run on a background thread with its own event loop.

    start() returns once the port is bound (self.port); stop(grace) lets in-flight streams
    finish for up to `grace` seconds, then cancels the rest (their pages are freed).
    """

    def __init__(self, engine, config: ServingConfig = ServingConfig(), config_json: str = ""):
        """config_json: the launch configuration GetServerInfo reports (jinfer.launch)."""
        self.config = config
        self._config_json = config_json
        self.metrics = ServerMetrics() if config.metrics_port is not None else None
        self.loop = EngineLoop(engine, self.metrics)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._host = GrpcHost("grpc")

    def start(self) -> "Server":
        if self.metrics is not None:
            self.metrics_port = self.metrics.serve(self.config.metrics_port, self.config.metrics_host)
            log.info("metrics on http://%s:%d/metrics", self.config.metrics_host, self.metrics_port)
        self.loop.start()
        cfg = self.config
        limit = 4 * cfg.max_request_bytes
        creds = None
        if cfg.tls_cert:
            with open(cfg.tls_key, "rb") as k, open(cfg.tls_cert, "rb") as c:
                creds = grpc.ssl_server_credentials([(k.read(), c.read())])
        servicer = InferenceServicer(self.loop, cfg, self._config_json)
        self.port = self._host.run(self._host.serve(
            lambda server: pb_grpc.add_InferenceServicer_to_server(servicer, server), (SERVICE,),
            f"{cfg.host}:{cfg.port}", auth_token=cfg.auth_token, credentials=creds,
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]))
        log.info("serving %s on %s:%d", SERVICE, cfg.host, self.port)
        return self

    def stop(self, grace: float | None = None) -> None:
        """grace: seconds in-flight streams may take to finish; None: config.shutdown_grace_s."""
        grace = self.config.shutdown_grace_s if grace is None else grace
        start = time.monotonic()
        self._host.run(self._host.drain(grace, before_stop=self.loop.end_watches))  # watch streams never end alone
        self._host.close()
        self.loop.stop()
        if self.metrics is not None:
            self.metrics.stop()
        log.info("stopped in %.1fs", time.monotonic() - start)
