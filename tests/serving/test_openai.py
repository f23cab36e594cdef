"""The OpenAI-compatible endpoints with the official ``openai`` client, against the real stack: the
ASGI application under uvicorn, Redis, the ingester, and Celery workers generating with the demo
model (one serving ``demo``, one serving ``other``)."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import openai
import pytest
import redis
import uvicorn
from django.contrib.auth.models import Group, User
from django.core.management import call_command
from openai.types.chat import ChatCompletionMessageParam

from events.models import Event, Generation, RegisteredModel
from events.selectors import generation_detail
from mlxserve.contract.serving import reply_channel
from mlxserve.engine.demo_model import create_demo_model
from mlxserve.engine.reply import ServingClaim
from mlxserve.web.roles import OPERATOR_GROUP, VIEWER_GROUP
from serving.models import ApiKey
from tests.factories import celery_worker_running, free_port, ingest_until

pytestmark = pytest.mark.django_db(transaction=True)

DEMO_WORKER = "test-host/demo-worker"
OTHER_WORKER = "test-host/other-worker"


@pytest.fixture(scope="module")
def asgi_server() -> Iterator[str]:
    """The ASGI application under uvicorn, in this process (so it shares the test database)."""
    port = free_port()
    config = uvicorn.Config(
        "mlxserve.asgi:application", host="127.0.0.1", port=port, lifespan="off", log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_demo_model(tmp_path_factory.mktemp("models") / "other", seed=1)


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Two workers: one serves ``demo``, one ``other`` (each takes its model's queue only)."""
    with (
        celery_worker_running(
            tmp_path_factory.mktemp("demo-worker"),
            DEMO_WORKER,
            MLXSERVE_WORKER_MODELS="demo",
            MLXSERVE_WORKER_CONCURRENCY="2",
        ),
        celery_worker_running(
            tmp_path_factory.mktemp("other-worker"), OTHER_WORKER, MLXSERVE_WORKER_MODELS="other"
        ),
    ):
        yield


@pytest.fixture
def stack(
    workers: None, asgi_server: str, module_demo_model: Path, other_model: Path, redis_client: redis.Redis
) -> str:
    """Both models registered, and the workers' claims as they renew them (each test starts on an
    emptied Redis; the workers renew every 5 s)."""
    RegisteredModel.objects.create(name="demo", path=str(module_demo_model))
    RegisteredModel.objects.create(name="other", path=str(other_model))
    ServingClaim(redis_client, DEMO_WORKER, ["demo"]).renew()
    ServingClaim(redis_client, OTHER_WORKER, ["other"]).renew()
    return asgi_server


