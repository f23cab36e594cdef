"""The telemetry config and metric labels, each rule declared once.

The admin form, the REST API and the workers all validate through
``telemetry_config_validate``; nothing else carries a copy of a range, a
pattern or a message.
"""

from __future__ import annotations

import decimal
import logging
import math
from collections.abc import Mapping
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from mlxserve.contract.validation import Issue, ValidationFailed, messages, validate

logger = logging.getLogger(__name__)

DEFAULT_SERVICE_NAME = "kr-serve-mlx"
DEFAULT_PROMETHEUS_PORT = 9464
DEFAULT_EXPORT_INTERVAL_MS = 60000

# \A and \Z, not ^ and $: "$" also matches before a trailing newline, which
# would let "worker\n" through. The class is spelled out so it stays ASCII.
SERVICE_NAME_PATTERN = r"\A[A-Za-z0-9_-]+\Z"

NOT_AN_INTEGER = "Must be an integer"

ServiceName = Annotated[
    str,
    Meta(
        description=(
            "The service.name workers give their metrics and spans (OTLP resource, Prometheus target info)."
        ),
        min_length=1,
        max_length=100,
        pattern=SERVICE_NAME_PATTERN,
        extra=messages(
            min_length="Service name cannot be empty",
            max_length="Service name cannot exceed 100 characters",
            pattern="Service name must be alphanumeric with hyphens/underscores",
        ),
    ),
]
PrometheusPort = Annotated[
    int,
    Meta(
        description=(
            "The port each worker serves its Prometheus metrics on (/metrics); a change moves the exporter."
        ),
        ge=1024,
        le=65535,
        extra=messages(
            type=NOT_AN_INTEGER,
            ge="Port must be at least 1024 (non-privileged)",
            le="Port cannot exceed 65535",
        ),
    ),
]
ExportIntervalMs = Annotated[
    int,
    Meta(
        description=(
            "How often workers push OTLP metrics and send a heartbeat (runtimeStatus); a worker silent"
            " for three intervals is stale."
        ),
        ge=1000,
        le=600000,
        extra=messages(
            type=NOT_AN_INTEGER,
            ge="Export interval must be at least 1 second",
            le="Export interval cannot exceed 10 minutes",
        ),
    ),
]


Enabled = Annotated[
    bool, Meta(description="Whether workers export metrics (Prometheus, and OTLP when configured) at all.")
]


class TelemetryConfigSchema(msgspec.Struct, forbid_unknown_fields=True, rename="camel", frozen=True):
    enabled: Enabled
    service_name: ServiceName = DEFAULT_SERVICE_NAME
    prometheus_port: PrometheusPort = DEFAULT_PROMETHEUS_PORT
    export_interval_ms: ExportIntervalMs = DEFAULT_EXPORT_INTERVAL_MS

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = msgspec.to_builtins(self)
        return wire


# Wire name -> Django field name, derived from the declaration.
WIRE_TO_FIELD: dict[str, str] = {f.encode_name: f.name for f in msgspec.structs.fields(TelemetryConfigSchema)}
FIELD_TO_WIRE: dict[str, str] = {v: k for k, v in WIRE_TO_FIELD.items()}


def telemetry_config_validate(data: Any) -> TelemetryConfigSchema:
    """A whole config (PUT semantics): missing optional fields take their defaults."""
    return validate(data, TelemetryConfigSchema)


def telemetry_config_merge(current: TelemetryConfigSchema, patch: Any) -> TelemetryConfigSchema:
    """PATCH semantics: the fields given replace the current ones, then the whole is validated."""
    if not isinstance(patch, dict):
        raise ValidationFailed([Issue([], "Must be an object", "invalid_type")])
    return telemetry_config_validate({**current.to_wire(), **patch})


# -- metric labels ---------------------------------------------------------------


def _js_number_string(value: float) -> str:
    """``String(value)`` as JavaScript writes it (ECMA-262 Number::toString)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    if value == 0:
        return "0"
    sign = "-" if value < 0 else ""
    # repr gives the shortest round-tripping digits, as JavaScript does.
    _, digit_tuple, exponent = decimal.Decimal(repr(abs(value))).as_tuple()
    assert isinstance(exponent, int)
    digits = "".join(map(str, digit_tuple)).lstrip("0")
    stripped = digits.rstrip("0")
    exponent += len(digits) - len(stripped)
    digits = stripped
    k = len(digits)
    point = k + exponent  # value == 0.digits * 10**point
    if k <= point <= 21:
        return sign + digits + "0" * (point - k)
    if 0 < point <= 21:
        return sign + digits[:point] + "." + digits[point:]
    if -6 < point <= 0:
        return sign + "0." + "0" * (-point) + digits
    e = point - 1
    head = digits[0] + ("." + digits[1:] if k > 1 else "")
    return f"{sign}{head}e{'+' if e >= 0 else '-'}{abs(e)}"


def metric_label_value(value: Any) -> str | None:
    """The label value as a string, as JavaScript would convert it, or None if not allowed."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _js_number_string(value)
    return None


# Histogram buckets (seconds) of the figures both the workers and the control plane export,
# so a worker's histogram and the fleet's can be read side by side.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Time to first token and between tokens: from 1 ms, for fast small models."""
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
"""A whole generation."""

# Past MLXSERVE_METRIC_LABEL_LIMIT values of a label of one metric, later values are counted
# under this one (control plane and workers alike), so totals still add up.
OVERFLOW_LABEL_VALUE = "__overflow__"
DEFAULT_METRIC_LABEL_LIMIT = 100
# Labels whose values come from payloads and requests (a model name, an error code, a reason):
# the ones bounded by the limit. Every label value is cut to LABEL_VALUE_LENGTH characters.
BOUNDED_LABELS = frozenset({"model", "code", "reason", "quantization"})
LABEL_VALUE_LENGTH = 120


def metric_labels_validate(labels: Any) -> dict[str, str]:
    """Validate a metric label set and return it with string values."""
    if not isinstance(labels, Mapping):
        raise ValidationFailed([Issue([], "Labels must be an object", "invalid_type")])
    issues: list[Issue] = []
    result: dict[str, str] = {}
    for key, value in labels.items():
        if not isinstance(key, str):
            issues.append(Issue([str(key)], "Label key must be a string", "invalid_type"))
            continue
        if key == "":
            issues.append(Issue([key], "Label key cannot be empty", "too_small"))
            continue
        text = metric_label_value(value)
        if text is None:
            issues.append(Issue([key], "Label value must be a string, number or boolean", "invalid_type"))
            continue
        result[key] = text
    if issues:
        raise ValidationFailed(issues)
    return result


# -- the config on its way to workers ---------------------------------------------------------
# The current config lives under one Redis key (a worker that starts late reads it), and every
# change is also published on ``<key>:changes`` (running workers hear of it at once).


class PublishedConfig(msgspec.Struct, frozen=True):
    version: int
    config: dict[str, Any]


def channel_for(key: str) -> str:
    return f"{key}:changes"


def config_parse(raw: bytes | None) -> tuple[int, TelemetryConfigSchema] | None:
    if raw is None:
        return None
    try:
        published = msgspec.json.decode(raw, type=PublishedConfig)
        return published.version, telemetry_config_validate(published.config)
    except Exception:  # a foreign or corrupt value must not take a worker down
        logger.exception("Ignoring an invalid telemetry config in Redis: %r", raw[:200])
        return None
