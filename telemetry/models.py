from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.validators import (
    MaxLengthValidator,
    MaxValueValidator,
    MinLengthValidator,
    MinValueValidator,
    RegexValidator,
)
from django.db import models

from mlxserve.contract.rules import struct_rules
from mlxserve.contract.telemetry import (
    DEFAULT_EXPORT_INTERVAL_MS,
    DEFAULT_PROMETHEUS_PORT,
    DEFAULT_SERVICE_NAME,
    TelemetryConfigSchema,
)
from mlxserve.web.models import SingletonModel


def _declared(field: str) -> dict[str, Any]:
    """The model field's validators (and its blank message) from the contract's declaration, so
    ``full_clean()`` refuses a range, length or pattern as the API does, with its message."""
    rules = next(r for r in struct_rules(TelemetryConfigSchema) if r.name == field)
    makers: dict[str, Any] = {
        "min_length": MinLengthValidator,
        "max_length": MaxLengthValidator,
        "ge": MinValueValidator,
        "le": MaxValueValidator,
    }
    found: list[Any] = []
    extra: dict[str, Any] = {}
    for rule in rules.rules:
        if rule.constraint in makers:
            found.append(makers[rule.constraint](rule.bound, rule.message))
        elif rule.constraint == "pattern":
            found.append(RegexValidator(rule.bound, rule.message, code=rule.issue_code))
        if rule.constraint == "min_length":
            extra["error_messages"] = {"blank": rule.message}
    return {"validators": found, **extra}


class TelemetryConfig(SingletonModel):
    """The fleet's one telemetry config (a single row, pk 1).

    Its rules live in ``mlxserve.contract.telemetry``; writes go through
    ``telemetry.services`` so history and publishing never get skipped.
    """

    enabled = models.BooleanField(default=False)
    service_name = models.CharField(max_length=100, default=DEFAULT_SERVICE_NAME, **_declared("service_name"))
    prometheus_port = models.PositiveIntegerField(
        default=DEFAULT_PROMETHEUS_PORT, **_declared("prometheus_port")
    )
    export_interval_ms = models.PositiveIntegerField(
        default=DEFAULT_EXPORT_INTERVAL_MS, **_declared("export_interval_ms")
    )
    # Bumped on every change; workers use it to ignore stale or repeated pushes.
    version = models.PositiveIntegerField(default=0, editable=False)
    updated_at = models.DateTimeField(auto_now=True)
    updated_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta(SingletonModel.Meta):
        verbose_name = "telemetry config"
        verbose_name_plural = "telemetry config"

    def __str__(self) -> str:
        return f"Telemetry config (version {self.version})"

    def to_schema(self) -> TelemetryConfigSchema:
        return TelemetryConfigSchema(
            enabled=self.enabled,
            service_name=self.service_name,
            prometheus_port=self.prometheus_port,
            export_interval_ms=self.export_interval_ms,
        )


class TelemetryConfigChange(models.Model):
    """Who changed the config, when, through what, and from what to what."""

    version = models.PositiveIntegerField()
    config = models.JSONField(help_text="The whole config after the change, in wire names.")
    changes = models.JSONField(help_text="Changed wire fields: {field: [old, new]}.")
    changed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # Kept as text too, so the history survives the user's deletion.
    changed_by_username = models.CharField(max_length=150, blank=True)
    via = models.CharField(max_length=20, help_text="admin or api")
    changed_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-version"]
        verbose_name = "telemetry config change"

    def __str__(self) -> str:
        return f"Version {self.version} by {self.changed_by_username or 'unknown'}"
