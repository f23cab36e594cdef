from __future__ import annotations

import re
from typing import Any

from django import forms

from mlxserve.contract.rules import field_help, struct_rules
from mlxserve.contract.telemetry import (
    FIELD_TO_WIRE,
    NOT_AN_INTEGER,
    TelemetryConfigSchema,
    telemetry_config_validate,
)
from mlxserve.contract.validation import ValidationFailed
from telemetry.models import TelemetryConfig

_INTEGER_TEXT = re.compile(r"\A-?[0-9]+\Z")


class StrictIntegerField(forms.CharField):
    """Digits only. Django's IntegerField would take "9464.0"; the contract does not."""

    widget = forms.NumberInput

    def to_python(self, value: Any) -> int | None:  # type: ignore[override]
        text = super().to_python(value)
        if text is None or text in self.empty_values:
            return None
        if not _INTEGER_TEXT.match(text):
            raise forms.ValidationError(NOT_AN_INTEGER, code="invalid_type")
        return int(text)


class TelemetryConfigForm(forms.ModelForm):
    """The admin form. Its rules and messages are the API's: both call ``telemetry_config_validate``."""

    # strip=False: "worker " must be refused, as the API refuses it, not quietly trimmed.
    service_name = forms.CharField(label="Service name", required=False, strip=False)
    prometheus_port = StrictIntegerField(label="Prometheus port")
    export_interval_ms = StrictIntegerField(label="Export interval (ms)")

    class Meta:
        model = TelemetryConfig
        fields = list(FIELD_TO_WIRE)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Each field's meaning and range, from the one declaration (the contract's struct).
        for rules in struct_rules(TelemetryConfigSchema):
            field = self.fields.get(rules.name)
            if field is not None:
                field.help_text = field_help(rules)

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        if any(name in self.errors for name in FIELD_TO_WIRE):
            return cleaned
        wire = {wire_name: cleaned.get(name) for name, wire_name in FIELD_TO_WIRE.items()}
        if wire["serviceName"] is None:
            wire["serviceName"] = ""
        try:
            self.schema = telemetry_config_validate(wire)
        except ValidationFailed as exc:
            wire_to_field = {w: f for f, w in FIELD_TO_WIRE.items()}
            for issue in exc.issues:
                field = wire_to_field.get(str(issue.path[0])) if issue.path else None
                self.add_error(field, forms.ValidationError(issue.message, code=issue.code))
        return cleaned
