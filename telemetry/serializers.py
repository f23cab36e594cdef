from __future__ import annotations

from rest_framework import serializers

from telemetry.models import TelemetryConfigChange


class TelemetryConfigChangeSerializer(serializers.ModelSerializer[TelemetryConfigChange]):
    changedBy = serializers.CharField(source="changed_by_username")
    changedAt = serializers.DateTimeField(source="changed_at")

    class Meta:
        model = TelemetryConfigChange
        fields = ["version", "config", "changes", "changedBy", "via", "changedAt"]
