"""The wire contract, shared by the control plane and the workers: loads neither Django nor Celery.

- ``validation``: the error object (``ValidationFailed``, ``EngineError``), strict JSON, struct validation.
- ``telemetry``: the telemetry config, metric labels, and how the config reaches workers through Redis.
- ``events``: the eight payloads and the envelope.
- ``stream``: the Redis stream entry format (single envelopes and batches).
- ``control``: commands to workers on the control channel.
"""

from __future__ import annotations

from typing import Any

from mlxserve.contract.events import (
    EVENT_TYPES,
    Envelope,
    Error,
    GenerationCompleted,
    GenerationStarted,
    ModelInvalidated,
    ModelLoaded,
    ModelUnloaded,
    RuntimeStatus,
    TokenGenerated,
    envelope_validate,
    payload_validate,
)
from mlxserve.contract.telemetry import TelemetryConfigSchema as TelemetryConfig
from mlxserve.contract.telemetry import metric_labels_validate, telemetry_config_validate
from mlxserve.contract.validation import EngineError, Issue, ValidationFailed

__all__ = [
    "EVENT_TYPES",
    "EngineError",
    "Envelope",
    "Issue",
    "TelemetryConfig",
    "ValidationFailed",
    "validate_error",
    "validate_event",
    "validate_generation_completed",
    "validate_generation_started",
    "validate_metric_labels",
    "validate_model_invalidated",
    "validate_model_loaded",
    "validate_model_unloaded",
    "validate_runtime_status",
    "validate_telemetry_config",
    "validate_token_generated",
]


def validate_telemetry_config(config: Any) -> TelemetryConfig:
    """A whole telemetry config in its wire form (camelCase); missing optional fields take
    their defaults. Raises ``EngineError`` (``ValidationFailed``, code ``InvalidParams``)."""
    return telemetry_config_validate(config)


def validate_metric_labels(labels: Any) -> dict[str, str]:
    """A metric label set, its values converted to strings as JavaScript would. Raises ``EngineError``."""
    return metric_labels_validate(labels)


def validate_event(event: Any, *, now_ms: int | None = None) -> Envelope:
    """A whole envelope (``id``, ``type``, ``timestamp``, ``source``, ``generationId``, ``seq``,
    ``payload``); ``now_ms``: the receiving clock for the future-timestamp rule (read if not
    given). Raises ``EngineError`` listing every issue."""
    return envelope_validate(event, now_ms=now_ms)


def validate_model_loaded(payload: Any) -> ModelLoaded:
    """A ``modelLoaded`` payload. Raises ``EngineError``."""
    return payload_validate("modelLoaded", payload)  # type: ignore[return-value]


def validate_model_unloaded(payload: Any) -> ModelUnloaded:
    """A ``modelUnloaded`` payload. Raises ``EngineError``."""
    return payload_validate("modelUnloaded", payload)  # type: ignore[return-value]


def validate_model_invalidated(payload: Any) -> ModelInvalidated:
    """A ``modelInvalidated`` payload. Raises ``EngineError``."""
    return payload_validate("modelInvalidated", payload)  # type: ignore[return-value]


def validate_generation_started(payload: Any) -> GenerationStarted:
    """A ``generationStarted`` payload. Raises ``EngineError``."""
    return payload_validate("generationStarted", payload)  # type: ignore[return-value]


def validate_token_generated(payload: Any) -> TokenGenerated:
    """A ``tokenGenerated`` payload. Raises ``EngineError``."""
    return payload_validate("tokenGenerated", payload)  # type: ignore[return-value]


def validate_generation_completed(payload: Any) -> GenerationCompleted:
    """A ``generationCompleted`` payload. Raises ``EngineError``."""
    return payload_validate("generationCompleted", payload)  # type: ignore[return-value]


def validate_error(payload: Any) -> Error:
    """An ``error`` payload. Raises ``EngineError``."""
    return payload_validate("error", payload)  # type: ignore[return-value]


def validate_runtime_status(payload: Any) -> RuntimeStatus:
    """A ``runtimeStatus`` payload. Raises ``EngineError``."""
    return payload_validate("runtimeStatus", payload)  # type: ignore[return-value]
