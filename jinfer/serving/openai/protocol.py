"""The OpenAI API's request bodies, checked at the boundary, and how they become SamplingParams.

Names and defaults follow OpenAI's API: temperature 1.0; max_tokens 16 for completions (its
legacy API's default), the rest of the context for chat. jinfer's extensions: top_k (-1 or 0:
off), min_p, ignore_eos, stop_token_ids, tier (the SLO tier), speculate (false: no speculative
drafts for this request), return_token_ids (each choice and chunk also carries its token ids)
and intercept_token_ids / intercept (tool calls: sampling one of those ids, or text containing
one of those strings, pauses the completion, finish_reason "intercept"; POST
/v1/completions/{id}/resume with the tool's output continues it). Types are strict (a string
is not a number). Unknown fields are ignored; known ones jinfer cannot honour (penalties, logit_bias, best_of, echo,
suffix, tools, a non-text response_format, logprobs alternatives beyond the sampled token) are
refused unless they ask for nothing.
"""

from __future__ import annotations

import re
from typing import Annotated, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jinfer.errors import shorten
from jinfer.sampling_params import SamplingParams

COMPLETION_MAX_TOKENS = 16
"""max_tokens of a completion that gives none (OpenAI's legacy completions API)."""

_STATUS_TYPE = {401: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}
_SERVING_STATUS = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503,
                   "INTERNAL": 500}
_SERVING_CODE = {"RESOURCE_EXHAUSTED": "rate_limit_exceeded", "UNAVAILABLE": "service_unavailable"}


class ApiError(Exception):
    """A request answered with OpenAI's error body {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @classmethod
    def from_serving(cls, code: str, message: str, fields=()) -> "ApiError":
        """A frontend ServingError (a gRPC status name) as its HTTP status; `param` is the
        request field the message opens with (`n=5 exceeds ...`), if it is one of `fields`."""
        return cls(_SERVING_STATUS.get(code, 500), message, param=_param(message, fields),
                   code=_SERVING_CODE.get(code))

    def body(self) -> dict:
        kind = _STATUS_TYPE.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def _param(message: str, fields) -> str | None:
    match = re.match(r"(?:unknown )?([a-z_]+)(?:[=\[]| is )", message)
    return match.group(1) if match and match.group(1) in fields else None


Int = Annotated[int, Field(ge=-(2**63), lt=2**63)]  # JSON integers as OpenAI takes them; never a 1 MB number


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)
    NEUTRAL: ClassVar[dict[str, tuple]] = {"frequency_penalty": (None, 0), "presence_penalty": (None, 0),
                                           "logit_bias": (None, {})}
    """Fields jinfer cannot honour, and the values that ask for nothing (accepted)."""

    model: str | None = None
    n: Int = 1
    stop: str | list[str] | None = None
    seed: Int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_k: Int | None = None
    min_p: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[Int] | None = None
    intercept_token_ids: list[Int] | None = None
    intercept: str | list[str] | None = None
    tier: str | None = None
    return_token_ids: bool = False
    speculate: bool = True
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def check_supported(self) -> None:
        for name, neutral in self.NEUTRAL.items():
            value = getattr(self, name)
            if value not in neutral:
                raise ApiError(400, f"{name}={shorten(value)} is not supported by this server", param=name)

    def sampling_params(self, max_tokens: int, logprobs: bool) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        try:
            return SamplingParams(
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=0 if self.top_k in (None, -1) else self.top_k,
                min_p=self.min_p or 0.0, seed=self.seed, max_tokens=max_tokens, n=self.n, stop=stop,
                stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos, logprobs=logprobs,
                speculate=self.speculate, intercept_token_ids=tuple(self.intercept_token_ids or ()),
                intercept=(self.intercept,) if isinstance(self.intercept, str) else tuple(self.intercept or ()))
        except ValueError as e:
            raise ApiError(400, str(e), param=_param(str(e), type(self).model_fields)) from None


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    NEUTRAL = {**_Sampling.NEUTRAL, "echo": (False,), "best_of": (None, 1), "suffix": (None, "")}

    prompt: str | list[Int] | list[str] | list[list[Int]]
    max_tokens: Int | None = None
    logprobs: Int | None = None
    echo: bool = False
    best_of: Int | None = None
    suffix: str | None = None

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs is not None  # 0 too: the sampled tokens' logprobs, no alternatives

    def single_prompt(self) -> str | list[int]:
        """The one prompt (text or ids): a list of several is refused."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) > 1:
                raise ApiError(400, f"prompt is a list of {len(prompt)} prompts; this server takes one prompt per "
                                    "request (a string or a list of token ids)", param="prompt")
            prompt = prompt[0]
        if prompt == "":  # as gRPC: encode("") would be a bare BOS
            raise ApiError(400, "prompt is empty: give text or token ids", param="prompt")
        return prompt

    def params(self) -> SamplingParams:
        if self.logprobs is not None and not 0 <= self.logprobs <= 1:
            raise ApiError(400, f"logprobs={self.logprobs}: this server returns only the sampled token's logprob; "
                                "ask for 0 or 1", param="logprobs")
        max_tokens = COMPLETION_MAX_TOKENS if self.max_tokens is None else self.max_tokens
        return self.sampling_params(max_tokens, logprobs=self.wants_logprobs)


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # name, tool_calls, ...: passed to the template
    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(_Sampling):
    """POST /v1/chat/completions."""

    NEUTRAL = {**_Sampling.NEUTRAL, "tools": (None, []), "response_format": (None, {"type": "text"})}

    messages: list[ChatMessage]
    max_tokens: Int | None = None
    max_completion_tokens: Int | None = None
    logprobs: bool = False
    top_logprobs: Int | None = None
    tools: list | None = None
    response_format: dict | None = None

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs

    def template_messages(self) -> list[dict]:
        """The messages as the chat template takes them: text parts joined into one string."""
        out = []
        for i, message in enumerate(self.messages):
            d = message.model_dump()
            if isinstance(message.content, list):
                for j, part in enumerate(message.content):
                    if part.type != "text" or part.text is None:
                        raise ApiError(400, f"messages[{i}].content[{j}] has type={shorten(part.type)}: only text "
                                            "parts are supported", param="messages")
                d["content"] = "\n".join(part.text for part in message.content)
            out.append(d)
        return out

    def params(self, room: int) -> SamplingParams:
        """`room`: tokens of context the prompt leaves (the default max_tokens)."""
        if self.top_logprobs not in (None, 0):
            raise ApiError(400, f"top_logprobs={self.top_logprobs}: this server returns only the sampled token's "
                                "logprob; use logprobs=true with top_logprobs 0", param="top_logprobs")
        max_tokens = next((m for m in (self.max_completion_tokens, self.max_tokens) if m is not None), max(room, 1))
        return self.sampling_params(max_tokens, logprobs=self.logprobs)


