"""The gRPC server: jinfer.v1.Inference over one Engine driven by its own thread, and beside it
(ServingConfig.http_port) the OpenAI-compatible HTTP API (jinfer/serving/openai) on the same
frontend.

The engine loop (engine_loop.py) owns the engine; the frontend (frontend.py) admits requests
and streams their outputs; this file turns Generate calls into frontend calls and hosts them
(grpc_host.py). Requests that fail validation are answered INVALID_ARGUMENT with a message that
names the field and never touch the engine's state; a full queue answers RESOURCE_EXHAUSTED;
a dead or stalled engine turns health NOT_SERVING and answers UNAVAILABLE (an engine loop that
crashes is restarted and serves on, its requests in flight failed UNAVAILABLE: engine_loop.py);
a client that goes away aborts its request, freeing its pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid

import grpc

import jinfer
from jinfer.config import ServingConfig, Tier
from jinfer.sampling_params import SamplingParams
from jinfer.serving import inference_pb2 as pb
from jinfer.serving import inference_pb2_grpc as pb_grpc
from jinfer.serving.engine_loop import EngineLoop, Health
from jinfer.serving.frontend import Frontend, ServingError
from jinfer.serving.goodput import Goodput, GoodputStats
from jinfer.serving.grpc_host import GrpcHost, abort, add_service, clip_details  # noqa: F401  (GrpcHost: the router's)
from jinfer.serving.metrics import ServerMetrics
from jinfer.serving.openai import HttpHost, OpenAIApi

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name  # "jinfer.v1.Inference"


def sampling_params(req: pb.GenerateRequest) -> SamplingParams:
    """The request's SamplingParams (ValueError naming a bad field)."""
    kw = {}
    for name in ("temperature", "top_k", "top_p", "min_p", "seed", "max_tokens", "n"):
        if req.HasField(name):
            kw[name] = getattr(req, name)
    kw.setdefault("temperature", 0.0)
    if req.HasField("speculate"):
        kw["speculate"] = req.speculate
    return SamplingParams(stop=tuple(req.stop), stop_token_ids=tuple(req.stop_token_ids),
                          intercept_token_ids=tuple(req.intercept_token_ids), intercept=tuple(req.intercept),
                          ignore_eos=req.ignore_eos, logprobs=req.logprobs, **kw)


def _response(request_id: str, out) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(
        request_id=request_id, index=out.index, token_ids=out.new_token_ids, text=out.new_text,
        logprobs=out.new_logprobs or [], finish_reason=out.finish_reason or "", paused=out.paused,
        usage=pb.Usage(prompt_tokens=out.usage.prompt_tokens, completion_tokens=out.usage.completion_tokens,
                       cached_prompt_tokens=out.usage.cached_prompt_tokens, draft_tokens=out.usage.draft_tokens,
                       accepted_draft_tokens=out.usage.accepted_draft_tokens, spec_steps=out.usage.spec_steps))
    first = out.first_token_time is not None and len(out.token_ids) == len(out.new_token_ids)
    if first and out.new_token_ids:
        msg.ttft_s = out.first_token_time - out.arrival_time
    return msg


def tier_info(tier: Tier) -> pb.TierInfo:
    """A tier's targets as GetServerInfo and GetServerStats give them (0 ms: no target)."""
    ms = lambda s: 0.0 if math.isinf(s) else s * 1e3  # noqa: E731
    return pb.TierInfo(name=tier.name, ttft_ms=ms(tier.ttft_s), tpot_ms=ms(tier.tpot_s), weight=tier.weight,
                       best_effort=tier.best_effort, judged=tier.judged)


