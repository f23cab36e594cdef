from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import mlx_lm
import pytest

from mlxserve.contract.validation import EngineError
from mlxserve.engine.demo_model import create_demo_model
from mlxserve.engine.engine import GenerationRequest
from mlxserve.engine.models import ModelCache, quantization_of
from tests.factories import Recorder


def test_a_generation_emits_started_each_token_in_order_and_completed(
    recorder: Recorder, demo_model: Path
) -> None:
    result = recorder.engine.generate(GenerationRequest(model=str(demo_model), prompt="Hello", max_tokens=12))
    events = recorder.events("generationStarted", "tokenGenerated", "generationCompleted", "error")
    assert [e["type"] for e in events] == ["generationStarted"] + ["tokenGenerated"] * 12 + [
        "generationCompleted"
    ]
    assert {e["generationId"] for e in events} == {result.generation_id}
    tokens = [e for e in events if e["type"] == "tokenGenerated"]
    assert [e["seq"] for e in tokens] == list(range(1, 13))
    assert "".join(e["payload"]["token"] for e in tokens) == result.text
    assert all(math.isfinite(e["payload"]["logprob"]) and e["payload"]["logprob"] <= 0 for e in tokens)
    completed = events[-1]["payload"]
    assert completed["tokensGenerated"] == 12 == result.tokens
    assert completed["durationMs"] > 0 and completed["throughput"] > 0
    assert events[0]["payload"]["prompt"] == "Hello" and events[0]["payload"]["maxTokens"] == 12


def test_the_logprob_is_that_of_the_sampled_token(recorder: Recorder, demo_model: Path) -> None:
    """Greedy decoding picks the most likely token, so its logprob is the largest of the step."""
    loaded: Any = mlx_lm.load(str(demo_model))
    model, tokenizer = loaded
    recorder.engine.generate(GenerationRequest(model=str(demo_model), prompt="The", max_tokens=1))
    [token] = recorder.events("tokenGenerated")
    import mlx.core as mx

    logits = model(mx.array([tokenizer.encode("The")]))[0, -1]
    logprobs = logits - mx.logsumexp(logits)
    assert token["payload"]["logprob"] == pytest.approx(mx.max(logprobs).item(), abs=1e-3)


def test_two_generations_load_the_model_once(recorder: Recorder, demo_model: Path) -> None:
    for _ in range(2):
        recorder.engine.generate(GenerationRequest(model=str(demo_model), prompt="a", max_tokens=3))
    [loaded] = recorder.events("modelLoaded")
    payload = loaded["payload"]
    assert payload["model"] == str(demo_model) and payload["modelPath"] == str(demo_model.resolve())
    assert payload["quantization"] == "none"
    config = json.loads((demo_model / "config.json").read_text())
    h, v, i, n = (
        config["hidden_size"],
        config["vocab_size"],
        config["intermediate_size"],
        config["num_hidden_layers"],
    )
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    assert payload["parameters"] == v * h + n * per_layer + h  # counted from the weights
    assert payload["metadata"]["loadMs"] > 0
    assert (
        recorder.sample(
            "kr_serve_models_loaded_total", model=str(demo_model), bits="", group_size="", mode=""
        )
        == 1
    )


def test_a_full_cache_evicts_the_least_recently_used_model(demo_model: Path, tmp_path: Path) -> None:
    import shutil

    other = Path(shutil.copytree(demo_model, tmp_path / "other"))
    recorder = Recorder(cache=ModelCache(max_models=1))
    try:
        recorder.engine.generate(GenerationRequest(model=str(demo_model), prompt="a", max_tokens=2))
        recorder.engine.generate(GenerationRequest(model=str(other), prompt="a", max_tokens=2))
        assert [e["payload"] for e in recorder.events("modelUnloaded")] == [
            {"model": str(demo_model), "reason": "cache-eviction"}
        ]
        assert recorder.engine.cache.names() == [str(other)]
        assert (
            recorder.sample("kr_serve_models_unloaded_total", model=str(demo_model), reason="cache-eviction")
            == 1
        )
    finally:
        recorder.engine.shutdown()


def test_the_byte_limit_evicts_too(demo_model: Path, tmp_path: Path) -> None:
    import shutil

    other = Path(shutil.copytree(demo_model, tmp_path / "other"))
    recorder = Recorder(cache=ModelCache(max_models=10, max_bytes=1))  # room for one model at most
    try:
        for path in (demo_model, other):
            recorder.engine.generate(GenerationRequest(model=str(path), prompt="a", max_tokens=1))
        assert [e["payload"]["reason"] for e in recorder.events("modelUnloaded")] == ["cache-eviction"]
    finally:
        recorder.engine.shutdown()


