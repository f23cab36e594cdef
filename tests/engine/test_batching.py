"""Several generations at once on one engine (continuous batching), on the demo model: each gets
the tokens it would get alone, its own complete events, its own end."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from mlxserve.contract.serving import reply_channel
from mlxserve.contract.validation import EngineError
from mlxserve.engine.demo_model import create_demo_model
from mlxserve.engine.engine import GenerationRequest, GenerationResult
from mlxserve.engine.models import ModelCache
from mlxserve.engine.reply import GenerationReply
from tests.factories import Recorder

EIGHT = [
    # (max_tokens, temperature, top_p, seed): greedy and sampled, nucleus or not, short and long
    (40, 0.0, 1.0, None),
    (64, 0.8, 1.0, 1),
    (24, 1.0, 0.9, 2),
    (80, 0.0, 1.0, None),
    (48, 0.6, 0.5, 3),
    (32, 1.2, 1.0, 4),
    (56, 0.9, 0.95, 5),
    (72, 0.7, 1.0, 6),
]


@pytest.fixture
def batching() -> Iterator[Recorder]:
    rec = Recorder(cache=ModelCache(max_models=2), concurrency=8)
    yield rec
    rec.engine.shutdown()


def _request(model: Path, i: int, **changes: Any) -> GenerationRequest:
    max_tokens, temperature, top_p, seed = EIGHT[i]
    values: dict[str, Any] = {
        "model": str(model),
        "prompt": f"Request {i} of eight asks" + " more" * i,  # prompts of different lengths
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        **changes,
    }
    return GenerationRequest(**values)


def _all_at_once(
    recorder: Recorder, requests: list[GenerationRequest]
) -> dict[int, GenerationResult | Exception]:
    results: dict[int, GenerationResult | Exception] = {}

    def run(i: int) -> None:
        try:
            results[i] = recorder.engine.generate(requests[i])
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results


def _events_of(recorder: Recorder, generation_id: str) -> list[dict[str, Any]]:
    return [e for e in recorder.events() if e.get("generationId") == generation_id]


def test_eight_at_once_each_get_the_tokens_they_get_alone_with_their_own_events(
    batching: Recorder, demo_model: Path
) -> None:
    alone = [batching.engine.generate(_request(demo_model, i, seed=EIGHT[i][3] or 7)) for i in range(8)]
    steps_alone = batching.sample("kr_serve_generation_batch_size_count")
    together = _all_at_once(batching, [_request(demo_model, i, seed=EIGHT[i][3] or 7) for i in range(8)])

    for i in range(8):
        result = together[i]
        assert isinstance(result, GenerationResult), result
        assert (result.text, result.tokens, result.finish_reason) == (
            alone[i].text,
            alone[i].tokens,
            alone[i].finish_reason,
        ), f"request {i}"
        events = _events_of(batching, result.generation_id)
        assert [e["type"] for e in events[:1] + events[-1:]] == ["generationStarted", "generationCompleted"]
        tokens = [e for e in events if e["type"] == "tokenGenerated"]
        assert [e["seq"] for e in tokens] == list(range(1, result.tokens + 1))
        assert "".join(e["payload"]["token"] for e in tokens) == result.text
        assert all(isinstance(e["payload"]["logprob"], float) for e in tokens)
        assert events[-1]["seq"] == result.tokens + 1
        assert events[-1]["payload"]["tokensGenerated"] == result.tokens
    # They ran together: far fewer steps than tokens, and steps that made many tokens at once.
    steps = batching.sample("kr_serve_generation_batch_size_count") - steps_alone
    made = sum(r.tokens for r in alone)
    assert steps < made / 3
    assert batching.sample("kr_serve_generation_batch_size_bucket", le="4.0") < batching.sample(
        "kr_serve_generation_batch_size_count"
    )
    assert batching.sample("kr_serve_requests_running") == 0
    # runtimeStatus counted them while they ran.
    assert max(e["payload"]["activeTasks"] for e in batching.events("runtimeStatus")) >= 4


def test_a_generation_running_alone_is_joined_mid_way_and_finishes_alone_with_the_same_tokens(
    batching: Recorder, demo_model: Path
) -> None:
    long = _request(demo_model, 1, max_tokens=200, seed=11)
    expected = batching.engine.generate(long).text
    started = threading.Event()
    seen: list[str] = []

    def on_token(text: str) -> None:
        seen.append(text)
        if len(seen) == 20:
            started.set()

    box: dict[str, Any] = {}
    runner = threading.Thread(
        target=lambda: box.update(
            result=batching.engine.generate(_request(demo_model, 1, max_tokens=200, seed=11), on_token)
        )
    )
    runner.start()
    assert started.wait(60)
    joined = _all_at_once(batching, [_request(demo_model, i, seed=EIGHT[i][3] or 7) for i in range(2, 5)])
    runner.join(60)
    assert all(isinstance(r, GenerationResult) for r in joined.values())
    assert len(seen) > max(r.tokens for r in joined.values() if isinstance(r, GenerationResult))
    assert box["result"].text == expected  # alone, batched with three, then alone again


def test_one_failing_request_does_not_stop_the_others(batching: Recorder, demo_model: Path) -> None:
    requests = [_request(demo_model, i) for i in range(4)]
    requests[2] = GenerationRequest(model=str(demo_model.parent / "no-such-model"), prompt="a", max_tokens=5)
    results = _all_at_once(batching, requests)
    assert isinstance(results[2], EngineError) and results[2].code == "ModelNotFound"
    for i in (0, 1, 3):
        assert isinstance(results[i], GenerationResult) and results[i].tokens > 0  # type: ignore[union-attr]
    (error,) = [e for e in batching.events("error")]
    assert error["generationId"] == requests[2].generation_id


def test_a_client_leaving_mid_batch_cancels_its_generation_alone(
    batching: Recorder, demo_model: Path, redis_client: redis.Redis
) -> None:
    requests = [_request(demo_model, i, max_tokens=400, temperature=0.0) for i in range(4)]
    leaving = requests[1]
    listener = redis_client.pubsub()
    listener.subscribe(reply_channel(leaving.generation_id))
    listener.get_message(timeout=1)  # the subscription's confirmation
    reply = GenerationReply(redis_client, leaving.generation_id, worker="test-host/worker-1")
    assert reply.start()
    results: dict[int, Any] = {}

    def run(i: int) -> None:
        try:
            results[i] = batching.engine.generate(requests[i], reply=reply if i == 1 else None)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    tokens = 0
    while tokens < 5:  # the client reads a few tokens, then leaves
        message = listener.get_message(timeout=10)
        assert message is not None
        tokens += message["type"] == "message"
    listener.unsubscribe()
    listener.close()
    for thread in threads:
        thread.join(120)
    assert results[1].finish_reason == "cancelled" and results[1].tokens < 400
    for i in (0, 2, 3):
        assert results[i].tokens == 400 and results[i].finish_reason == "length"
    completed = {e["generationId"]: e for e in batching.events("generationCompleted")}
    assert completed[leaving.generation_id]["payload"]["metadata"]["finishReason"] == "cancelled"


def test_a_request_past_the_models_context_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    small = create_demo_model(tmp_path / "small", max_position_embeddings=64)
    recorder = Recorder(concurrency=4)
    try:
        with pytest.raises(EngineError) as refused:
            recorder.engine.generate(
                GenerationRequest(model=str(small), prompt="Hello there", max_tokens=100)
            )
        assert refused.value.code == "ContextLengthExceeded"
        assert "maximum context length is 64 tokens" in str(refused.value)
        (error,) = recorder.events("error")
        assert error["payload"]["code"] == "ContextLengthExceeded"
        assert recorder.engine.generate(
            GenerationRequest(model=str(small), prompt="Hello", max_tokens=20)
        ).tokens
    finally:
        recorder.engine.shutdown()


def test_memory_refuses_what_never_fits_and_queues_what_fits_alone(demo_model: Path) -> None:
    # The demo model's cache takes 2 layers x 2 (keys, values) x 2 heads x 32 dims x 4 bytes = 1 KiB a token.
    recorder = Recorder(concurrency=4, kv_bytes=300 * 1024)
    try:
        with pytest.raises(EngineError) as refused:
            recorder.engine.generate(GenerationRequest(model=str(demo_model), prompt="Hi", max_tokens=400))
        assert refused.value.code == "RequestTooLarge"
        assert "more than this worker can hold" in str(refused.value)
        requests = [
            GenerationRequest(model=str(demo_model), prompt="Hi", max_tokens=200, temperature=0.0)
            for _ in range(2)
        ]
        results = _all_at_once(recorder, requests)  # each fits alone, not both: one after the other
        assert all(isinstance(r, GenerationResult) and r.tokens == 200 for r in results.values())
        assert recorder.sample("kr_serve_generation_batch_size_bucket", le="1.0") == recorder.sample(
            "kr_serve_generation_batch_size_count"
        )
    finally:
        recorder.engine.shutdown()


def test_unseeded_sampled_requests_share_a_sampler_and_batch(batching: Recorder, demo_model: Path) -> None:
    requests = [
        GenerationRequest(model=str(demo_model), prompt=f"Sampled {i}", max_tokens=30, temperature=1.0)
        for i in range(4)
    ]
    results = _all_at_once(batching, requests)
    for request in requests:
        result = results[requests.index(request)]
        assert isinstance(result, GenerationResult) and 1 <= result.tokens <= 30
        tokens = [e for e in _events_of(batching, request.generation_id) if e["type"] == "tokenGenerated"]
        assert [e["seq"] for e in tokens] == list(range(1, result.tokens + 1))
    assert batching.sample("kr_serve_generation_batch_size_bucket", le="1.0") < batching.sample(
        "kr_serve_generation_batch_size_count"
    )


def test_a_generation_whose_start_the_contract_refuses_fails_alone(
    batching: Recorder, demo_model: Path
) -> None:
    with pytest.raises(EngineError) as refused:  # max_tokens 0: generationStarted breaks the contract
        batching.engine.generate(GenerationRequest(model=str(demo_model), prompt="Hi", max_tokens=0))
    assert refused.value.code == "InvalidParams"
    (error,) = batching.events("error")
    assert "maxTokens" in error["payload"]["error"]
    assert (
        batching.engine.generate(GenerationRequest(model=str(demo_model), prompt="Hi", max_tokens=3)).tokens
        == 3
    )