def server_stats(stats: GoodputStats) -> pb.ServerStats:
    """GetServerStats' answer: a goodput snapshot, tier by tier."""
    msg = pb.ServerStats(uptime_s=stats.uptime_s, window_s=stats.window_s)
    for t in stats.tiers:
        msg.tiers.add(tier=tier_info(t.tier), finished=t.finished, slo_met=t.slo_met, ttft_missed=t.ttft_missed,
                      tpot_missed=t.tpot_missed, goodput_tokens=t.goodput_tokens, aborted=t.aborted,
                      refused=t.refused, demoted=t.demoted, goodput_rps=t.goodput_rps,
                      goodput_tokens_per_s=t.goodput_tokens_per_s, recent_goodput_rps=t.recent_goodput_rps,
                      recent_goodput_tokens_per_s=t.recent_goodput_tokens_per_s)
    return msg


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, frontend: Frontend, config: ServingConfig, goodput: Goodput, config_json: str = ""):
        """goodput: the ledger the engine loop feeds (GetServerStats reads it)."""
        self.frontend = frontend
        self.loop = frontend.loop
        self.config = config
        self.goodput = goodput
        self.config_json = config_json

    def _prompt(self, request):
        """The prompt (text or ids) of a Generate request (ServingError if it has none)."""
        if request.ByteSize() > self.config.max_request_bytes:
            raise ServingError("INVALID_ARGUMENT", f"request is {request.ByteSize()} bytes; "
                                                   f"max_request_bytes={self.config.max_request_bytes}")
        kind = request.WhichOneof("prompt")
        if kind is None or (kind == "text" and not request.text) or (kind == "token_ids" and not request.token_ids.ids):
            raise ServingError("INVALID_ARGUMENT", "prompt is empty: set text or token_ids")
        return request.text if kind == "text" else list(request.token_ids.ids)

    async def Generate(self, request, context):
        try:
            prompt = self._prompt(request)
            try:
                params = sampling_params(request)
            except ValueError as e:
                raise ServingError("INVALID_ARGUMENT", str(e)) from None
            request_id = request.request_id or uuid.uuid4().hex
            stream = self.frontend.generate(prompt, params, request_id=request_id, tier=request.tier)
            async with contextlib.aclosing(stream):
                async for out in stream:
                    yield _response(request_id, out)
        except ServingError as e:
            await abort(context, grpc.StatusCode[e.code], clip_details(e.message))

    async def Resume(self, request, context):
        try:
            if request.ByteSize() > self.config.max_request_bytes:
                raise ServingError("INVALID_ARGUMENT", f"request is {request.ByteSize()} bytes; "
                                                       f"max_request_bytes={self.config.max_request_bytes}")
            if not request.request_id:
                raise ServingError("INVALID_ARGUMENT", "request_id is empty: give the paused request's id")
            kind = request.WhichOneof("tool_output")
            tool = list(request.token_ids.ids) if kind == "token_ids" else request.text
            stream = self.frontend.resume(request.request_id, tool)
            async with contextlib.aclosing(stream):
                async for out in stream:
                    yield _response(request.request_id, out)
        except ServingError as e:
            await abort(context, grpc.StatusCode[e.code], clip_details(e.message))

    async def WatchReplica(self, request, context):
        interval = request.min_interval_s or 0.05
        if not 0 < interval <= 3600:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT,
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
            max_queued_requests=self.config.max_queued_requests, tiers=list(self.config.tier_names),
            attention_backend=info.attention_backend, tp=info.tp, version=jinfer.__version__,
            config_json=self.config_json, tier_info=[tier_info(t) for t in self.config.tier_table])

    async def GetServerStats(self, request, context):
        return server_stats(self.goodput.snapshot())


