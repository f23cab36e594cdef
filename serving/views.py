"""``/v1/``: the fleet as one OpenAI-compatible endpoint (async views, served by uvicorn's workers).

A request is a generation like any other (recorded, queued, its eight events stored, its page in
the admin); its id is the response's ``x-request-id``. The request listens on its generation's
reply channel before the task is queued (``serving.replies``), waits at most
``MLXSERVE_QUEUE_TIMEOUT_S`` for a worker to take it (503 after), then streams the tokens as the
worker publishes them, or answers once with all of them. A client that leaves, or a request past
``MLXSERVE_REQUEST_TIMEOUT_S``, unsubscribes: the worker notices at its next token or ping and
stops the generation (``finishReason: "cancelled"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import redis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import OperationalError
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.views.decorators.csrf import csrf_exempt

from events.generations import ModelNotServed, generation_submit, registered_model
from events.models import RegisteredModel
from mlxserve.contract.generations import GenerationOrder
from mlxserve.contract.serving import (
    ReplyEnd,
    ReplyError,
    ReplyPing,
    ReplyStart,
    ReplyTokens,
    reply_decoder,
    serving_key,
)
from mlxserve.contract.validation import ValidationFailed
from serving import metrics
from serving.keys import Caller, budget_admit, budget_spend, caller_authenticate
from serving.replies import async_redis, reply_hub
from serving.requests import ChatRequest, CompletionRequest, OpenAIError, Order, order_parse
from serving.responses import (
    Answer,
    chat_chunks,
    chat_response,
    completion_chunks,
    completion_response,
    generation_error,
    sse,
)

logger = logging.getLogger(__name__)

# A worker generating a request pings every 0.1 s: this long without a word, it is gone.
WORKER_SILENCE_S = 10.0
_json = msgspec.json.Encoder()


def _error_response(error: OpenAIError, request_id: str | None = None) -> HttpResponse:
    response = HttpResponse(_json.encode(error.body()), status=error.status, content_type="application/json")
    for name, value in error.headers.items():
        response[name] = value
    if request_id:
        response["x-request-id"] = request_id
    return response


@csrf_exempt
async def chat_completions(request: HttpRequest) -> HttpResponseBase:
    return await _serve(request, ChatRequest, "chat")


@csrf_exempt
async def completions(request: HttpRequest) -> HttpResponseBase:
    return await _serve(request, CompletionRequest, "text_completion")


async def models_list(request: HttpRequest) -> HttpResponse:
    try:
        caller = await caller_authenticate(request)
        served = await _served_models(caller)
    except OpenAIError as exc:
        return _error_response(exc)
    body = {"object": "list", "data": [_model_object(row) for row in served]}
    return HttpResponse(_json.encode(body), content_type="application/json")


async def model_detail(request: HttpRequest, model_id: str) -> HttpResponse:
    try:
        caller = await caller_authenticate(request)
        served = {row.name: row for row in await _served_models(caller)}
        if model_id not in served:
            raise _model_not_found(model_id)
    except OpenAIError as exc:
        return _error_response(exc)
    return HttpResponse(_json.encode(_model_object(served[model_id])), content_type="application/json")


def not_found(request: HttpRequest) -> HttpResponse:
    return _error_response(
        OpenAIError(404, f"Unknown endpoint: {request.method} {request.path}", code="not_found")
    )


def _model_object(row: RegisteredModel) -> dict[str, Any]:
    return {
        "id": row.name,
        "object": "model",
        "created": int(row.created_at.timestamp()),
        "owned_by": settings.SERVING_OWNER,
    }


def _model_not_found(model: str) -> OpenAIError:
    return OpenAIError(
        404,
        f"The model '{model[:200]}' does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


async def _served_models(caller: Caller) -> list[RegisteredModel]:
    rows = [row async for row in RegisteredModel.objects.order_by("name") if caller.may_use(row.name)]
    client = async_redis()
    seconds, micros = await client.time()
    now_ms = seconds * 1000 + micros // 1000
    pipe = client.pipeline(transaction=False)
    pipe.zcount(serving_key(None), now_ms, "+inf")
    for row in rows:
        pipe.zcount(serving_key(row.name), now_ms, "+inf")
    anyone, *own = await pipe.execute()
    return [row for row, count in zip(rows, own, strict=True) if count or anyone]


def _registered(model: str) -> RegisteredModel:
    try:
        return registered_model(model)
    except ValidationFailed:
        raise _model_not_found(model) from None


def _submit(order: Order, registered: RegisteredModel, caller: Caller, generation_id: uuid.UUID) -> None:
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.get(pk=caller.user_id)
    generation_submit(
        GenerationOrder(
            model=registered.name,
            prompt=order.prompt,
            max_tokens=order.max_tokens,
            temperature=order.temperature,
            top_p=order.top_p,
            seed=order.seed,
        ),
        user=user,
        generation_id=generation_id,
        serving={
            "stop": order.stop,
            "logprobs": order.logprobs,
            "top_logprobs": order.top_logprobs,
            "reply": True,
        },
    )


async def _serve(
    request: HttpRequest, kind: type[ChatRequest] | type[CompletionRequest], operation: str
) -> HttpResponseBase:
    arrived = time.perf_counter()
    if request.method != "POST":
        return _error_response(
            OpenAIError(405, f"Method {request.method} not allowed; use POST.", code="method_not_allowed")
        )
    generation_id = uuid.uuid4()
    request_id = str(generation_id)
    label = {"model": "-", "operation": operation}
    stack = contextlib.AsyncExitStack()
    try:
        caller = await caller_authenticate(request)
        order = order_parse(request.body, kind)
        registered = await sync_to_async(_registered)(order.model)
        if not caller.may_use(registered.name):
            raise _model_not_found(order.model)
        label["model"] = registered.name
        await budget_admit(caller)
        replies = await stack.enter_async_context(reply_hub().listen(request_id))
        try:
            await sync_to_async(_submit)(order, registered, caller, generation_id)
        except ModelNotServed as exc:
            raise OpenAIError(503, str(exc), param="model", code="model_not_served") from None
        except ValidationFailed as exc:
            raise OpenAIError(
                400, exc.issues[0].message, param=".".join(map(str, exc.issues[0].path))
            ) from None
        await _taken(replies, settings.QUEUE_TIMEOUT_S)
        metrics.queue_seconds.labels(**label).observe(time.perf_counter() - arrived)
        answer = Answer(
            request_id=request_id,
            model=registered.name,
            created=int(time.time()),
            logprobs=order.logprobs,
            top_logprobs=order.top_logprobs,
            include_usage=order.include_usage,
        )
        deadline = arrived + settings.REQUEST_TIMEOUT_S
        if order.stream:
            # The headers wait for the generation's first message: a request its worker refuses
            # (past the model's context, say) gets its HTTP status, not a 200 and an error chunk.
            messages = _messages(replies, deadline)
            first = await anext(messages)
            if isinstance(first, ReplyError):
                raise generation_error(first)
            end = _StreamEnd(stack, caller, label, arrived)
            task = asyncio.current_task()
            if task is not None:
                task.add_done_callback(end.when_done)
            response = StreamingHttpResponse(
                _stream(_chained(first, messages), answer, operation, end), content_type="text/event-stream"
            )
            response["Cache-Control"] = "no-cache"
            response["X-Accel-Buffering"] = "no"  # a proxy in front must not hold the chunks back
            response["x-request-id"] = request_id
            return response
        async with stack:
            async for message in _messages(replies, deadline):
                answer.take(message)
                if answer.tokens and not answer.first_seen:
                    answer.first_seen = True
                    metrics.time_to_first_token.labels(**label).observe(time.perf_counter() - arrived)
                if answer.done:
                    break
        await budget_spend(caller, answer.prompt_tokens + answer.completion_tokens)
        if answer.error is not None:
            raise answer.error
        built = chat_response(answer) if operation == "chat" else completion_response(answer)
        answered = HttpResponse(_json.encode(built), content_type="application/json")
        answered["x-request-id"] = request_id
        metrics.requests_total.labels(**label, status="200").inc()
        metrics.request_duration.labels(**label).observe(time.perf_counter() - arrived)
        return answered
    except OpenAIError as exc:
        await stack.aclose()
        metrics.requests_total.labels(**label, status=str(exc.status)).inc()
        return _error_response(exc, request_id)
    except (redis.RedisError, OperationalError, OSError) as exc:
        await stack.aclose()
        logger.error("Request %s failed: Redis or the database unavailable (%s)", request_id, exc)
        metrics.requests_total.labels(**label, status="503").inc()
        return _error_response(
            OpenAIError(
                503,
                "The fleet's broker (Redis) is unavailable; retry later.",
                code="unavailable",
                headers={"Retry-After": "5"},
            ),
            request_id,
        )
    except asyncio.CancelledError:
        await asyncio.shield(stack.aclose())
        metrics.requests_total.labels(**label, status="cancelled").inc()
        raise


async def _taken(replies: asyncio.Queue[Any], timeout: float) -> None:
    """Wait for a worker to take the generation: 503 past the queue timeout."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                message = _decoded(await replies.get())
                if isinstance(message, ReplyStart):
                    return
                if isinstance(message, ReplyError):
                    raise generation_error(message)
    except TimeoutError:
        raise OpenAIError(
            503,
            f"No worker took the request within {timeout:g} s (MLXSERVE_QUEUE_TIMEOUT_S): the fleet is busy, "
            "retry later.",
            code="queue_timeout",
            headers={"Retry-After": "5"},
        ) from None