def test_rewriting_a_weight_file_invalidates_and_the_next_request_reloads(
    recorder: Recorder, demo_model: Path
) -> None:
    request = GenerationRequest(model=str(demo_model), prompt="a", max_tokens=2)
    recorder.engine.generate(request)
    weights = demo_model / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # same content, new file: a redeploy
    recorder.engine.generate(GenerationRequest(model=str(demo_model), prompt="a", max_tokens=2))
    types = [e["type"] for e in recorder.events("modelLoaded", "modelInvalidated")]
    assert types == ["modelLoaded", "modelInvalidated", "modelLoaded"]
    assert recorder.events("modelInvalidated")[0]["payload"] == {
        "model": str(demo_model),
        "reason": "file-changed",
    }


def test_the_file_watch_invalidates_without_a_request(demo_model: Path) -> None:
    recorder = Recorder(watch_seconds=0.1)
    recorder.engine.start()
    try:
        recorder.engine.load(str(demo_model))
        (demo_model / "config.json").write_text((demo_model / "config.json").read_text() + "\n")
        deadline = time.monotonic() + 5
        while not recorder.events("modelInvalidated") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert recorder.events("modelInvalidated")[0]["payload"]["reason"] == "file-changed"
        assert str(demo_model) not in recorder.engine.cache
    finally:
        recorder.engine.shutdown()


def test_an_unknown_model_fails_the_generation_with_model_not_found(
    recorder: Recorder, tmp_path: Path
) -> None:
    request = GenerationRequest(model=str(tmp_path / "missing"), prompt="a", max_tokens=2)
    with pytest.raises(EngineError) as info:
        recorder.engine.generate(request)
    assert info.value.code == "ModelNotFound"
    events = recorder.events("generationStarted", "tokenGenerated", "generationCompleted", "error")
    assert [e["type"] for e in events] == ["generationStarted", "error"]
    error = events[1]
    assert error["generationId"] == request.generation_id and error["seq"] == 1
    assert error["payload"]["code"] == "ModelNotFound"
    assert recorder.sample("kr_serve_generation_errors_total", model=request.model, code="ModelNotFound") == 1
    statuses = [e["payload"]["status"] for e in recorder.events("runtimeStatus")]
    assert statuses == ["busy", "error", "ready"]


def test_a_broken_model_fails_with_model_load_failed(recorder: Recorder, demo_model: Path) -> None:
    (demo_model / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(EngineError) as info:
        recorder.engine.generate(GenerationRequest(model=str(demo_model), prompt="a", max_tokens=2))
    assert info.value.code == "ModelLoadFailed"
    assert recorder.events("error")[0]["payload"]["code"] == "ModelLoadFailed"


def test_a_repo_id_not_in_the_cache_is_not_downloaded(
    recorder: Recorder, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(EngineError) as info:
        recorder.engine.generate(
            GenerationRequest(model="mlx-community/not-here-4bit", prompt="a", max_tokens=2)
        )
    assert info.value.code == "ModelNotFound"
    assert "local Hugging Face cache" in str(info.value)


def test_a_seed_makes_sampling_repeatable(recorder: Recorder, demo_model: Path) -> None:
    def run(seed: int) -> str:
        request = GenerationRequest(
            model=str(demo_model), prompt="a", max_tokens=16, temperature=1.0, seed=seed
        )
        return recorder.engine.generate(request).text

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_a_structured_prompt_is_accepted(recorder: Recorder, demo_model: Path) -> None:
    prompt = {"messages": [{"role": "user", "content": "hi"}]}
    result = recorder.engine.generate(GenerationRequest(model=str(demo_model), prompt=prompt, max_tokens=3))
    assert result.tokens == 3
    assert recorder.events("generationStarted")[0]["payload"]["prompt"] == prompt


def test_status_heartbeat_and_shutdown(demo_model: Path) -> None:
    recorder = Recorder()
    recorder.engine.start()
    recorder.engine.load(str(demo_model))
    recorder.engine.set_heartbeat_interval(0.1)
    _wait_for(lambda: len(_heartbeats(recorder)) >= 2)  # every 0.1 s: two within a generous deadline
    recorder.engine.shutdown()
    statuses = recorder.events("runtimeStatus")
    assert statuses[0]["payload"] == {"status": "ready", "modelsLoaded": 0, "activeTasks": 0}
    assert recorder.events("modelUnloaded")[-1]["payload"] == {"model": str(demo_model), "reason": "shutdown"}
    assert statuses[-1]["payload"]["status"] == "shutdown" and statuses[-1]["payload"]["modelsLoaded"] == 0


def test_an_unload_command_unloads(recorder: Recorder, demo_model: Path) -> None:
    recorder.engine.load(str(demo_model))
    assert recorder.engine.unload(str(demo_model)) is True
    assert recorder.engine.unload(str(demo_model)) is False
    assert recorder.events("modelUnloaded")[0]["payload"] == {"model": str(demo_model), "reason": "manual"}


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({}, "none"),
        ({"quantization": {"group_size": 64, "bits": 4}}, "int4"),
        ({"quantization": {"bits": 8, "mode": "affine"}}, "int8"),
        ({"quantization_config": {"bits": 4}}, "int4"),
        ({"quantization": {"bits": 3}}, None),  # the contract has no name for 3 bits: left out
        ({"quantization": {"bits": 4, "group_size": 32, "mode": "mxfp4"}}, None),  # 4-bit floats are not int4
    ],
)
def test_quantization_is_read_from_the_config(config: dict[str, object], expected: str | None) -> None:
    assert quantization_of(config).seed_value == expected


