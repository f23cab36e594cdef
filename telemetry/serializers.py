"""The telemetry config over the API, as DRF serializers: fields, ranges, patterns and messages
built from the one declaration in ``mlxserve.contract.telemetry`` (through
``mlxserve.contract.rules``), so the browsable API and the OpenAPI schema show them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.core.validators import RegexValidator
from rest_framework import serializers

from mlxserve.contract.rules import FieldRules, struct_rules
from mlxserve.contract.telemetry import TelemetryConfigSchema, telemetry_config_validate
from mlxserve.contract.validation import Issue, ValidationFailed
from mlxserve.web.api import drf_validation_error
from telemetry.models import TelemetryConfigChange

# DRF's error codes as the contract's issue codes.
_ISSUE_CODES = {
    "required": "required",
    "null": "invalid_type",
    "invalid": "invalid_type",
    "blank": "too_small",
    "min_length": "too_small",
    "max_length": "too_big",
    "min_value": "too_small",
    "max_value": "too_big",
    "invalid_string": "invalid_string",
}


class StrictBooleanField(serializers.BooleanField):
    """``true`` or ``false``: DRF's would take ``"yes"`` or ``1``; the contract does not."""

    def to_internal_value(self, data: Any) -> bool:
        if not isinstance(data, bool):
            self.fail("invalid", input=data)
        return data


class StrictIntegerField(serializers.IntegerField):
    """A JSON integer: DRF's would take ``"9464"`` or ``9464.0``; the contract does not."""

    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return int(data)


class StrictCharField(serializers.CharField):
    """A JSON string, kept as sent (no trimming)."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return str(super().to_internal_value(data))


def _field(rules: FieldRules) -> serializers.Field:
    type_rule = rules.rule("type")
    messages: dict[str, Any] = {"required": "Required", "null": type_rule.message if type_rule else "Invalid"}
    if type_rule:
        messages["invalid"] = type_rule.message
    common: dict[str, Any] = {"required": rules.required}
    if rules.name != rules.wire_name:
        common["source"] = rules.name
    if not rules.required:
        common["default"] = rules.default
    if rules.kind == "boolean":
        return StrictBooleanField(error_messages=messages, **common)
    if rules.kind.startswith("integer"):
        ge, le = rules.rule("ge"), rules.rule("le")
        if ge:
            messages["min_value"] = ge.message
        if le:
            messages["max_value"] = le.message
        bounds: dict[str, Any] = {
            "min_value": ge.bound if ge else None,
            "max_value": le.bound if le else None,
        }
        return StrictIntegerField(error_messages=messages, **bounds, **common)
    if rules.kind == "string":
        shortest, longest, pattern = rules.rule("min_length"), rules.rule("max_length"), rules.rule("pattern")
        if shortest:
            messages["min_length"] = messages["blank"] = shortest.message
        if longest:
            messages["max_length"] = longest.message
        lengths: dict[str, Any] = {
            "min_length": shortest.bound if shortest else None,
            "max_length": longest.bound if longest else None,
        }
        return StrictCharField(
            **lengths,
            allow_blank=shortest is None,
            trim_whitespace=False,
            validators=[RegexValidator(pattern.bound, pattern.message, code="invalid_string")]
            if pattern
            else [],
            error_messages=messages,
            **common,
        )
    raise TypeError(f"No serializer field for {rules.kind}")  # pragma: no cover - a new kind of field


def _issues(detail: Any, path: list[str | int]) -> list[Issue]:
    if isinstance(detail, Mapping):
        return [i for key, value in detail.items() for i in _issues(value, [*path, key])]
    if isinstance(detail, list):
        return [i for item in detail for i in _issues(item, path)]
    return [Issue(path, str(detail), _ISSUE_CODES.get(getattr(detail, "code", ""), "invalid"))]


class TelemetryConfigSerializer(serializers.Serializer):  # type: ignore[type-arg]
    """A whole config in its wire form; valid, it is a ``TelemetryConfigSchema``. Refusals are
    DRF's ``ValidationError`` holding the contract's issues (each path, message and code)."""

    def get_fields(self) -> dict[str, serializers.Field]:
        return {rules.wire_name: _field(rules) for rules in struct_rules(TelemetryConfigSchema)}

    def to_internal_value(self, data: Any) -> Any:
        # DRF's contract is kept (``is_valid()`` False with ``.errors``, ``raise_exception=True``
        # raising its ValidationError); the exception handler answers with the same error object
        # as every other endpoint's.
        try:
            return self._validated(data)
        except ValidationFailed as failure:
            raise drf_validation_error(failure) from None

    def _validated(self, data: Any) -> TelemetryConfigSchema:
        if not isinstance(data, Mapping):
            raise ValidationFailed([Issue([], "Must be an object", "invalid_type")])
        issues: list[Issue] = []
        try:
            super().to_internal_value(data)
        except serializers.ValidationError as exc:
            issues += _issues(exc.detail, [])
        issues += [
            Issue([key], f"Unknown field '{key}'", "unknown_field") for key in data if key not in self.fields
        ]
        if issues:
            raise ValidationFailed(issues)
        # The declaration has the last word (a rule no DRF field holds would be caught here).
        return telemetry_config_validate(dict(data))

    def to_representation(self, instance: Any) -> dict[str, Any]:
        schema = instance if isinstance(instance, TelemetryConfigSchema) else instance.to_schema()
        return schema.to_wire()


class TelemetryConfigChangeSerializer(serializers.ModelSerializer[TelemetryConfigChange]):
    changedBy = serializers.CharField(source="changed_by_username")
    changedAt = serializers.DateTimeField(source="changed_at")

    class Meta:
        model = TelemetryConfigChange
        fields = ["version", "config", "changes", "changedBy", "via", "changedAt"]