def _decoded(raw: Any) -> Any:
    if isinstance(raw, ReplyError):
        return raw
    try:
        return reply_decoder.decode(raw)
    except msgspec.DecodeError:
        return ReplyError(code="MalformedReply", message="The worker sent a reply this server cannot read")


async def _messages(replies: asyncio.Queue[Any], deadline: float) -> AsyncIterator[Any]:
    """The worker's messages after ``start``, pings left out, until ``end`` or ``error``; an error
    when the worker falls silent, is replaced (a second ``start``: its worker died and the task was
    handed on) or the request runs out of time."""
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            yield ReplyError(
                code="RequestTimeout",
                message=f"The request ran past {settings.REQUEST_TIMEOUT_S} s (MLXSERVE_REQUEST_TIMEOUT_S)",
            )
            return
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a cancellation that comes
            # as the message does (the client's leaving), and the request would never end.
            async with asyncio.timeout(min(left, WORKER_SILENCE_S)):
                message = _decoded(await replies.get())
        except TimeoutError:
            if deadline - time.perf_counter() <= 0:
                continue
            yield ReplyError(
                code="WorkerLost", message="The worker generating this request stopped answering"
            )
            return
        if isinstance(message, ReplyPing):
            continue
        if isinstance(message, ReplyStart):
            message = ReplyError(code="WorkerLost", message="The worker generating this request was lost")
        yield message
        if isinstance(message, ReplyEnd | ReplyError):
            return


