"""The OpenAI-compatible endpoints when things go wrong, against the real stack
(tests/serving/conftest.py): no worker for a model, clients that leave, queue and time limits,
junk on a reply channel, a Redis that lost its routing tables; metrics and routed API generations."""

from __future__ import annotations

import json
import time
from typing import Any

import openai
import pytest
import redis
from django.contrib.auth.models import Group, User
from django.core.management import call_command

from events.models import Event, Generation, RegisteredModel
from mlxserve.contract.serving import reply_channel
from mlxserve.web.roles import OPERATOR_GROUP, VIEWER_GROUP
from serving.models import ApiKey
from tests.serving.stack import CHAT, OTHER_WORKER, api_key, http, stored_generation

pytestmark = pytest.mark.django_db(transaction=True)


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