def http(url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """A plain HTTP call (the status and the JSON or text answer), for what the client will not send."""
    request = urllib.request.Request(
        url, data=body, headers=headers or {}, method="POST" if body is not None else "GET"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            status, raw = answer.status, answer.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()


def api_key(name: str = "team", **options: Any) -> str:
    out = io.StringIO()
    call_command("create_api_key", name, stdout=out, stderr=io.StringIO(), **options)
    return out.getvalue().strip()


@pytest.fixture
def client(stack: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack, api_key=api_key(), max_retries=0, timeout=60)


CHAT: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello"},
]


def stored_generation(redis_client: redis.Redis, generation_id: str) -> Any:
    """The generation as the API shows it, once the ingester stored its end."""

    def ended() -> bool:
        detail = generation_detail(generation_id=uuid.UUID(generation_id))
        return detail is not None and detail.state in ("completed", "failed")

    ingest_until(redis_client, ended)
    return generation_detail(generation_id=uuid.UUID(generation_id))


def test_models_lists_the_registered_models_a_live_worker_serves(
    client: openai.OpenAI, redis_client: redis.Redis
) -> None:
    RegisteredModel.objects.create(name="unserved", path="/models/unserved")
    assert sorted(m.id for m in client.models.list()) == ["demo", "other"]
    model = client.models.retrieve("demo")
    assert (model.id, model.object, model.owned_by) == ("demo", "model", "mlxserve")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("unserved")


def test_a_chat_completion_is_a_generation_rendered_with_the_chat_template(
    client: openai.OpenAI, redis_client: redis.Redis
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="demo", messages=CHAT, max_tokens=12, temperature=0
    )
    completion = raw.parse()
    generation_id = raw.headers["x-request-id"]
    assert completion.id == f"chatcmpl-{generation_id}"
    assert completion.object == "chat.completion" and completion.model == "demo"
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 12
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 12
    stored = stored_generation(redis_client, generation_id)
    assert stored.state == "completed" and stored.model == "demo" and stored.tokens == 12
    events = Event.objects.filter(generation_id=generation_id)
    assert (
        "".join(e.payload["token"] for e in events.filter(type="tokenGenerated").order_by("seq"))
        == choice.message.content
    )
    completed = events.get(type="generationCompleted")
    assert completed.payload["metadata"]["finishReason"] == "length"
    assert completed.source == DEMO_WORKER
    started = events.get(type="generationStarted")
    assert started.payload["prompt"] != CHAT  # the prompt privacy policy (hash, by default) applies
    # The chat template rendered the messages: the prompt is longer than the bare words.
    assert completion.usage.prompt_tokens > 8


def test_a_stream_carries_the_role_then_each_delta_then_the_reason_and_the_usage(
    client: openai.OpenAI, redis_client: redis.Redis
) -> None:
    stream = client.chat.completions.create(
        model="demo",
        messages=CHAT,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        logprobs=True,
        top_logprobs=3,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert 1 <= len(deltas) <= 16
    for chunk in deltas:
        assert chunk.choices[0].logprobs is not None and chunk.choices[0].logprobs.content
        entry = chunk.choices[0].logprobs.content[0]
        assert entry.token == chunk.choices[0].delta.content and entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
    assert chunks[-2].choices[0].finish_reason == "length"
    assert (
        chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16
    )
    generation_id = chunks[0].id.removeprefix("chatcmpl-")
    stored = stored_generation(redis_client, generation_id)
    text = "".join(c.choices[0].delta.content or "" for c in chunks[1:] if c.choices)
    assert stored.tokens == 16
    tokens = Event.objects.filter(generation_id=generation_id, type="tokenGenerated").order_by("seq")
    assert "".join(e.payload["token"] for e in tokens) == text


def test_completions_stop_before_a_stop_sequence_and_say_so(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="demo", prompt="Once upon a time", max_tokens=24, temperature=0)
    text = whole.choices[0].text
    assert whole.choices[0].finish_reason == "length" and whole.object == "text_completion"
    # A stop sequence that first occurs well into the text (greedy text of random weights repeats itself).
    stop = next(text[p : p + 3] for p in range(8, len(text) - 3) if text.index(text[p : p + 3]) == p)
    cut = client.completions.create(
        model="demo",
        prompt="Once upon a time",
        max_tokens=24,
        temperature=0,
        stop=[stop, "\x00never"],
        logprobs=2,
    )
    choice = cut.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text == text[: text.index(stop)]
    assert choice.logprobs is not None and choice.logprobs.tokens and choice.logprobs.token_logprobs
    assert len(choice.text) >= 8 and "".join(choice.logprobs.tokens) == choice.text
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    streamed = client.completions.create(
        model="demo", prompt="Once upon a time", max_tokens=24, temperature=0, stop=stop, stream=True
    )
    pieces = list(streamed)
    assert "".join(p.choices[0].text for p in pieces) == choice.text
    assert pieces[-1].choices[0].finish_reason == "stop"


def test_the_async_client_streams_several_at_once(stack: str) -> None:
    key = api_key("async-team")

    async def one(client: openai.AsyncOpenAI, model: str) -> tuple[str, int]:
        stream = await client.chat.completions.create(
            model=model, messages=CHAT, max_tokens=8, temperature=0, stream=True
        )
        pieces = [chunk async for chunk in stream]
        return pieces[-1].choices[0].finish_reason or "", len(pieces)

    async def main() -> list[tuple[str, int]]:
        async with openai.AsyncOpenAI(base_url=stack, api_key=key, max_retries=0) as client:
            return await asyncio.gather(*(one(client, model) for model in ("demo", "other", "demo", "other")))

    for reason, count in asyncio.run(main()):
        assert reason == "length" and count >= 3  # the role, a delta at least, the reason


def test_a_request_past_the_models_context_is_a_400_streamed_or_not(client: openai.OpenAI) -> None:
    # The demo model's context is 32,768 tokens: the prompt and max_tokens together cannot fit.
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as refused:
            answer = client.chat.completions.create(
                model="demo", messages=CHAT, max_tokens=32768, stream=stream
            )
            if stream:
                list(cast(Any, answer))
        assert refused.value.code == "context_length_exceeded" and refused.value.param == "max_tokens"
        assert "maximum context length is 32768 tokens" in refused.value.message
    # The worker goes on serving.
    served = client.completions.create(model="demo", prompt="Hi", max_tokens=3, temperature=0)
    assert served.usage is not None and served.usage.completion_tokens == 3


def test_each_worker_gets_only_its_own_models_requests(
    client: openai.OpenAI, redis_client: redis.Redis
) -> None:
    ids = {}
    for model in ("demo", "other", "other", "demo"):
        raw = client.chat.completions.with_raw_response.create(model=model, messages=CHAT, max_tokens=2)
        ids[raw.headers["x-request-id"]] = model
    for generation_id, model in ids.items():
        stored_generation(redis_client, generation_id)
        completed = Event.objects.get(generation_id=generation_id, type="generationCompleted")
        assert completed.source == {"demo": DEMO_WORKER, "other": OTHER_WORKER}[model]


def test_bad_requests_get_openai_errors_the_client_raises_typed(client: openai.OpenAI, stack: str) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="demo", messages=CHAT, n=2)
    assert bad.value.param == "n" and "not supported" in bad.value.message
    with pytest.raises(openai.BadRequestError) as unknown:
        client.chat.completions.create(model="demo", messages=CHAT, extra_body={"best_friend": 1})
    assert unknown.value.param == "best_friend"
    with pytest.raises(openai.BadRequestError) as role:
        client.chat.completions.create(model="demo", messages=[cast(Any, {"role": "tool", "content": "x"})])
    assert role.value.param is not None and role.value.param.startswith("messages[0]")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="demo", messages=CHAT, stop=["a", "b", "c", "d", "e"])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="demo", messages=CHAT, max_tokens=10**9)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=CHAT)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=stack, api_key="mlx-wrong", max_retries=0).models.list()
    status, answer = http(
        f"{stack}/chat/completions", b"{not json", {"Authorization": f"Bearer {client.api_key}"}
    )
    assert status == 400 and set(answer["error"]) == {"message", "type", "param", "code"}
    status, answer = http(f"{stack}/nowhere")
    assert status == 404 and answer["error"]["code"] == "not_found"


