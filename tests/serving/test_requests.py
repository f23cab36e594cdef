"""OpenAI requests as this server reads them: every field typed, neutral values only for what it does
not implement, every refusal naming its parameter."""

from __future__ import annotations

import json
from typing import Any

import pytest

from serving.requests import ChatRequest, CompletionRequest, OpenAIError, order_parse

CHAT = {"model": "demo", "messages": [{"role": "user", "content": "Hi"}]}


def chat(**fields: Any) -> Any:
    return order_parse(json.dumps({**CHAT, **fields}).encode(), ChatRequest)


def refusal(body: Any, kind: Any = ChatRequest) -> OpenAIError:
    with pytest.raises(OpenAIError) as refused:
        order_parse(body if isinstance(body, bytes) else json.dumps(body).encode(), kind)
    assert refused.value.status == 400
    error = refused.value.body()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    return refused.value


def test_a_chat_request_becomes_an_order_with_openai_defaults() -> None:
    order = chat()
    assert order.prompt == {"messages": [{"role": "user", "content": "Hi"}]}
    assert (order.max_tokens, order.temperature, order.top_p, order.stream) == (256, 1.0, 1.0, False)
    parts = chat(
        messages=[
            {"role": "developer", "content": "Be terse"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        ],
        max_completion_tokens=7,
        max_tokens=3,
        stop="x",
        stream=True,
        stream_options={"include_usage": True},
        logprobs=True,
        top_logprobs=4,
        seed=9,
        temperature=0,
        user="u1",
        n=1,
        frequency_penalty=0,
        presence_penalty=0.0,
        tools=[],
        tool_choice="none",
        response_format={"type": "text"},
        metadata={"team": "x"},
        store=False,
    )
    assert parts.prompt == {
        "messages": [{"role": "system", "content": "Be terse"}, {"role": "user", "content": "ab"}]
    }
    assert (parts.max_tokens, parts.stop, parts.include_usage, parts.logprobs, parts.top_logprobs) == (
        7,
        ["x"],
        True,
        True,
        4,
    )
    assert (parts.seed, parts.temperature) == (9, 0.0)


def test_a_completion_request_defaults_to_sixteen_tokens_and_reads_logprobs_as_a_count() -> None:
    order = order_parse(
        json.dumps({"model": "demo", "prompt": ["Once"], "logprobs": 2}).encode(), CompletionRequest
    )
    assert (order.prompt, order.max_tokens, order.logprobs, order.top_logprobs) == ("Once", 16, True, 2)
    plain = order_parse(json.dumps({"model": "demo", "prompt": "x"}).encode(), CompletionRequest)
    assert (plain.logprobs, plain.top_logprobs) == (False, 0)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 2}, "n"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"presence_penalty": -1}, "presence_penalty"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"store": True}, "store"),
        ({"service_tier": "flex"}, "service_tier"),
        ({"modalities": ["audio"]}, "modalities"),
        ({"surprise": 1}, "surprise"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": ""}, "stop"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 10**9}, "max_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**40}, "seed"),
        ({"model": ""}, "model"),
        ({"model": 5}, "model"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content",
        ),
        ({"messages": [{"role": "user", "content": "x", "extra": 1}]}, "messages[0].extra"),
        ({"user": "u" * 257}, "user"),
    ],
)
def test_what_this_server_cannot_do_is_refused_naming_the_parameter(
    fields: dict[str, Any], param: str
) -> None:
    refused = refusal({**CHAT, **fields})
    assert refused.param is not None and refused.param.startswith(param), refused.message


@pytest.mark.parametrize("body", [b"{nope", b"[1, 2]", b"", b"NaN", json.dumps({"messages": []}).encode()])
def test_a_body_that_is_no_request_gets_a_clear_400(body: bytes) -> None:
    refusal(body)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": [1, 2]}, "prompt"),
        ({"echo": True}, "echo"),
        ({"best_of": 3}, "best_of"),
        ({"suffix": "x"}, "suffix"),
        ({"logprobs": 6}, "logprobs"),
    ],
)
def test_completion_fields_are_checked_too(fields: dict[str, Any], param: str) -> None:
    refused = refusal({"model": "demo", "prompt": "x", **fields}, CompletionRequest)
    assert refused.param is not None and refused.param.startswith(param), refused.message


def test_error_statuses_carry_the_types_the_client_maps() -> None:
    assert OpenAIError(401, "x").body()["error"]["type"] == "authentication_error"
    assert OpenAIError(429, "x").body()["error"]["type"] == "rate_limit_error"
    assert OpenAIError(503, "x", code="model_not_served").body()["error"] == {
        "message": "x",
        "type": "server_error",
        "param": None,
        "code": "model_not_served",
    }
