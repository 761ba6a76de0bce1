"""A request's RequestOutputs as OpenAI response bodies: whole (non-streaming) or as SSE chunks.

One view per endpoint: CompletionView (`text_completion`) and ChatView (`chat.completion`).
`collect` waits for every sample and builds the body; `stream` yields one chunk per output
(every output, even one whose text the detokenizer holds back, so a client sees each token's
arrival), chat's opening role deltas first, and with include_usage a last chunk with no
choices and the usage. Usage counts the prompt once and every sample's tokens; cached_tokens
is the prompt tokens the prefix cache served.
"""

from __future__ import annotations

import contextlib
import time
from typing import AsyncIterator

from jinfer.request import RequestOutput


def finish_reason(out: RequestOutput) -> str | None:
    """OpenAI's finish_reason, and "intercept" for a completion paused at a tool call."""
    return "intercept" if out.paused else out.finish_reason


def usage(last: dict[int, RequestOutput]) -> dict:
    """Usage of a request from each sample's latest output (keyed by sample index)."""
    first = last[min(last)].usage
    completion = sum(out.usage.completion_tokens for out in last.values())
    return {"prompt_tokens": first.prompt_tokens, "completion_tokens": completion,
            "total_tokens": first.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": first.cached_prompt_tokens}}


class _View:
    object: str
    chunk_object: str

    def __init__(self, request_id: str, model: str, request, tokenizer):
        self.id, self.model, self.request, self.tokenizer = request_id, model, request, tokenizer
        self.created = int(time.time())
        self.logprobs = request.wants_logprobs

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _opening(self, n: int) -> list[dict]:
        return []

    async def collect(self, outputs: AsyncIterator[RequestOutput]) -> dict:
        """The whole response once every sample has finished."""
        last: dict[int, RequestOutput] = {}
        logprobs: dict[int, list[float]] = {}
        async with contextlib.aclosing(outputs):
            async for out in outputs:
                last[out.index] = out
                logprobs.setdefault(out.index, []).extend(out.new_logprobs or ())
        choices = [self._choice(out, logprobs[i]) for i, out in sorted(last.items())]
        return {**self._head(self.object), "choices": choices, "usage": usage(last)}

    async def stream(self, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[dict]:
        """Chunks as outputs arrive; nothing is yielded before the first output (so a refused
        request raises before the stream starts)."""
        last: dict[int, RequestOutput] = {}
        include_usage = self.request.include_usage
        extra = {"usage": None} if include_usage else {}
        async with contextlib.aclosing(outputs):
            async for out in outputs:
                if not last:
                    for choice in self._opening(self.request.n):
                        yield {**self._head(self.chunk_object), "choices": [choice], **extra}
                last[out.index] = out
                yield {**self._head(self.chunk_object), "choices": [self._delta(out)], **extra}
        if include_usage:
            yield {**self._head(self.chunk_object), "choices": [], "usage": usage(last)}


class CompletionView(_View):
    object = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, *args):
        super().__init__(*args)
        self._offsets: dict[int, int] = {}  # sample -> text offset of its next token (logprobs)

    def _logprobs(self, index: int, token_ids: list[int], logprobs: list[float]) -> dict | None:
        if not self.logprobs:
            return None
        tokens = [self._token(t) for t in token_ids]
        offsets, at = [], self._offsets.get(index, 0)
        for token in tokens:
            offsets.append(at)
            at += len(token)
        self._offsets[index] = at
        top = [{t: lp} for t, lp in zip(tokens, logprobs)] if self.request.logprobs else None
        return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": top, "text_offset": offsets}

    def _choice(self, out: RequestOutput, logprobs: list[float]) -> dict:
        choice = {"index": out.index, "text": out.text, "logprobs": self._logprobs(out.index, out.token_ids, logprobs),
                  "finish_reason": finish_reason(out)}
        if self.request.return_token_ids:
            choice["token_ids"] = list(out.token_ids)
        return choice

    def _delta(self, out: RequestOutput) -> dict:
        choice = {"index": out.index, "text": out.new_text,
                  "logprobs": self._logprobs(out.index, out.new_token_ids, out.new_logprobs or []),
                  "finish_reason": finish_reason(out)}
        if self.request.return_token_ids:
            choice["token_ids"] = list(out.new_token_ids)
        return choice


class ChatView(_View):
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def _logprobs(self, token_ids: list[int], logprobs: list[float]) -> dict | None:
        if not self.logprobs:
            return None
        content = []
        for token_id, lp in zip(token_ids, logprobs):
            token = self._token(token_id)
            content.append({"token": token, "logprob": lp, "bytes": list(token.encode()), "top_logprobs": []})
        return {"content": content}

    def _opening(self, n: int) -> list[dict]:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(n)]

    def _choice(self, out: RequestOutput, logprobs: list[float]) -> dict:
        choice = {"index": out.index, "message": {"role": "assistant", "content": out.text},
                  "logprobs": self._logprobs(out.token_ids, logprobs), "finish_reason": finish_reason(out)}
        if self.request.return_token_ids:
            choice["token_ids"] = list(out.token_ids)
        return choice

    def _delta(self, out: RequestOutput) -> dict:
        choice = {"index": out.index, "delta": {"content": out.new_text},
                  "logprobs": self._logprobs(out.new_token_ids, out.new_logprobs or []),
                  "finish_reason": finish_reason(out)}
        if self.request.return_token_ids:
            choice["token_ids"] = list(out.new_token_ids)
        return choice