@pytest.mark.parametrize(
    ("bits", "mode", "group_size"),
    [(3, "affine", 64), (4, "affine", 64), (6, "affine", 64), (8, "affine", 64), (4, "mxfp4", 32)],
)
def test_a_quantized_model_reports_its_facts_and_the_unquantized_parameter_count(
    recorder: Recorder, demo_model: Path, tmp_path: Path, bits: int, mode: str, group_size: int
) -> None:
    """Converted by mlx_lm.convert; the packed words count the weights they hold, scales and biases none."""
    from mlx_lm.convert import convert

    quantized = tmp_path / f"q{bits}{mode}"
    convert(
        str(demo_model),
        mlx_path=str(quantized),
        quantize=True,
        q_bits=bits,
        q_group_size=group_size,
        q_mode=mode,
    )
    recorder.engine.load(str(demo_model))
    recorder.engine.load(str(quantized))
    full, packed = (e["payload"] for e in recorder.events("modelLoaded"))
    assert packed["parameters"] == full["parameters"]
    assert packed.get("quantization") == {(4, "affine"): "int4", (8, "affine"): "int8"}.get((bits, mode))
    assert full["quantization"] == "none" and "quantization" not in full["metadata"]
    assert packed["metadata"]["quantization"] == {"bits": bits, "groupSize": group_size, "mode": mode}
    labels = {"bits": str(bits), "group_size": str(group_size), "mode": mode}
    assert recorder.sample("kr_serve_models_loaded_total", model=str(quantized), **labels) == 1


def test_the_engine_times_telemetry_and_counts_every_token(recorder: Recorder, demo_model: Path) -> None:
    """The tokens counter moves a few tokens at a time, and ends a generation exact."""
    cost = recorder.engine.telemetry_cost
    before = cost.tokens
    registry = recorder.engine.metrics.registry
    for tokens in (37, 16, 1):
        recorder.engine.generate(GenerationRequest(model=str(demo_model), prompt="Hi", max_tokens=tokens))
    assert cost.tokens - before == 54 and cost.ns > 0 and cost.per_token_us() > 0
    total = registry.get_sample_value("kr_serve_tokens_generated_total", {"model": str(demo_model)})
    assert total == len(recorder.events("tokenGenerated")) == 54


def test_every_status_after_a_config_says_its_version(demo_model: Path) -> None:
    recorder = Recorder()
    recorder.engine.start()
    recorder.engine.set_config_version(7)  # as the runtime does when it applies a config
    recorder.engine.set_heartbeat_interval(0.1)
    _wait_for(lambda: len(_heartbeats(recorder)) >= 1)
    recorder.engine.shutdown()
    statuses = recorder.events("runtimeStatus")
    assert statuses[0]["payload"] == {"status": "ready", "modelsLoaded": 0, "activeTasks": 0}  # before
    after = statuses[1:]
    assert after and all(s["payload"]["metadata"]["configVersion"] == 7 for s in after)
    assert any(s["payload"]["metadata"].get("heartbeat") for s in after)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_models_generate_with_each_tokens_logprob(dtype: str, tmp_path: Path) -> None:
    """Most published MLX models are bfloat16, which NumPy cannot read: the engine still reports
    each token's log-probability, the value mlx-lm computed."""
    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    model_dir = create_demo_model(tmp_path / dtype, dtype=dtype)
    recorder = Recorder()
    try:
        result = recorder.engine.generate(
            GenerationRequest(model=str(model_dir), prompt="The", max_tokens=40)
        )
    finally:
        recorder.engine.shutdown()
    model, tokenizer = mlx_lm.load(str(model_dir))[:2]
    expected = []
    for response in stream_generate(model, tokenizer, "The", max_tokens=40, sampler=make_sampler(temp=0.0)):
        assert response.logprobs.dtype == getattr(mx, dtype)
        expected.append((response.text, response.logprobs[response.token].item()))
    tokens = recorder.events("tokenGenerated")
    assert (
        result.tokens == 40 and [(t["payload"]["token"], t["payload"]["logprob"]) for t in tokens] == expected
    )