def test_a_key_outside_its_budget_or_models_or_role_is_refused(stack: str) -> None:
    limited = openai.OpenAI(
        base_url=stack, api_key=api_key("one-a-minute", requests_per_minute=1), max_retries=0
    )
    limited.completions.create(model="demo", prompt="Hi", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as refused:
        limited.completions.create(model="demo", prompt="Hi", max_tokens=1)
    assert 1 <= int(refused.value.response.headers["retry-after"]) <= 60
    tokens = openai.OpenAI(base_url=stack, api_key=api_key("ten-tokens", tokens_per_minute=10), max_retries=0)
    tokens.completions.create(
        model="demo", prompt="Hi there", max_tokens=8, temperature=0
    )  # spends the budget
    with pytest.raises(openai.RateLimitError):
        tokens.completions.create(model="demo", prompt="Hi", max_tokens=1)
    only_other = openai.OpenAI(base_url=stack, api_key=api_key("other-only", models=["other"]), max_retries=0)
    assert [m.id for m in only_other.models.list()] == ["other"]
    with pytest.raises(openai.NotFoundError):
        only_other.completions.create(model="demo", prompt="Hi", max_tokens=1)
    key = api_key("demoted")
    user = User.objects.get(username="demoted")
    user.groups.set([Group.objects.get_or_create(name=VIEWER_GROUP)[0]])
    with pytest.raises(openai.PermissionDeniedError):
        openai.OpenAI(base_url=stack, api_key=key, max_retries=0).models.list()
    ApiKey.objects.filter(name="one-a-minute").update(is_active=False)
    with pytest.raises(openai.AuthenticationError):
        limited.models.list()


def test_a_model_no_live_worker_serves_is_503_at_once(
    client: openai.OpenAI, redis_client: redis.Redis
) -> None:
    RegisteredModel.objects.create(name="unserved", path="/models/unserved")
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as refused:
        client.chat.completions.create(model="unserved", messages=CHAT)
    assert refused.value.status_code == 503 and refused.value.code == "model_not_served"
    assert time.monotonic() - started < 2
    assert not Generation.objects.filter(model="unserved").exists()  # nothing recorded, nothing queued


def test_a_client_leaving_mid_stream_frees_the_worker(
    client: openai.OpenAI, redis_client: redis.Redis
) -> None:
    stream = client.chat.completions.create(
        model="demo", messages=CHAT, max_tokens=5000, temperature=0, stream=True
    )
    generation_id = ""
    for index, chunk in enumerate(stream):
        generation_id = chunk.id.removeprefix("chatcmpl-")
        if index == 5:
            break
    left = time.monotonic()
    stream.close()
    # The worker is free: the next request is answered at once, not after 5,000 tokens.
    quick = client.completions.create(model="demo", prompt="Hi", max_tokens=2, temperature=0)
    assert quick.choices[0].finish_reason == "length"
    assert time.monotonic() - left < 10
    stored = stored_generation(redis_client, generation_id)
    completed = Event.objects.get(generation_id=generation_id, type="generationCompleted")
    assert completed.payload["metadata"]["finishReason"] == "cancelled"
    assert 5 <= stored.tokens < 5000
    # Nothing the worker emitted was lost: every token it made is stored, seq 1..n.
    seqs = list(
        Event.objects.filter(generation_id=generation_id, type="tokenGenerated")
        .order_by("seq")
        .values_list("seq", flat=True)
    )
    assert seqs == list(range(1, completed.payload["tokensGenerated"] + 1))


def test_a_request_waiting_past_the_queue_timeout_fails_and_is_dropped_unrun(
    client: openai.OpenAI, redis_client: redis.Redis, settings: Any
) -> None:
    settings.QUEUE_TIMEOUT_S = 1
    busy = [
        client.chat.completions.create(
            model="demo", messages=CHAT, max_tokens=20000, temperature=0, stream=True
        )
        for _ in range(2)
    ]
    for stream in busy:
        next(iter(stream))  # the worker (concurrency 2) is generating both: it takes no third
    with pytest.raises(openai.InternalServerError) as late:
        client.chat.completions.create(model="demo", messages=CHAT, max_tokens=4)
    assert late.value.status_code == 503 and late.value.code == "queue_timeout"
    generation_id = late.value.response.headers["x-request-id"]
    for stream in busy:
        stream.close()
    stored = stored_generation(redis_client, generation_id)
    completed = Event.objects.get(generation_id=generation_id, type="generationCompleted")
    assert completed.payload["metadata"]["finishReason"] == "cancelled"
    assert completed.payload["metadata"]["dropped"] in ("client-gone", "queue-timeout")
    assert stored.tokens == 0


def test_metrics_count_the_requests_as_clients_see_them(client: openai.OpenAI, stack: str) -> None:
    client.completions.create(model="demo", prompt="Hi", max_tokens=2, temperature=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="Hi", max_tokens=2, temperature=0)
    _, text = http(stack.removesuffix("/v1") + "/metrics")
    assert 'mlxserve_openai_requests_total{model="demo",operation="text_completion",status="200"}' in text
    assert 'mlxserve_openai_requests_total{model="-",operation="text_completion",status="404"}' in text
    for name in (
        "gen_ai_server_time_to_first_token_seconds",
        "gen_ai_server_request_duration_seconds",
        "mlxserve_openai_queue_seconds",
    ):
        assert f'{name}_count{{model="demo",operation="text_completion"}}' in text


def test_api_generations_are_routed_the_same_way(
    operator_client: Any, stack: str, redis_client: redis.Redis
) -> None:
    RegisteredModel.objects.create(name="unserved", path="/models/unserved")
    refused = operator_client.post("/api/generations/", {"model": "unserved", "prompt": "Hi"}, format="json")
    assert refused.status_code == 503 and refused.json()["code"] == "ModelNotServed"
    queued = operator_client.post(
        "/api/generations/", {"model": "other", "prompt": "Hi", "maxTokens": 2}, format="json"
    )
    assert queued.status_code == 202
    generation_id = queued.json()["generationId"]
    stored_generation(redis_client, generation_id)
    assert Event.objects.get(generation_id=generation_id, type="generationCompleted").source == OTHER_WORKER


def test_create_api_key_refuses_what_it_cannot_apply(db: Any) -> None:
    from django.core.management.base import CommandError

    viewer = User.objects.create_user("viewer-only")
    viewer.groups.add(Group.objects.get_or_create(name=VIEWER_GROUP)[0])
    for args, options in (
        (["k"], {"user": "viewer-only"}),
        (["k"], {"user": "nobody"}),
        (["k"], {"models": ["unregistered"]}),
        (["k"], {"requests_per_minute": 0}),
        (["x" * 101], {}),
    ):
        with pytest.raises(CommandError):
            call_command("create_api_key", *args, **options)
    key = api_key("fresh")
    row = ApiKey.objects.get(name="fresh")
    assert row.user.groups.filter(name=OPERATOR_GROUP).exists() and not row.user.has_usable_password()
    assert key.startswith("mlx-") and row.digest != key and key.startswith(row.prefix)


def test_junk_on_a_reply_channel_ends_that_request_with_an_error_and_nothing_else(
    client: openai.OpenAI, redis_client: redis.Redis
) -> None:
    # What a worker host's credentials can publish: a malformed reply, an oversized one.
    for junk in (
        b"\xff not a reply",
        b'{"kind": "tokens", "tokens": [["' + b"x" * (2 * 1024 * 1024) + b'"]]}',
    ):
        stream = client.chat.completions.create(
            model="demo", messages=CHAT, max_tokens=20000, temperature=0, stream=True
        )
        generation_id = next(iter(stream)).id.removeprefix("chatcmpl-")
        redis_client.publish(reply_channel(generation_id), junk)
        with pytest.raises(openai.APIError) as ended:
            for _ in stream:
                pass
        assert ended.value.code in ("MalformedReply", "ReplyOverflow")
        completed = stored_generation(redis_client, generation_id)
        assert completed.state == "completed"  # the worker stopped it: nobody listened any more
    # The web process and the worker serve the next request as ever.
    assert (
        client.completions.create(model="demo", prompt="Hi", max_tokens=2, temperature=0)
        .choices[0]
        .finish_reason
        == "length"
    )


def test_tasks_reach_their_queue_even_when_redis_lost_its_routing_tables(
    client: openai.OpenAI, redis_client: redis.Redis
) -> None:
    # As after a Redis restart without persistence: kombu's exchange bindings are gone.
    for key in redis_client.scan_iter("_kombu.binding.*"):
        redis_client.delete(key)
    started = time.monotonic()
    for model in ("demo", "other"):
        assert (
            client.completions.create(model=model, prompt="Hi", max_tokens=2, temperature=0)
            .choices[0]
            .finish_reason
            == "length"
        )
    assert time.monotonic() - started < 30
    assert not redis_client.exists("ae.undeliver")  # kombu's list for what no binding routes


def test_a_non_streamed_request_whose_client_leaves_stops_its_generation(
    client: openai.OpenAI, stack: str, redis_client: redis.Redis
) -> None:
    import socket

    host, port = stack.removeprefix("http://").removesuffix("/v1").split(":")
    body = json.dumps({"model": "demo", "prompt": "Hi", "max_tokens": 20000, "temperature": 0}).encode()
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {client.api_key}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 30
        while not Generation.objects.filter(model="demo").exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)  # generating, the answer not sent yet
    generation_id = str(Generation.objects.get(model="demo").pk)
    stored = stored_generation(redis_client, generation_id)
    completed = Event.objects.get(generation_id=generation_id, type="generationCompleted")
    assert completed.payload["metadata"]["finishReason"] == "cancelled"
    assert 0 < stored.tokens < 20000


def test_a_request_past_its_time_limit_is_stopped(
    client: openai.OpenAI, redis_client: redis.Redis, settings: Any
) -> None:
    settings.REQUEST_TIMEOUT_S = 1
    with pytest.raises(openai.APIStatusError) as late:
        client.completions.create(model="demo", prompt="Hi", max_tokens=20000, temperature=0)
    assert late.value.status_code == 504 and late.value.code == "RequestTimeout"
    generation_id = late.value.response.headers["x-request-id"]
    stored_generation(redis_client, generation_id)
    completed = Event.objects.get(generation_id=generation_id, type="generationCompleted")
    assert completed.payload["metadata"]["finishReason"] == "cancelled"
