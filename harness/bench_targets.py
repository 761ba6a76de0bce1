"""How the serving benchmark (benchmark.py) talks to a server: streamed gRPC Generate calls, or
streamed completions of the OpenAI-compatible HTTP API. Both give the same account of a
request (new token ids and text per message, usage at the end) and fail the same way
(RequestFailed, 'CODE: message'). Over gRPC the server also says its tiers' targets and its own
goodput count (GetServerStats); the HTTP API says neither.
"""

from __future__ import annotations

import dataclasses
import json
import ssl

import grpc
import httpx

from jinfer.serving import inference_pb2 as pb
from jinfer.serving import inference_pb2_grpc as pb_grpc
from scheduler.simulation.workloads import WorkItem


SERVER_COUNTS = ("finished", "slo_met", "ttft_missed", "tpot_missed", "goodput_tokens", "aborted", "refused",
                 "demoted")
"""The per-tier counts of GetServerStats (TierStats fields) the benchmark reads."""


class RequestFailed(Exception):
    """A request the server refused or broke off: 'CODE: message', CODE a gRPC status name or
    `HTTP <status>`."""


@dataclasses.dataclass(frozen=True)
class _Delta:
    """What one streamed message told about one request: new tokens, and at the end its usage."""

    token_ids: tuple[int, ...] = ()
    text: str = ""
    finish_reason: str = ""
    usage: tuple[int, int, int] | None = None  # prompt, completion, cached prompt tokens


class _GrpcTarget:
    """Streamed Generate calls to jinfer.v1.Inference (a server or a router)."""

    def __init__(self, target: str, token: str | None, root_cert: str | None):
        options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
        if root_cert:
            with open(root_cert, "rb") as f:
                self._channel = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(f.read()), options)
        else:
            self._channel = grpc.aio.insecure_channel(target, options)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._stub = pb_grpc.InferenceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def info(self) -> dict:
        try:
            info = await self._stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=self._metadata, timeout=30)
        except grpc.aio.AioRpcError as e:
            raise RequestFailed(f"{e.code().name}: {e.details()}") from None
        return {"model": info.model, "tiers": list(info.tiers), "max_model_len": info.max_model_len,
                "attention_backend": info.attention_backend, "tp": info.tp, "version": info.version,
                "vocab_size": info.vocab_size, "tier_targets": {
                    t.name: {"ttft_ms": t.ttft_ms, "tpot_ms": t.tpot_ms, "weight": t.weight,
                             "best_effort": t.best_effort, "judged": t.judged} for t in info.tier_info}}

    async def stats(self) -> dict | None:
        """The server's goodput count per tier since it started (GetServerStats): {"uptime_s",
        "tiers": {name: {"judged", "finished", "slo_met", ...}}}; None when it cannot say (a
        router answers UNIMPLEMENTED) or the call fails: the report then leaves it out."""
        try:
            stats = await self._stub.GetServerStats(pb.GetServerStatsRequest(), metadata=self._metadata, timeout=30)
        except grpc.aio.AioRpcError:
            return None
        return {"uptime_s": stats.uptime_s, "tiers": {t.tier.name: {
            "judged": t.tier.judged, **{k: getattr(t, k) for k in SERVER_COUNTS}} for t in stats.tiers}}

    async def stream(self, prompt, item: WorkItem, tier: str, ignore_eos: bool, temperature: float, seed: int,
                     timeout_s: float | None):
        req = pb.GenerateRequest(max_tokens=item.max_tokens, tier=tier, ignore_eos=ignore_eos,
                                 temperature=temperature, seed=seed, session_key=item.session)
        if isinstance(prompt, str):
            req.text = prompt
        else:
            req.token_ids.ids.extend(prompt)
        try:
            async for msg in self._stub.Generate(req, metadata=self._metadata, timeout=timeout_s):
                u = msg.usage
                yield _Delta(tuple(msg.token_ids), msg.text, msg.finish_reason, (
                    u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens) if msg.finish_reason else None)
        except grpc.aio.AioRpcError as e:
            raise RequestFailed(f"{e.code().name}: {e.details()}") from None


class _HttpTarget:
    """Streamed completions from the OpenAI-compatible HTTP API (jinfer/serving/openai): token
    ids come with each chunk (return_token_ids), usage in the last (include_usage)."""

    def __init__(self, target: str, token: str | None, root_cert: str | None):
        verify = ssl.create_default_context(cafile=root_cert) if root_cert else True
        self._client = httpx.AsyncClient(
            base_url=target.rstrip("/"), verify=verify, headers={"authorization": f"Bearer {token}"} if token else {},
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
            timeout=httpx.Timeout(30.0, pool=None))
        self._model = None

    async def close(self) -> None:
        await self._client.aclose()

    async def _check(self, response: httpx.Response) -> None:
        if response.status_code != 200:
            await response.aread()
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:200]
            raise RequestFailed(f"HTTP {response.status_code}: {message}")

    async def info(self) -> dict:
        try:
            response = await self._client.get("/v1/models")
            await self._check(response)
            card = response.json()["data"][0]
        except httpx.HTTPError as e:
            raise RequestFailed(f"{type(e).__name__}: {e}") from None
        self._model = card["id"]
        return {"model": card["id"], "tiers": card.get("tiers", []), "max_model_len": card.get("max_model_len"),
                "vocab_size": card.get("vocab_size"), "protocol": "http"}

    async def stats(self) -> None:
        """The HTTP API keeps no goodput count of its own: ask the server over gRPC."""
        return None

    async def stream(self, prompt, item: WorkItem, tier: str, ignore_eos: bool, temperature: float, seed: int,
                     timeout_s: float | None):
        body = {"model": self._model, "prompt": prompt if isinstance(prompt, str) else list(prompt),
                "max_tokens": item.max_tokens, "temperature": temperature, "seed": seed, "ignore_eos": ignore_eos,
                "tier": tier, "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
        try:
            async with self._client.stream("POST", "/v1/completions", json=body,
                                           timeout=httpx.Timeout(timeout_s, pool=None)) as response:
                await self._check(response)
                async for line in response.aiter_lines():
                    data = line.removeprefix("data: ")
                    if data == line or data == "[DONE]":
                        continue
                    chunk = json.loads(data)
                    if "error" in chunk:  # the stream failed after it started
                        error = chunk["error"]
                        raise RequestFailed(f"HTTP stream {error.get('code') or error['type']}: {error['message']}")
                    for choice in chunk["choices"]:
                        yield _Delta(tuple(choice.get("token_ids", ())), choice["text"], choice["finish_reason"] or "")
                    if chunk.get("usage"):
                        u = chunk["usage"]
                        cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
                        yield _Delta(usage=(u["prompt_tokens"], u["completion_tokens"], cached))
        except httpx.HTTPError as e:
            raise RequestFailed(f"{type(e).__name__}: {e}") from None


def connect(target: str, token: str | None = None, root_cert: str | None = None) -> _GrpcTarget | _HttpTarget:
    """An http:// or https:// URL: the OpenAI-compatible API; host:port: gRPC."""
    cls = _HttpTarget if target.startswith(("http://", "https://")) else _GrpcTarget
    return cls(target, token, root_cert)
