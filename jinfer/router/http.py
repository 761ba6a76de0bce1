"""The router's side of the OpenAI-compatible HTTP API: the frontend OpenAIApi serves
(jinfer/serving/openai/app.py: generate, check_healthy, tokenizer, info) over the router's
routing and relay (`RouterServer.generate`).

The HTTP API runs on uvicorn's event loop; routing and relaying must run on the router's (the
policy objects are single-threaded and live there). `RouterFrontend.generate` turns the request
into a GenerateRequest, runs the router's routing + relay on the router's loop
(asyncio.run_coroutine_threadsafe), takes the replica's messages back through a queue on the
HTTP loop and rebuilds from them the RequestOutputs the views expect. Closing its stream (the
client went away) cancels the relay, so the replica aborts the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import AsyncIterator, Callable

from jinfer.request import RequestOutput, Usage
from jinfer.sampling_params import SamplingParams
from jinfer.serving import inference_pb2 as pb
from jinfer.serving.frontend import ServingError, check_prompt_text

log = logging.getLogger(__name__)

_END = object()  # the relay ended: every sample finished


def generate_request(prompt: str | list[int], params: SamplingParams, request_id: str,
                     tier: str | None) -> pb.GenerateRequest:
    """The GenerateRequest that asks a replica for what `prompt` and `params` ask."""
    request = pb.GenerateRequest(
        temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p,
        max_tokens=params.max_tokens, n=params.n, stop=list(params.stop), stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos, logprobs=params.logprobs, tier=tier or "", request_id=request_id,
        intercept_token_ids=list(params.intercept_token_ids), intercept=list(params.intercept),
        speculate=params.speculate)
    if params.seed is not None:
        request.seed = params.seed
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids[:] = prompt
    return request


class _Samples:
    """A request's RequestOutputs rebuilt from its replica's GenerateResponses: each message is
    one sample's deltas (new ids, text, logprobs) with that sample's running usage."""

    def __init__(self, request_id: str, logprobs: bool):
        self.request_id, self.logprobs = request_id, logprobs
        self.arrival = time.monotonic()
        self._ids: dict[int, list[int]] = {}  # sample -> its output ids so far
        self._text: dict[int, str] = {}
        self._first: dict[int, float] = {}  # sample -> when its first token reached the router

    def output(self, msg: pb.GenerateResponse) -> RequestOutput:
        now, i = time.monotonic(), msg.index
        new_ids = list(msg.token_ids)
        ids = self._ids.setdefault(i, [])
        ids += new_ids
        text = self._text[i] = self._text.get(i, "") + msg.text
        if new_ids:
            self._first.setdefault(i, now)
        finished = bool(msg.finish_reason)
        return RequestOutput(
            request_id=self.request_id, index=i, new_token_ids=new_ids, new_text=msg.text,
            new_logprobs=list(msg.logprobs) if self.logprobs else None, token_ids=list(ids), text=text,
            finished=finished, finish_reason=msg.finish_reason or None,
            usage=Usage(msg.usage.prompt_tokens, msg.usage.completion_tokens, msg.usage.cached_prompt_tokens),
            arrival_time=self.arrival, first_token_time=self._first.get(i), finish_time=now if finished else None,
            paused=msg.paused)


async def _pump(router, request, put: Callable[[object], None]) -> None:
    """On the router's loop: routes and relays the request (a GenerateRequest, or a
    ResumeRequest to its paused request's replica), handing each message, then _END or the
    ServingError that ended it, to `put`. Cancelling it closes the relay."""
    relay = router.resume if isinstance(request, pb.ResumeRequest) else router.generate
    try:
        async with contextlib.aclosing(relay(request)) as stream:
            async for msg in stream:
                put(msg)
    except ServingError as e:
        put(e)
        return
    except Exception as e:  # noqa: BLE001 - a router bug: the client gets a 500 instead of a hang
        log.exception("request %s failed in the router", request.request_id)
        put(ServingError("INTERNAL", f"the router failed: {type(e).__name__}"))
        return
    put(_END)


class RouterFrontend:
    """What OpenAIApi needs of a frontend, over a RouterServer: each request routed (and
    re-routed on failover) exactly as the router's gRPC Generate is."""

    def __init__(self, router):
        self.router = router

    @property
    def tokenizer(self):
        return self.router.tokenizer

    def info(self) -> pb.ServerInfo:
        """vocab_size, max_model_len, page_size and num_pages every replica can serve."""
        return self.router.info()

    def check_healthy(self) -> None:
        """ServingError UNAVAILABLE unless some replica is up."""
        links = self.router.links
        if links.closing:
            raise ServingError("UNAVAILABLE", "the router is stopping")
        if not any(rep.up for rep in links):
            raise ServingError("UNAVAILABLE", links.why_none_up())

    def check_prompt_text(self, text: str, max_tokens: int) -> None:
        """ServingError if the text cannot fit, from its bytes alone (before tokenizing)."""
        check_prompt_text(self.tokenizer, text, max_tokens, self.info())

    async def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens=add_special_tokens)

    async def generate(self, prompt: str | list[int], params: SamplingParams, *, request_id: str | None = None,
                       tier: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs (all samples, interleaved) until every sample finished;
        raises ServingError as RouterServer.generate does. Close it to abort the request."""
        if isinstance(prompt, str):
            self.check_prompt_text(prompt, params.max_tokens)
        request = generate_request(prompt, params, request_id or uuid.uuid4().hex, tier)
        async for out in self._relay(request, params.logprobs):
            yield out

    async def resume(self, request_id: str, tool_output: str | list[int]) -> AsyncIterator[RequestOutput]:
        """A paused request's next segment, from the replica holding it (RouterServer.resume)."""
        if isinstance(tool_output, str):
            request = pb.ResumeRequest(request_id=request_id, text=tool_output)
        else:
            request = pb.ResumeRequest(request_id=request_id, token_ids=pb.TokenIds(ids=list(tool_output)))
        async for out in self._relay(request, logprobs=False):
            yield out

    async def _relay(self, request, logprobs: bool) -> AsyncIterator[RequestOutput]:
        http_loop = asyncio.get_running_loop()
        replies: asyncio.Queue = asyncio.Queue()

        def put(item) -> None:
            with contextlib.suppress(RuntimeError):  # the HTTP loop is gone: so is this request
                http_loop.call_soon_threadsafe(replies.put_nowait, item)

        relay = asyncio.run_coroutine_threadsafe(_pump(self.router, request, put), self.router.loop)
        samples = _Samples(request.request_id, logprobs)
        try:
            while (item := await replies.get()) is not _END:
                if isinstance(item, ServingError):
                    raise item
                yield samples.output(item)
        finally:
            relay.cancel()  # a no-op once it ended; else the relay is cancelled and the replica aborts
