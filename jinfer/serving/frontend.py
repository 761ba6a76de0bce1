"""The front door every serving protocol shares: admission, tokenization, one request's stream.

`Frontend.generate` is what a gRPC Generate or an HTTP completion does once the protocol has
parsed its request: check the tier and `n`, admit the request against the queue limit (counted
in samples: a request of n samples takes n places, reserved at once so a burst cannot overshoot),
tokenize a text prompt on a worker thread (never on the engine thread; the tokenizer releases
the GIL there), submit it to the engine loop and yield its RequestOutputs until every sample
has finished. A stream that ends early (client gone, deadline, error) aborts its request, so
its pages go back to the pool. Failures come as ServingError with a gRPC status code name and
a message that names the bad value (shortened).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
import uuid
from typing import AsyncIterator

from jinfer.config import ServingConfig
from jinfer.errors import shorten
from jinfer.request import RequestOutput
from jinfer.sampling_params import SamplingParams
from jinfer.scheduling_policy import AdmissionRefused
from jinfer.serving.engine_loop import EngineLoop, EngineUnavailable, Health

BIG_PROMPT_CHARS = 32768
"""Text prompts longer than this are tokenized apart from the others."""


class ServingError(Exception):
    """A request the server will not serve; `code` is a grpc.StatusCode name."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def check_prompt_text(tokenizer, text: str, max_tokens: int, info) -> None:
    """Refuses (INVALID_ARGUMENT) a text prompt too long to fit, from its bytes alone, before
    it is tokenized. No valid prompt is refused: no token stands for more than the tokenizer's
    max_bytes_per_token bytes of text. info: max_model_len, num_pages and page_size."""
    pool = info.num_pages * info.page_size
    limit = min(info.max_model_len, pool)
    what = f"max_model_len={info.max_model_len}" if limit == info.max_model_len else f"the KV pool ({pool} tokens)"
    if max_tokens >= limit:  # no prompt fits: the fault is max_tokens'
        raise ServingError("INVALID_ARGUMENT", f"max_tokens={max_tokens} leaves no room for a prompt within {what}")
    at_least = tokenizer.min_tokens(text)
    if at_least + max_tokens > limit:
        raise ServingError("INVALID_ARGUMENT",
                           f"prompt is {len(text.encode('utf-8', 'surrogatepass'))} bytes, so at least {at_least} "
                           f"tokens (a token stands for at most {tokenizer.max_bytes_per_token} bytes): with "
                           f"max_tokens={max_tokens} it exceeds {what}; refused before tokenizing")