def test_a_slow_models_tokens_leave_one_by_one(demo_model: Path) -> None:
    """Tokens are sent in batches only while they come fast: after a step as long as the batch
    linger (the publisher's, ``MLXSERVE_PUBLISH_LINGER_MS``) or longer, the token leaves at once
    (what a live view of the generation shows); the first token always does."""
    slow_recorder, fast_recorder = Recorder(token_linger_s=0.05), Recorder(token_linger_s=60)
    try:
        sent_when_handed: list[int] = []

        def slow(text: str) -> None:
            sent_when_handed.append(len(slow_recorder.events("tokenGenerated")))
            time.sleep(0.06)  # a step longer than the linger

        slow_recorder.engine.generate(
            GenerationRequest(model=str(demo_model), prompt="Hi", max_tokens=4), on_token=slow
        )
        assert sent_when_handed == [1, 2, 3, 4]
        fast: list[int] = []
        fast_recorder.engine.generate(
            GenerationRequest(model=str(demo_model), prompt="Hi", max_tokens=4),
            on_token=lambda text: fast.append(len(fast_recorder.events("tokenGenerated"))),
        )
        # The first sent at once; the next ones wait for the batch, sent at the end.
        assert fast == [1, 1, 1, 1] and len(fast_recorder.events("tokenGenerated")) == 4
    finally:
        slow_recorder.engine.shutdown()
        fast_recorder.engine.shutdown()


def test_a_fast_generations_batches_keep_every_token_and_latency(
    recorder: Recorder, demo_model: Path
) -> None:
    """Across batches (128 tokens), every token is sent once, in order, timestamps never going
    back; the inter-token latency histogram holds one gap per token after the first."""
    result = recorder.engine.generate(GenerationRequest(model=str(demo_model), prompt="Hi", max_tokens=300))
    tokens = recorder.events("tokenGenerated")
    assert [t["seq"] for t in tokens] == list(range(1, 301)) and result.tokens == 300
    stamps = [t["timestamp"] for t in tokens]
    assert stamps == sorted(stamps)
    started, completed = recorder.events("generationStarted")[0], recorder.events("generationCompleted")[0]
    assert started["timestamp"] <= stamps[0] and stamps[-1] <= completed["timestamp"]
    labels = {"model": str(demo_model)}
    assert recorder.sample("kr_serve_inter_token_latency_seconds_count", **labels) == 299
    assert recorder.sample("kr_serve_tokens_generated_total", **labels) == 300
    gaps = recorder.sample("kr_serve_inter_token_latency_seconds_sum", **labels)
    assert 0 < gaps <= (completed["timestamp"] - started["timestamp"]) / 1000


def test_a_path_that_is_not_a_model_gets_one_answer_whatever_it_holds(
    recorder: Recorder, tmp_path: Path, demo_model: Path
) -> None:
    # An error event every reader sees must not tell whether a directory exists on a worker, nor
    # what it holds; and no code from a model directory is ever imported.
    import shutil

    secrets = tmp_path / "ssh"
    secrets.mkdir()
    (secrets / "id_ed25519").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text('{"model_type": "llama"}')
    with_code = tmp_path / "with-code"
    shutil.copytree(demo_model, with_code)
    marker = tmp_path / "imported"
    (with_code / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((with_code / "config.json").read_text())
    (with_code / "config.json").write_text(json.dumps({**config, "model_file": "evil.py"}))
    messages = set()
    for path in (tmp_path / "missing", secrets, no_weights, with_code, secrets / "id_ed25519"):
        request = GenerationRequest(model=str(path), prompt="a", max_tokens=2)
        with pytest.raises(EngineError) as info:
            recorder.engine.generate(request)
        assert info.value.code == "ModelNotFound"
        messages.add(info.value.message.replace(str(path), "<path>"))
    assert len(messages) == 1, messages
    assert not marker.exists()
    errors = [
        e["payload"]["error"].replace(e["payload"].get("model", ""), "<path>")
        for e in recorder.events("error")
    ]
    assert len(set(errors)) == 1


def _heartbeats(recorder: Recorder) -> list[dict[str, Any]]:
    return [
        s for s in recorder.events("runtimeStatus") if (s["payload"].get("metadata") or {}).get("heartbeat")
    ]


def _wait_for(condition: Any, deadline_s: float = 10.0) -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < deadline, "not within the deadline"
        time.sleep(0.01)
