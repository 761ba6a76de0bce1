"""The OpenAI-compatible HTTP API as a Starlette app over a frontend: the gRPC server's
Frontend, or a router's (jinfer/router/http.py), each behind the narrow `ApiFrontend`.

  GET  /health                200 while the frontend can serve (engine loop healthy; a router:
                              some replica up), else 503 (no auth)
  GET  /v1/models             the served model (and /v1/models/{id})
  POST /v1/completions        one prompt: text or token ids
  POST /v1/chat/completions   messages rendered with the tokenizer's chat template
  POST /v1/completions/{id}/resume
                              continues a completion paused at one of its intercept_token_ids
                              (finish_reason "intercept") with {"tool_output": text or ids}

Requests go through the frontend's `generate`, as gRPC's do: the same admission, checks and
tokenization off the engine thread. A generation runs while the response listens for the
client: a client that goes away cancels it, and closing the frontend's stream aborts the
request, freeing its pages. Errors are OpenAI's bodies with their HTTP status; a stream that
fails after it started ends with an `error` event and `[DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from typing import AsyncIterator, Protocol

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from jinfer.config import ServingConfig
from jinfer.errors import shorten
from jinfer.request import RequestOutput
from jinfer.sampling_params import SamplingParams
from jinfer.serving.frontend import ServingError
from jinfer.serving.openai.protocol import ApiError, ChatRequest, CompletionRequest, ResumeRequest, parse
from jinfer.serving.openai.views import ChatView, CompletionView


class ApiFrontend(Protocol):
    """What the API needs of a server (jinfer.serving.frontend.Frontend is one)."""

    tokenizer: object
    """encode, decode and apply_chat_template, as jinfer.tokenizer.Tokenizer's."""

    def generate(self, prompt: str | list[int], params: SamplingParams, *, request_id: str,
                 tier: str | None) -> AsyncIterator[RequestOutput]:
        """The request's outputs (samples interleaved) until every sample finished; ServingError
        (a gRPC status name) if it is refused or fails; closing it aborts the request."""

    def resume(self, request_id: str, tool_output: str | list[int]) -> AsyncIterator[RequestOutput]:
        """A paused request's next outputs, after its tool's output, until it finishes or
        pauses again; ServingError (NOT_FOUND: nothing of that id is paused) as generate's."""

    def check_healthy(self) -> None:
        """ServingError unless the server can serve now."""

    def check_prompt_text(self, text: str, max_tokens: int) -> None:
        """ServingError if a text prompt cannot fit, judged from its bytes before tokenizing."""

    async def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """The text's ids, tokenized off the caller's event loop."""

    def info(self):
        """An object with vocab_size, max_model_len, page_size and num_pages (KV pages)."""


