"""The OpenAI-compatible endpoints with the official ``openai`` client, against the real stack
(tests/serving/conftest.py): models, chat and text completions streamed or not, stop sequences,
several at once, the context limit, routing to the worker serving a model, errors and keys."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import openai
import pytest
import redis
from django.contrib.auth.models import Group, User

from events.models import Event, RegisteredModel
from mlxserve.web.roles import VIEWER_GROUP
from serving.models import ApiKey
from tests.serving.stack import CHAT, DEMO_WORKER, OTHER_WORKER, api_key, http, stored_generation

pytestmark = pytest.mark.django_db(transaction=True)


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
