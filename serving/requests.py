"""The OpenAI requests this server takes, strictly: the fields of OpenAI's public API as its official
client sends them. A parameter this server does not implement is accepted at its neutral value
(``n: 1``, ``frequency_penalty: 0``, no tools ...) and refused otherwise, naming it; an unknown
field is refused too. Every refusal is an ``OpenAIError`` (OpenAI's error body)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from mlxserve.contract.generations import OrderMaxTokens, OrderModel, OrderSeed, OrderTopP
from mlxserve.contract.serving import StopSequence, TopLogprobs


class OpenAIError(Exception):
    """An error in OpenAI's shape; its status is what the official client maps to a typed exception."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
             422: "invalid_request_error", 429: "rate_limit_error"}  # fmt: skip

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = self.TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


Temperature = Annotated[float, Meta(ge=0, le=2)]  # OpenAI's range
User = Annotated[str, Meta(max_length=256)]
Content = Annotated[str, Meta(max_length=1_000_000)]


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class TextPart(_Strict):
    type: Literal["text"]
    text: Content


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Content | Annotated[list[TextPart], Meta(min_length=1, max_length=1000)]
    name: Annotated[str, Meta(max_length=64)] | UnsetType = UNSET


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict, kw_only=True):
    model: OrderModel
    max_tokens: OrderMaxTokens | None = None
    temperature: Temperature | None = None
    top_p: OrderTopP | None = None
    seed: OrderSeed | None = None
    stop: StopSequence | Annotated[list[StopSequence], Meta(max_length=4)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: User | None = None
    # Not implemented: accepted at their neutral value only.
    n: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class ChatRequest(_Common, kw_only=True):
    messages: Annotated[list[Message], Meta(min_length=1, max_length=1000)]
    max_completion_tokens: OrderMaxTokens | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    metadata: dict[str, Annotated[str, Meta(max_length=512)]] | None = None  # kept by OpenAI, ignored here
    parallel_tool_calls: bool | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    modalities: list[str] | None = None


class CompletionRequest(_Common, kw_only=True):
    prompt: Content | Annotated[list[Content], Meta(min_length=1, max_length=1)]
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


# (field, whether the value given is the neutral one, what the message says is accepted)
_NEUTRAL: tuple[tuple[str, Any, str], ...] = (
    ("n", lambda v: v in (None, 1), "1"),
    ("frequency_penalty", lambda v: not v, "0"),
    ("presence_penalty", lambda v: not v, "0"),
    ("logit_bias", lambda v: not v, "empty"),
    ("tools", lambda v: not v, "empty (no tool calling)"),
    ("tool_choice", lambda v: v in (None, "none", "auto"), "none"),
    ("response_format", lambda v: v in (None, {"type": "text"}), '{"type": "text"}'),
    ("store", lambda v: not v, "false"),
    ("service_tier", lambda v: v in (None, "auto", "default"), "auto"),
    ("modalities", lambda v: v in (None, ["text"]), '["text"]'),
    ("echo", lambda v: not v, "false"),
    ("suffix", lambda v: v in (None, ""), "empty"),
    ("best_of", lambda v: v in (None, 1), "1"),
)

_AT = re.compile(r" - at `\$\.?(.*)`$")
_UNKNOWN = re.compile(r"Object contains unknown field `(.*)`")


@dataclass
class Order:
    """A request as the generation it becomes: the order's fields, and what the reply needs."""

    model: str
    prompt: str | dict[str, Any]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int


def order_parse(body: bytes, kind: type[ChatRequest] | type[CompletionRequest]) -> Order:
    try:
        raw = msgspec.json.decode(body)
    except msgspec.DecodeError:
        raise OpenAIError(
            400, "We could not parse the JSON body of your request.", code="invalid_json"
        ) from None
    if not isinstance(raw, dict):
        raise OpenAIError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        request = msgspec.convert(raw, kind, strict=True)
    except msgspec.ValidationError as exc:
        raise _validation_error(str(exc)) from None
    for name, neutral, accepted in _NEUTRAL:
        value = getattr(request, name, None)
        if not neutral(value):
            raise OpenAIError(
                400,
                f"Parameter '{name}' is not supported by this server other than {accepted}.",
                param=name,
                code="unsupported_parameter",
            )
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if isinstance(request, ChatRequest):
        if request.stream_options is not None and not request.stream:
            raise OpenAIError(
                400, "stream_options is only allowed when stream is true.", param="stream_options"
            )
        if request.top_logprobs and not request.logprobs:
            raise OpenAIError(400, "top_logprobs needs logprobs set to true.", param="top_logprobs")
        prompt: str | dict[str, Any] = {"messages": [_message(m) for m in request.messages]}
        max_tokens = request.max_completion_tokens or request.max_tokens or 256
        logprobs, top_logprobs = bool(request.logprobs), request.top_logprobs or 0
    else:
        prompt = request.prompt if isinstance(request.prompt, str) else request.prompt[0]
        if not prompt:
            raise OpenAIError(400, "The prompt must not be empty.", param="prompt")
        max_tokens = request.max_tokens or 16  # OpenAI's default for completions
        logprobs, top_logprobs = request.logprobs is not None, request.logprobs or 0
    return Order(
        model=request.model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        seed=request.seed,
        stop=stop,
        stream=bool(request.stream),
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )


def _message(message: Message) -> dict[str, str]:
    content = (
        message.content if isinstance(message.content, str) else "".join(p.text for p in message.content)
    )
    return {"role": "system" if message.role == "developer" else message.role, "content": content}


def _validation_error(text: str) -> OpenAIError:
    unknown = _UNKNOWN.match(text)
    at = _AT.search(text)
    path = at.group(1) if at else None
    if unknown:
        name = unknown.group(1)
        param = f"{path}.{name}" if path else name
        return OpenAIError(400, f"Unrecognized request argument supplied: {param}", param=param)
    message = _AT.sub("", text)
    if message.startswith("Object missing required field"):
        missing = message.split("`")[1]
        param = f"{path}.{missing}" if path else missing
        return OpenAIError(
            400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
        )
    return OpenAIError(400, f"Invalid value for '{path}': {message}", param=path, code="invalid_value")