def error_response(error: ApiError) -> JSONResponse:
    headers = {"www-authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


class _BearerAuth:
    """Every path but /health needs exactly one `Authorization: Bearer <token>` header (401
    otherwise; 400 for several, which proxies and frameworks would each judge by a different one)."""

    def __init__(self, app, token: str):
        self.app, self._expected = app, f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            got = [value for name, value in scope["headers"] if name == b"authorization"]
            if len(got) > 1:
                error = ApiError(400, f"the request has {len(got)} Authorization headers; send exactly one",
                                 code="invalid_api_key")
                return await error_response(error)(scope, receive, send)
            if not hmac.compare_digest(got[0] if got else b"", self._expected):
                error = ApiError(401, "missing or wrong bearer token: send Authorization: Bearer <token>",
                                 code="invalid_api_key")
                return await error_response(error)(scope, receive, send)
        await self.app(scope, receive, send)


class _Generation:
    """The ASGI response of a generation: runs it while listening for the client, so that a
    disconnect cancels it (the views close the frontend's stream, which aborts the request).
    An error before anything was sent is answered with its status; in a stream that has
    started, with an error event. `fields`: the request's field names (an error's `param`);
    `prompt_field`: the one a complaint about the prompt names (a chat's is `messages`)."""

    def __init__(self, view, outputs, stream: bool, fields, prompt_field: str = "prompt"):
        self.view, self.outputs, self.stream, self.fields = view, outputs, stream, fields
        self.prompt_field = prompt_field

    async def __call__(self, scope, receive, send):
        async with anyio.create_task_group() as tasks:
            async def watch():
                while (await receive())["type"] != "http.disconnect":
                    pass
                tasks.cancel_scope.cancel()

            tasks.start_soon(watch)
            if self.stream:
                await self._send_stream(scope, receive, send)
            else:
                await self._send_whole(scope, receive, send)
            tasks.cancel_scope.cancel()

    def _error(self, e: Exception) -> ApiError:
        if isinstance(e, ApiError):
            return e
        error = ApiError.from_serving(e.code, e.message, self.fields)
        if error.param is None and e.message.startswith("prompt"):
            error.param = self.prompt_field
        return error

    async def _send_whole(self, scope, receive, send):
        try:
            response = JSONResponse(await self.view.collect(self.outputs))
        except (ApiError, ServingError) as e:
            response = error_response(self._error(e))
        await response(scope, receive, send)

    async def _send_stream(self, scope, receive, send):
        started = False
        try:  # closed at once however it ends (a cancel may land in send, between chunks)
            async with contextlib.aclosing(self.view.stream(self.outputs)) as chunks:
                async for chunk in chunks:
                    if not started:
                        await send({"type": "http.response.start", "status": 200,
                                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                                (b"cache-control", b"no-cache")]})
                        started = True
                    await send({"type": "http.response.body", "body": _event(chunk), "more_body": True})
        except (ApiError, ServingError) as e:
            if not started:
                return await error_response(self._error(e))(scope, receive, send)
            await send({"type": "http.response.body", "body": _event(self._error(e).body()), "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


def _event(data: dict) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class OpenAIApi:
    """The routes over one frontend; `app` is the ASGI application. config: the server's
    (model_name, tiers, auth_token, max_request_bytes)."""

    def __init__(self, frontend: ApiFrontend, config: ServingConfig):
        self.frontend, self.config = frontend, config
        self.model = config.model_name or "jinfer"
        self.created = int(time.time())
        routes = [Route("/health", self.health), Route("/v1/models", self.models),
                  Route("/v1/models/{model:path}", self.model_card),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/chat/completions", self.chat, methods=["POST"]),
                  Route("/v1/completions/{id}/resume", self.resume, methods=["POST"])]
        middleware = [Middleware(_BearerAuth, token=config.auth_token)] if config.auth_token else []
        self.app = Starlette(routes=routes, middleware=middleware, exception_handlers={
            ApiError: lambda request, e: error_response(e),
            HTTPException: lambda request, e: error_response(ApiError(e.status_code, e.detail)),
            Exception: lambda request, e: error_response(ApiError(500, f"internal error: {type(e).__name__}")),
        })

    async def health(self, request: Request) -> Response:
        try:
            self.frontend.check_healthy()
        except ServingError as e:
            return error_response(ApiError.from_serving(e.code, e.message))
        return JSONResponse({"status": "serving"})

    def _card(self) -> dict:
        info = self.frontend.info()
        return {"id": self.model, "object": "model", "created": self.created, "owned_by": "jinfer",
                "max_model_len": info.max_model_len, "vocab_size": info.vocab_size, "tiers": list(self.config.tier_names)}

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._card()]})

    async def model_card(self, request: Request) -> Response:
        self._check_model(request.path_params["model"])
        return JSONResponse(self._card())

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model:
            raise ApiError(404, f"the model {shorten(model)} does not exist; this server serves {self.model!r}",
                           param="model", code="model_not_found")

    async def _body(self, request: Request) -> bytes:
        """The request body, refused (413) past max_request_bytes before more is read."""
        limit = self.config.max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body is {int(declared)} bytes; max_request_bytes={limit}")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise ApiError(413, f"the request body is over max_request_bytes={limit}")
        return bytes(body)

    async def completions(self, request: Request) -> Response:
        body = parse(CompletionRequest, await self._body(request))
        self._check_model(body.model)
        prompt, params = body.single_prompt(), body.params()
        request_id = uuid.uuid4().hex
        outputs = self.frontend.generate(prompt, params, request_id=request_id, tier=body.tier)
        view = CompletionView(f"cmpl-{request_id}", self.model, body, self.frontend.tokenizer)
        return _Generation(view, outputs, body.stream, CompletionRequest.model_fields)

    async def chat(self, request: Request) -> Response:
        body = parse(ChatRequest, await self._body(request))
        self._check_model(body.model)
        messages = body.template_messages()
        try:  # nothing is rendered or tokenized for a server that cannot serve now
            self.frontend.check_healthy()
        except ServingError as e:
            raise ApiError.from_serving(e.code, e.message) from None
        try:  # off this event loop: a long chat takes a while to render
            text = await asyncio.to_thread(self.frontend.tokenizer.apply_chat_template, messages,
                                           add_generation_prompt=True)
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
        # A chat too long to fit is refused from its bytes, before it is tokenized; then the
        # rendered text's bare ids, as HF's apply_chat_template(..., tokenize=True).
        asked = next((m for m in (body.max_completion_tokens, body.max_tokens) if m is not None), 1)
        try:
            self.frontend.check_prompt_text(text, asked)
        except ServingError as e:  # names max_tokens when it alone leaves no room, else the messages
            error = ApiError.from_serving(e.code, e.message, ChatRequest.model_fields)
            error.param = error.param or "messages"
            raise error from None
        ids = await self.frontend.encode(text, add_special_tokens=False)
        info = self.frontend.info()
        room = min(info.max_model_len, info.num_pages * info.page_size) - len(ids)
        params = body.params(room)
        request_id = uuid.uuid4().hex
        outputs = self.frontend.generate(ids, params, request_id=request_id, tier=body.tier)
        view = ChatView(f"chatcmpl-{request_id}", self.model, body, self.frontend.tokenizer)
        return _Generation(view, outputs, body.stream, ChatRequest.model_fields, prompt_field="messages")

    async def resume(self, request: Request) -> Response:
        """A completion paused at a tool call ("cmpl-<id>" or "chatcmpl-<id>"), continued with
        the tool's output; answered as a completion of the next segment."""
        body = parse(ResumeRequest, await self._body(request))
        handle = request.path_params["id"]
        request_id = handle.split("-", 1)[1] if handle.startswith(("cmpl-", "chatcmpl-")) else handle
        outputs = self.frontend.resume(request_id, body.tool_output)
        view = CompletionView(handle, self.model, body, self.frontend.tokenizer)
        return _Generation(view, outputs, body.stream, ResumeRequest.model_fields, prompt_field="tool_output")
