"""The router's requests paused at a tool call: the replica holding each one's K/V, and the
context it would need elsewhere.

A Resume goes back to that replica. When it went down (or left the router) since, the request
migrates: a resumed segment is, by the engine's definition (Scheduler.resume), a fresh request
over prompt + output + tool output with the same parameters and seed, so the router sends that
Generate to whichever replica its policy picks, which recomputes the K/V. The stream the client
gets is the one the old replica would have sent (its greedy tokens equal up to float ties of
another batch), except its cached_prompt_tokens, ttft_s and speculation counts, and, for a
sampled request without a seed, its tokens (the new replica draws another seed). Only
single-sample requests (n = 1) with intercepts carry a context; a text tool output is tokenized
by the router (without special tokens, as the replicas do) and forwarded as token ids, so the
context is what the replica holds; without a router tokenizer such a request cannot move.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import AsyncIterator

import grpc

from jinfer.errors import shorten
from jinfer.serving import inference_pb2 as pb
from jinfer.serving.frontend import ServingError


@dataclasses.dataclass
class Pause:
    """replica, epoch: where its K/V is (in that replica's epoch). context: every token it has
    (prompt, outputs, tool outputs), None where unknown (n > 1, or text the router could not
    tokenize). request: its Generate as first forwarded (the parameters a migration keeps)."""

    replica: int
    epoch: int
    context: list[int] | None
    request: pb.GenerateRequest


class Resuming:
    """The router's Resume path (jinfer.router.server.RouterServer mixes it in): it uses the
    router's links, config, tokenizer and `generate`, and keeps `_paused` (request id -> Pause,
    oldest first, at most max_paused_requests: the oldest are forgotten)."""

    def _remember_pause(self, request_id: str, pause: Pause) -> None:
        self._paused.pop(request_id, None)
        self._paused[request_id] = pause
        while len(self._paused) > self.config.max_paused_requests:
            self._paused.popitem(last=False)

    async def resume(self, request: pb.ResumeRequest) -> AsyncIterator[pb.GenerateResponse]:
        """Relays a Resume to the replica that holds the paused request's K/V (its Generate
        stream ended with paused set through this router), or migrates it when that replica is
        down, restarted without it, or fails unavailable before streaming (see the module
        docstring). ServingError: NOT_FOUND (no such request paused behind this router, or its
        replica dropped it: its pause timed out), UNAVAILABLE (it cannot migrate: the message
        says why), INVALID_ARGUMENT, or the replica's own status. The request stays paused
        behind the router until something streams (a failed Resume can be retried)."""
        request_id = request.request_id
        if not request_id:
            raise ServingError("INVALID_ARGUMENT", "request_id is empty: give the paused request's id")
        held = self._paused.pop(request_id, None)  # claimed: a concurrent Resume of it finds nothing
        if held is None:
            raise ServingError("NOT_FOUND", f"no request {shorten(request_id)} is paused behind this router")
        streamed, keep = False, True
        try:
            async for msg in self._resume_or_migrate(request, held):
                streamed = True
                yield msg
        except _Dropped:
            keep = False
            raise
        finally:
            if keep and not streamed and request_id not in self._paused:
                self._remember_pause(request_id, held)  # nothing happened: it can be resumed again

    async def _resume_or_migrate(self, request: pb.ResumeRequest, held: Pause):
        rep = self.links[held.replica]
        if not rep.up:
            async for msg in self._migrate(request, held, f"replica {rep.target}, which held it, is down"):
                yield msg
            return
        tool = await self._tool_ids(request, strict=False)
        forward = request
        if tool is not None and request.WhichOneof("tool_output") != "token_ids":  # the tokens the context has
            forward = pb.ResumeRequest(request_id=request.request_id, token_ids=pb.TokenIds(ids=tool))
        context = None if held.context is None or tool is None else held.context + tool
        call = rep.stub.Resume(forward, metadata=rep.metadata)
        rep.calls[call] = None
        streamed, why = False, None
        try:
            async for msg in call:
                streamed = True
                if context is not None:
                    context.extend(msg.token_ids)
                if msg.paused:
                    self._remember_pause(request.request_id, Pause(held.replica, held.epoch, context, held.request))
                yield msg
            return
        except grpc.aio.AioRpcError as e:
            restarted = e.code() == grpc.StatusCode.NOT_FOUND and rep.epoch != held.epoch
            if streamed or e.code() != grpc.StatusCode.UNAVAILABLE and not restarted:
                if e.code() == grpc.StatusCode.NOT_FOUND:
                    raise _Dropped(f"replica {rep.target}: {e.details()}") from None
                raise ServingError(e.code().name, f"replica {rep.target}: {e.details()}") from None
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                self.links.mark_down(held.replica, f"a Resume failed: {e.details()}", epoch=held.epoch)
            why = f"replica {rep.target}, which held it, " + ("restarted without it" if restarted else "is unavailable")
        except asyncio.CancelledError:
            if rep.calls.get(call) is None:
                raise  # the client went away
            if streamed:
                raise ServingError("UNAVAILABLE", f"replica {rep.target} is down: {rep.calls[call]}") from None
            why = f"replica {rep.target}, which held it, is down: {rep.calls[call]}"
        finally:
            rep.calls.pop(call, None)
            call.cancel()
        async for msg in self._migrate(request, held, why):
            yield msg

    async def _migrate(self, request: pb.ResumeRequest, held: Pause, why: str):
        """The resumed segment as a fresh Generate over the request's whole context, routed by
        the policy (`generate`: a later pause is remembered there)."""
        if held.context is None:
            raise ServingError("UNAVAILABLE", f"{why}, and the router cannot move it (it knows the context of "
                                              "single-sample requests only, and of text tool outputs only with a "
                                              "tokenizer): send the conversation again")
        tool = await self._tool_ids(request, strict=True)
        forward = pb.GenerateRequest()
        forward.CopyFrom(held.request)
        forward.token_ids.ids[:] = held.context + tool
        async for msg in self.generate(forward):
            msg.ClearField("ttft_s")  # the first token of a resumed segment, not of the request
            yield msg

    async def _tool_ids(self, request: pb.ResumeRequest, *, strict: bool) -> list[int] | None:
        """The tool output's token ids (a text tokenized as the replicas do it); None when it is
        text and the router has no tokenizer (ServingError UNAVAILABLE if strict: a migration
        needs them)."""
        if request.WhichOneof("tool_output") == "token_ids":
            return list(request.token_ids.ids)
        if not request.text:
            return []
        if self.tokenizer is None:
            if strict:
                raise ServingError("UNAVAILABLE", "the request's replica is gone and this router has no tokenizer "
                                                  "to move it with a text tool output: send token_ids")
            return None
        return await asyncio.to_thread(self.tokenizer.encode, request.text, add_special_tokens=False)


class _Dropped(ServingError):
    """The replica no longer holds the paused request (its pause timed out there): NOT_FOUND,
    and the router forgets it too."""

    def __init__(self, message: str):
        super().__init__("NOT_FOUND", message)
