from __future__ import annotations

from rest_framework import serializers

from events.models import Event


class EventSerializer(serializers.ModelSerializer[Event]):
    """A stored event: the envelope as it was sent, plus when it was stored."""

    generationId = serializers.UUIDField(source="generation_id", allow_null=True)
    ingestedAt = serializers.DateTimeField(source="ingested_at")

    class Meta:
        model = Event
        fields = ["id", "type", "timestamp", "source", "generationId", "seq", "payload", "ingestedAt"]
        read_only_fields = fields