class Frontend:
    """Admits requests and streams their outputs; shared by every protocol a server speaks.

    Thread-safe: the gRPC and HTTP servers call it from their own event loops.
    """

    def __init__(self, loop: EngineLoop, config: ServingConfig, tokenizer):
        self.loop = loop
        self.config = config
        self.tokenizer = tokenizer
        tokenizer.max_bytes_per_token  # noqa: B018 - worked out now, not on the first request's event loop
        self._lock = threading.Lock()
        self._queued = 0  # samples admitted whose streams have not ended
        self._streams: dict[int, callable] = {}  # live stream -> its sink (fail_all reaches them)
        # Small prompts never queue behind big ones: those take a pool of their own (one thread,
        # which also bounds the memory big tokenizations hold at once).
        self._tokenize = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")
        self._tokenize_big = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize-big")

    @property
    def num_queued_samples(self) -> int:
        return self._queued

    def close(self) -> None:
        self._tokenize.shutdown(wait=False, cancel_futures=True)
        self._tokenize_big.shutdown(wait=False, cancel_futures=True)

    def info(self):
        """The engine's EngineInfo (vocab size, max_model_len, KV pages and page size)."""
        return self.loop.engine.info()

    def check_healthy(self) -> None:
        health = self.loop.health()
        if health is not Health.SERVING:
            raise ServingError("UNAVAILABLE", f"the engine is {health.value}: this server cannot serve now")

    def fail_all(self, message: str) -> None:
        """Ends every open stream with UNAVAILABLE (the engine loop died or stalled)."""
        with self._lock:
            sinks = list(self._streams.values())
        for sink in sinks:
            sink(EngineUnavailable(message))

    def resolve_tier(self, tier: str | None) -> str:
        tiers = self.config.tier_names
        tier = tier or tiers[0]
        if tier not in tiers:
            raise ServingError("INVALID_ARGUMENT", f"unknown tier={shorten(tier)}; known: {list(tiers)}")
        return tier

    def _admit(self, n: int) -> None:
        cfg = self.config
        if n > cfg.max_n:
            raise ServingError("INVALID_ARGUMENT", f"n={n} exceeds max_n={cfg.max_n}")
        if n > cfg.max_queued_requests:
            raise ServingError("INVALID_ARGUMENT", f"n={n} exceeds max_queued_requests={cfg.max_queued_requests}")
        with self._lock:
            if self._queued + n > cfg.max_queued_requests:
                raise ServingError("RESOURCE_EXHAUSTED",
                                   f"server is full ({self._queued} of max_queued_requests="
                                   f"{cfg.max_queued_requests} samples queued or running, this request has {n}); "
                                   "retry later")
            self._queued += n

    def _release(self, n: int) -> None:
        with self._lock:
            self._queued -= n

    def _check_prompt(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise ServingError("INVALID_ARGUMENT", "prompt is empty: set text or token_ids")
        try:
            self.loop.engine.check_prompt(ids, params)
        except ValueError as e:
            raise ServingError("INVALID_ARGUMENT", str(e)) from None

    def check_prompt_text(self, text: str, max_tokens: int) -> None:
        """check_prompt_text against this engine's limits."""
        check_prompt_text(self.tokenizer, text, max_tokens, self.info())

    async def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """The prompt's ids, tokenized on a worker thread (prompts over BIG_PROMPT_CHARS on a
        pool of their own)."""
        pool = self._tokenize_big if len(text) > BIG_PROMPT_CHARS else self._tokenize
        return await asyncio.get_running_loop().run_in_executor(
            pool, functools.partial(self.tokenizer.encode, text, add_special_tokens=add_special_tokens))

    async def generate(self, prompt: str | list[int], params: SamplingParams, *, request_id: str | None = None,
                       tier: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs (all samples, interleaved) until every sample finished.

        Raises ServingError: INVALID_ARGUMENT (bad tier, n, prompt or request id),
        RESOURCE_EXHAUSTED (queue full, or the policy's admission check refused it), UNAVAILABLE (engine dead or stalled), INTERNAL (a step
        failed). Close the generator (contextlib.aclosing) to abort a request mid-stream.
        """
        self.check_healthy()
        tier = self.resolve_tier(tier)
        if (params.intercept_token_ids or params.intercept) and params.n > 1:
            raise ServingError("INVALID_ARGUMENT", f"intercept_token_ids and intercept need n=1 (got n={params.n}): "
                                                   "each paused request is resumed by its id")
        if isinstance(prompt, str):  # a bad prompt is INVALID_ARGUMENT however full the server is
            self.check_prompt_text(prompt, params.max_tokens)
        else:
            self._check_prompt(prompt, params)
        self._admit(params.n)
        request_id = request_id or uuid.uuid4().hex

        async def submit(sink) -> list[int]:
            if isinstance(prompt, str):
                ids = await self.encode(prompt)
                self._check_prompt(ids, params)
            else:
                ids = prompt
            return self.loop.submit(ids, params, request_id, self.config.tier_names.index(tier), sink,
                                    self.config.tier(tier))

        async for out in self._stream(request_id, params.n, submit):
            yield out

    async def resume(self, request_id: str, tool_output: str | list[int]) -> AsyncIterator[RequestOutput]:
        """Continues a request paused at one of its intercept_token_ids (its generate() stream
        ended with a paused output) with its tool's output (text: tokenized without special
        tokens); yields its outputs until it finishes or pauses again. ServingError: NOT_FOUND
        (nothing of that id is paused here), INVALID_ARGUMENT (the output does not fit or is
        outside the vocabulary), RESOURCE_EXHAUSTED, UNAVAILABLE, INTERNAL as generate()."""
        self.check_healthy()
        self._admit(1)

        async def submit(sink):
            ids = await self.encode(tool_output, add_special_tokens=False) if isinstance(tool_output, str) \
                else list(tool_output)
            return self.loop.resume(request_id, ids, sink)

        async for out in self._stream(request_id, 1, submit):
            yield out

    async def _stream(self, request_id: str, n: int, submit) -> AsyncIterator[RequestOutput]:
        """One stream of a request admitted for n samples: `submit(sink)` hands it to the engine
        loop (returning the loop's future); yields outputs until every sample finished or
        paused; a stream ending early aborts the request."""
        aio_loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        sink = lambda item: aio_loop.call_soon_threadsafe(outputs.put_nowait, item)  # noqa: E731
        key = id(sink)
        with self._lock:
            self._streams[key] = sink
        submitted = finished = False
        try:
            fut = await submit(sink)
            submitted = True
            try:
                await asyncio.wrap_future(fut)
            except KeyError:
                submitted = False
                raise ServingError("NOT_FOUND", f"no request {shorten(request_id)} is paused on this server") from None
            except ValueError as e:
                submitted = False  # refused: nothing was added
                raise ServingError("INVALID_ARGUMENT", str(e)) from None
            except AdmissionRefused as e:
                submitted = False
                raise ServingError("RESOURCE_EXHAUSTED", str(e)) from None
            except EngineUnavailable as e:
                submitted = False
                raise ServingError("UNAVAILABLE", str(e)) from None
            done = set()
            while len(done) < n:
                out = await outputs.get()
                if isinstance(out, EngineUnavailable):
                    raise ServingError("UNAVAILABLE", str(out))
                if isinstance(out, Exception):
                    raise ServingError("INTERNAL", f"engine failed: {out}")
                if out.finished or out.paused:
                    done.add(out.index)
                yield out
            finished = True
        finally:
            with self._lock:
                self._streams.pop(key, None)
            if submitted and not finished:  # cancelled (even while being added), or failed: free its pages
                self.loop.abort(request_id, sink)
            self._release(n)
