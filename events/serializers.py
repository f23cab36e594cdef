from __future__ import annotations

from rest_framework import serializers

from events.models import DeadLetter, Event


class EventSerializer(serializers.ModelSerializer[Event]):
    """A stored event: the envelope as it was sent, plus when it was stored."""

    generationId = serializers.UUIDField(source="generation_id", allow_null=True)
    ingestedAt = serializers.DateTimeField(source="ingested_at")

    class Meta:
        model = Event
        fields = ["id", "type", "timestamp", "source", "generationId", "seq", "payload", "ingestedAt"]
        read_only_fields = fields


class DeadLetterSerializer(serializers.ModelSerializer[DeadLetter]):
    """What the ingester could not store, and why; the body stays in the admin."""

    streamId = serializers.CharField(source="stream_id")
    eventId = serializers.UUIDField(source="event_id", allow_null=True)
    receivedAt = serializers.DateTimeField(source="received_at")
    replayedAt = serializers.DateTimeField(source="replayed_at", allow_null=True)

    class Meta:
        model = DeadLetter
        fields = ["id", "streamId", "eventId", "error", "receivedAt", "replayedAt"]
        read_only_fields = fields