class ResumeRequest(BaseModel):
    """POST /v1/completions/{id}/resume: a paused completion's tool output (text, tokenized
    without special tokens, or token ids); the response is the next segment's completion."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)
    tool_output: str | list[Int]
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool = False
    logprobs: Int | None = None
    n: Int = 1

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs is not None


def parse(cls: type[BaseModel], body: bytes) -> BaseModel:
    """The request body as `cls`; ApiError 400 naming the first bad field (values shortened)."""
    try:
        request = cls.model_validate_json(body)
    except ValidationError as e:
        raise _invalid(e) from None
    if hasattr(request, "check_supported"):
        request.check_supported()
    return request


def _invalid(e: ValidationError) -> ApiError:
    errors = e.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON: {first['msg'].removeprefix('Invalid JSON: ')}")
    if not first["loc"]:
        return ApiError(400, "the request body must be a JSON object")
    param = str(first["loc"][0])
    # A union reports one error per alternative: name the field once, with every expectation.
    same = [err for err in errors if err["loc"][:1] == first["loc"][:1]]
    where = param
    for part in first["loc"][1:]:  # list indices and nested fields; not the union's type tags
        if isinstance(part, int):
            where += f"[{part}]"
        elif re.fullmatch(r"[a-z_]+", part) and part not in ("str", "int", "float", "bool"):
            where += f".{part}"
    reasons = " or ".join(dict.fromkeys(err["msg"] for err in same))
    got = "" if first["type"] == "missing" else f" (got {shorten(first['input'])})"
    return ApiError(400, f"{where}: {reasons}{got}", param=param)