class _StreamEnd:
    """What ends a streamed request, once, however it ends: unsubscribe (which stops the worker),
    count it, spend its tokens. The body's generator ends it when it finishes; the request's task
    ends it when that is done, since a client that leaves while a chunk is being sent cancels the
    task with the generator suspended at a ``yield``: its ``finally`` would wait for the garbage
    collector (minutes), and the worker would generate on for nobody."""

    def __init__(
        self, stack: contextlib.AsyncExitStack, caller: Caller, label: dict[str, str], arrived: float
    ) -> None:
        self.stack, self.caller, self.label, self.arrived = stack, caller, label, arrived
        self.status = "cancelled"  # until the stream says otherwise
        self.tokens = 0
        self.ended = False

    def when_done(self, task: asyncio.Task[Any]) -> None:
        if not self.ended:
            task.get_loop().create_task(self.end())

    async def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        await self.stack.aclose()
        metrics.requests_total.labels(**self.label, status=self.status).inc()
        metrics.request_duration.labels(**self.label).observe(time.perf_counter() - self.arrived)
        with contextlib.suppress(redis.RedisError, OSError):
            await budget_spend(self.caller, self.tokens)


async def _chained(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    yield first
    async for message in rest:
        yield message


async def _stream(
    messages: AsyncIterator[Any], answer: Answer, operation: str, end: _StreamEnd
) -> AsyncIterator[bytes]:
    chunks = chat_chunks if operation == "chat" else completion_chunks
    try:
        if operation == "chat":
            yield sse(chunks(answer, None))  # the role, at once
        async for message in messages:
            if isinstance(message, ReplyTokens):
                if not answer.first_seen and message.tokens:
                    answer.first_seen = True
                    metrics.time_to_first_token.labels(**end.label).observe(time.perf_counter() - end.arrived)
                parts = []
                for token in message.tokens:
                    parts.append(sse(chunks(answer, token)))
                    answer.tokens.append(token)
                yield b"".join(parts)
            else:
                answer.take(message)
                end.tokens = answer.prompt_tokens + answer.completion_tokens
        if answer.error is not None:
            end.status = str(answer.error.status)
            yield sse(answer.error.body())
        else:
            yield sse(chunks(answer, None, final=True))
            if answer.include_usage:
                yield sse(chunks(answer, None, usage=True))
        yield b"data: [DONE]\n\n"
        end.status = "200" if answer.error is None else end.status
    finally:
        await asyncio.shield(end.end())
