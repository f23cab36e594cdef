from __future__ import annotations

from django.db import models

from events.schemas import EVENT_TYPES

MODEL_COLUMN_LENGTH = 200


class Event(models.Model):
    """One stored event: the envelope of SPEC 3.2, its payload kept as sent.

    ``model`` is copied out of the payload (cut to 200 characters) so the list
    can be filtered on an indexed column; the payload keeps the whole name.
    """

    id = models.UUIDField(primary_key=True, help_text="Set by the producer; the idempotency key.")
    type = models.CharField(max_length=32, choices=[(t, t) for t in EVENT_TYPES])
    timestamp = models.BigIntegerField(help_text="When it happened, epoch milliseconds.")
    source = models.CharField(max_length=200)
    generation_id = models.UUIDField(null=True, blank=True)
    seq = models.BigIntegerField()
    model = models.CharField(max_length=MODEL_COLUMN_LENGTH, blank=True, default="")
    payload = models.JSONField()
    ingested_at = models.DateTimeField()

    class Meta:
        ordering = ["-timestamp", "-seq"]
        indexes = [
            models.Index(fields=["-timestamp"], name="event_time"),
            models.Index(fields=["type", "-timestamp"], name="event_type_time"),
            models.Index(fields=["model", "-timestamp"], name="event_model_time"),
            models.Index(fields=["source", "-timestamp"], name="event_source_time"),
            models.Index(fields=["generation_id", "seq"], name="event_generation_seq"),
        ]

    def __str__(self) -> str:
        return f"{self.type} {self.id}"


class DeadLetter(models.Model):
    """A stream entry the ingester could not store as an event, kept with its error."""

    stream_id = models.CharField(max_length=64, help_text="The Redis stream entry id.")
    body = models.TextField(help_text="The entry as it was on the stream (UTF-8, bad bytes replaced).")
    error = models.JSONField(help_text="The error object (SPEC 3.3).")
    received_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-received_at"]

    def __str__(self) -> str:
        return f"Dead letter {self.stream_id}"
