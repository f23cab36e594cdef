"""The contract's public API, as a Python program embedding it uses it."""

from __future__ import annotations

from typing import Any

import pytest

import mlxserve.contract as contract
from mlxserve.contract import EngineError, ValidationFailed
from tests.factories import make_envelope

VALIDATORS = {
    "modelLoaded": contract.validate_model_loaded,
    "modelUnloaded": contract.validate_model_unloaded,
    "modelInvalidated": contract.validate_model_invalidated,
    "generationStarted": contract.validate_generation_started,
    "tokenGenerated": contract.validate_token_generated,
    "generationCompleted": contract.validate_generation_completed,
    "error": contract.validate_error,
    "runtimeStatus": contract.validate_runtime_status,
}


def test_everything_in_all_is_there() -> None:
    for name in contract.__all__:
        assert hasattr(contract, name), name
    assert set(VALIDATORS) == set(contract.EVENT_TYPES)


@pytest.mark.parametrize("event_type", sorted(VALIDATORS))
def test_each_payload_validator_takes_its_payload_and_refuses_a_bad_one(event_type: str) -> None:
    payload = make_envelope(event_type)["payload"]
    validated = VALIDATORS[event_type](payload)
    assert type(validated).__name__ == {"error": "Error"}.get(
        event_type, event_type[0].upper() + event_type[1:]
    )
    with pytest.raises(EngineError) as caught:
        VALIDATORS[event_type]({**payload, "surprise": 1})
    assert caught.value.code == "InvalidParams"
    assert caught.value.as_error()["details"]["issues"][0] == {
        "path": ["surprise"],
        "message": "Unknown field 'surprise'",
        "code": "unknown_field",
    }


def test_a_payload_validator_applies_the_rules_the_envelope_applies() -> None:
    with pytest.raises(ValidationFailed) as caught:
        contract.validate_generation_completed(
            {"model": "m", "tokensGenerated": -1, "durationMs": -5, "metadata": {"x": float("inf")}}
        )
    assert [(i.path, i.message) for i in caught.value.issues] == [
        (["tokensGenerated"], "Cannot be negative"),
        (["durationMs"], "Duration cannot be negative"),
        (["metadata", "x"], "Must be a finite number"),
    ]
    deep: dict[str, object] = {}
    for _ in range(100):
        deep = {"d": deep}
    with pytest.raises(EngineError, match="Nested too deeply"):
        contract.validate_token_generated({"model": "m", "token": "t", "metadata": deep})


def test_engine_error_is_the_error_object() -> None:
    with pytest.raises(EngineError) as caught:
        contract.validate_telemetry_config({"enabled": True, "prometheusPort": 80})
    error = caught.value
    assert isinstance(error, ValidationFailed)
    assert error.as_error() == {
        "code": "InvalidParams",
        "message": "Validation error on field 'prometheusPort': Port must be at least 1024 (non-privileged)",
        "details": {
            "field": "prometheusPort",
            "issues": [
                {
                    "path": ["prometheusPort"],
                    "message": "Port must be at least 1024 (non-privileged)",
                    "code": "too_small",
                }
            ],
        },
    }
    assert (error.code, error.message, error.details) == (
        "InvalidParams",
        error.as_error()["message"],
        error.as_error()["details"],
    )
    plain = EngineError("ModelNotFound", "Model 'x' not found")
    assert plain.as_error() == {"code": "ModelNotFound", "message": "Model 'x' not found"}


def test_config_labels_and_events_validate_as_documented() -> None:
    config = contract.validate_telemetry_config({"enabled": True})
    assert isinstance(config, contract.TelemetryConfig)
    assert (config.service_name, config.prometheus_port, config.export_interval_ms) == (
        "kr-serve-mlx",
        9464,
        60000,
    )
    assert contract.validate_metric_labels({"a": 1.5, "b": True, "c": 9464}) == {
        "a": "1.5",
        "b": "true",
        "c": "9464",
    }
    envelope: Any = contract.validate_event(make_envelope("tokenGenerated"), now_ms=1_764_115_200_000)
    assert envelope.type == "tokenGenerated" and envelope.payload.token == "Hello"
    with pytest.raises(EngineError, match="Timestamp is in the future"):
        contract.validate_event(make_envelope("tokenGenerated"), now_ms=1_764_115_200_000 - 3_600_000)
    with pytest.raises(EngineError, match="Type must be one of"):
        contract.validate_event({**make_envelope(), "type": "nope"})
