"""A generation's reply: stop sequences cut across tokens, the client's leaving noticed (a real Redis)."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from mlxserve.contract.serving import (
    ReplyEnd,
    ReplyStart,
    ReplyToken,
    ReplyTokens,
    model_queue,
    reply_channel,
    reply_decoder,
    serving_key,
)
from mlxserve.engine.reply import GenerationReply, ServingClaim, StopScanner


def fed(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    scanner = StopScanner(stops)
    out: list[str] = []
    for piece in pieces:
        released, stopped = scanner.feed(ReplyToken(piece))
        out.extend(t.text for t in released)
        if stopped:
            return "".join(out), True
    return "".join(out + [t.text for t in scanner.rest()]), False


def test_a_stop_sequence_across_tokens_is_cut_with_what_follows() -> None:
    assert fed(["END"], ["Hello E", "N", "D and more"]) == ("Hello ", True)
    assert fed(["\n\n"], ["a\n", "\nb"]) == ("a", True)
    assert fed(["stop"], ["stop"]) == ("", True)
    assert fed(["xy", "b"], ["a", "b", "xy"]) == ("a", True)  # the first met wins


def test_text_that_only_looked_like_a_stop_is_released() -> None:
    assert fed(["END"], ["E", "N", "d"]) == ("ENd", False)
    assert fed([], ["a", "b"]) == ("ab", False)


@given(
    st.lists(st.text(alphabet="abE\nND", max_size=4), max_size=12),
    st.sampled_from(["END", "\n\n", "ab", "b"]),
)
def test_the_cut_text_is_the_whole_text_up_to_the_first_stop(pieces: list[str], stop: str) -> None:
    whole = "".join(pieces)
    text, stopped = fed([stop], pieces)
    if stop in whole:
        assert (text, stopped) == (whole[: whole.index(stop)], True)
    else:
        assert (text, stopped) == (whole, False)


def messages(pubsub: Any, until: type, timeout: float = 5.0) -> list[Any]:
    seen: list[Any] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.2)
        if message and message["type"] == "message":
            seen.append(reply_decoder.decode(message["data"]))
            if isinstance(seen[-1], until):
                return seen
    raise AssertionError(f"no {until.__name__} in {seen}")


def test_a_reply_reaches_its_listener_start_tokens_end(redis_client: redis.Redis) -> None:
    pubsub = redis_client.pubsub()
    pubsub.subscribe(reply_channel("g1"))
    pubsub.get_message(timeout=1)  # the subscription's confirmation
    reply = GenerationReply(redis_client, "g1", worker="h/w", stop=["zz"], logprobs=True)
    assert reply.start()
    assert not reply.token(ReplyToken("ab", -0.5))
    assert reply.token(ReplyToken("czzd", -0.1))  # met a stop sequence: the generation stops
    reply.end("length", prompt_tokens=3)
    seen = messages(pubsub, ReplyEnd)
    assert isinstance(seen[0], ReplyStart) and seen[0].worker == "h/w"
    tokens = [t for m in seen if isinstance(m, ReplyTokens) for t in m.tokens]
    assert [t.text for t in tokens] == ["ab", "c"] and tokens[0].logprob == -0.5
    assert seen[-1] == ReplyEnd(finish_reason="stop", prompt_tokens=3, completion_tokens=2)


def test_nobody_listening_means_nothing_to_generate_or_stop(redis_client: redis.Redis) -> None:
    assert not GenerationReply(redis_client, "gone", worker="h/w").start()  # the client left while queued
    pubsub = redis_client.pubsub()
    pubsub.subscribe(reply_channel("g2"))
    pubsub.get_message(timeout=1)
    reply = GenerationReply(redis_client, "g2", worker="h/w", ping_s=0.05)
    assert reply.start()
    assert not reply.token(ReplyToken("a"))
    pubsub.unsubscribe()
    pubsub.get_message(timeout=1)
    assert reply.cancelled.wait(10)  # noticed by a ping, with no token to publish
    assert reply.token(ReplyToken("b"))
    reply.end("length", prompt_tokens=1)


def test_a_serving_claim_lapses_unless_renewed_and_is_withdrawn_on_stop(redis_client: redis.Redis) -> None:
    claim = ServingClaim(redis_client, "h/w", ["demo", "org/model"])
    claim.renew()
    seconds, _ = redis_client.time()
    for model in ("demo", "org/model"):
        assert redis_client.zcount(serving_key(model), seconds * 1000, "+inf") == 1
    assert redis_client.zcount(serving_key(None), 0, "+inf") == 0
    claim.stop()
    assert redis_client.zcard(serving_key("demo")) == 0


@pytest.mark.parametrize("model", ["demo", "qwen-0.5b_v2.1", "org/model", "../x", "a" * 300, "*"])
def test_every_model_gets_a_plain_queue_name_of_its_own(model: str) -> None:
    queue = model_queue(model)
    assert queue.startswith("mlxserve.model.") and len(queue) <= 120
    assert "/" not in queue and "*" not in queue and ".." not in queue.removeprefix("mlxserve.model.")
    assert model_queue(model + "x") != queue