class Server:
    """The gRPC server and the engine loop, run on a background thread with its own event loop,
    and with config.http_port the HTTP API on another (uvicorn's).

    start() returns once the ports are bound (self.port, self.http_port); stop(grace) lets
    in-flight streams of both finish for up to `grace` seconds, then cancels the rest (their
    pages are freed).
    """

    def __init__(self, engine, config: ServingConfig = ServingConfig(), config_json: str = ""):
        """config_json: the launch configuration GetServerInfo reports (jinfer.launch)."""
        self.config = config
        self._config_json = config_json
        # Goodput accounting is always on (GetServerStats); Prometheus only with a metrics port.
        # The policy's demotion counts are reported when it keeps them (scheduler.slo.policies.SloAware).
        self.goodput = Goodput(config.tier_table, policy=getattr(engine, "policy", None))
        self.metrics = ServerMetrics(self.goodput) if config.metrics_port is not None else None
        if self.metrics is not None:
            self.metrics.watch_warmup(engine)
        self.loop = EngineLoop(engine, [lis for lis in (self.goodput, self.metrics) if lis is not None],
                               config.engine_stall_timeout_s, pause_timeout_s=config.pause_timeout_s,
                               max_paused=config.max_paused_requests)
        self.frontend = Frontend(self.loop, config, engine.tokenizer)
        self._watchdog: asyncio.Task | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self._host = GrpcHost("grpc")
        self._http: HttpHost | None = None

    def start(self) -> "Server":
        cfg = self.config
        if cfg.http_port is not None:  # bound first: a taken port fails before anything runs
            self._http = HttpHost.from_config(OpenAIApi(self.frontend, cfg).app, cfg)
            self.http_port = self._http.port
        if self.metrics is not None:
            self.metrics_port = self.metrics.serve(self.config.metrics_port, self.config.metrics_host)
            log.info("metrics on http://%s:%d/metrics", self.config.metrics_host, self.metrics_port)
        self.loop.start()
        limit = 4 * cfg.max_request_bytes
        creds = None
        if cfg.tls_cert:
            with open(cfg.tls_key, "rb") as k, open(cfg.tls_cert, "rb") as c:
                creds = grpc.ssl_server_credentials([(k.read(), c.read())])
        servicer = InferenceServicer(self.frontend, cfg, self.goodput, self._config_json)
        self.port = self._host.run(self._host.serve(
            lambda server: add_service(server, servicer, pb.DESCRIPTOR.services_by_name["Inference"]), (SERVICE,),
            f"{cfg.host}:{cfg.port}", auth_token=cfg.auth_token, credentials=creds,
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]))
        self._host.run(self._start_watchdog())
        log.info("serving %s on %s:%d", SERVICE, cfg.host, self.port)
        if self._http is not None:
            self._http.start()
            log.info("serving the OpenAI-compatible API on %s://%s:%d/v1", "https" if cfg.tls_cert else "http",
                     cfg.host, self.http_port)
        self.loop.engine.release_warmup()  # the other step buckets compile now that requests can arrive
        return self

    def stop(self, grace: float | None = None) -> None:
        """grace: seconds in-flight streams may take to finish; None: config.shutdown_grace_s."""
        grace = self.config.shutdown_grace_s if grace is None else grace
        start = time.monotonic()
        if self._http is not None:  # drains beside gRPC, within the same grace
            self._http.begin_stop(grace)
        self._host.run(self._stop_watchdog())
        self._host.run(self._host.drain(grace, before_stop=self.loop.end_watches))  # watch streams never end alone
        self._host.close()
        if self._http is not None:
            self._http.join()
        self.loop.stop()
        self.frontend.close()
        if self.metrics is not None:
            self.metrics.stop()
        log.info("stopped in %.1fs", time.monotonic() - start)

    async def _start_watchdog(self) -> None:
        self._watchdog = asyncio.create_task(self._watch_engine())

    async def _stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog

    async def _watch_engine(self) -> None:
        """Health follows the engine loop: NOT_SERVING (and every open stream fails with
        UNAVAILABLE) while it is dead or stalled; SERVING again when a stalled step ends. A loop
        that crashed and restarted never reads dead here: it failed its own streams."""
        period = min(1.0, self.config.engine_stall_timeout_s / 4)
        serving = True
        while True:
            await asyncio.sleep(period)
            health = self.loop.health()
            if (health is Health.SERVING) == serving:
                continue
            serving = health is Health.SERVING
            await self._host.set_serving(serving)
            if serving:
                log.warning("engine loop recovered: serving again")
            else:
                log.error("engine loop %s: health NOT_SERVING, failing open streams", health.value)
                self.frontend.fail_all(f"the engine is {health.value}")
