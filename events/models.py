from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import ClassVar

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, RegexValidator
from django.db import models

from mlxserve.contract.events import EVENT_TYPES
from mlxserve.web.models import SingletonModel

MODEL_COLUMN_LENGTH = 200
MAX_KEEP_DAYS = 36_500


class EventColumns(models.Model):
    """What every stored event has, as the API shows it: the envelope, the payload, when stored."""

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
        abstract = True


class EventRecord(EventColumns):
    """One stored event as sent: the envelope, its payload as JSON (every type but the compact
    token events, which are ``TokenEvent`` rows).

    ``model`` is copied out of the payload (cut to 200 characters) so the list
    can be filtered on an indexed column; the payload keeps the whole name.
    """

    class Meta:
        db_table = "events_event"
        ordering = ["-timestamp", "-seq"]
        # Each filter of the event list has an index in the list's own order (newest first,
        # then seq): the first page is the index's first rows, whatever the table holds and
        # however old the matching events are, with no sort and no walk filtered row by row.
        indexes = [
            models.Index(fields=["-timestamp", "-seq"], name="event_time_seq"),
            models.Index(fields=["type", "-timestamp", "-seq"], name="event_type_time_seq"),
            models.Index(fields=["model", "-timestamp", "-seq"], name="event_model_time_seq"),
            models.Index(fields=["source", "-timestamp", "-seq"], name="event_source_time_seq"),
            models.Index(fields=["generation_id", "-timestamp", "-seq"], name="event_generation_time_seq"),
        ]

    def __str__(self) -> str:
        return f"{self.type} {self.id}"


class Channel(models.Model):
    """A source and a model tokens came from: a token event row names its pair by this id
    instead of repeating both names (a fleet has a few hundred pairs, not millions)."""

    id = models.AutoField(primary_key=True)  # 32-bit: the token rows' column
    source = models.CharField(max_length=200)
    model = models.CharField(max_length=MODEL_COLUMN_LENGTH)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["source", "model"], name="channel_key")]

    def __str__(self) -> str:
        return f"{self.source} {self.model}"


class TokenEvent(models.Model):
    """A ``tokenGenerated`` event in typed columns (no JSON): what nearly every event stored is.

    The payload (``model``, ``token``, ``logprob``) is written out again, byte for byte as the
    JSON form would have stored it, when the event is read. A token event this shape cannot
    hold (metadata, a sequence number past 2^31, a model name past 200 characters) is an
    ``EventRecord`` instead. ``id`` is not unique here: a redelivery is recognised by its
    ``(id, timestamp)`` before it is written (``events.storage``).
    """

    id = models.UUIDField(primary_key=True)
    generation_id = models.UUIDField()
    timestamp = models.BigIntegerField()
    seq = models.IntegerField()
    channel = models.ForeignKey(Channel, on_delete=models.PROTECT, db_constraint=False, related_name="+")
    token = models.TextField()
    logprob = models.FloatField(null=True)
    ingested_at = models.DateTimeField()

    class Meta:
        # Made by migration 0019 in SQL: partitioned on PostgreSQL, its indexes not Django's.
        db_table = "events_token"

    def __str__(self) -> str:
        return f"tokenGenerated {self.id}"


class Event(EventColumns):
    """Every stored event, whichever table holds it: a read-only view (``events_history``),
    ``EventRecord`` rows and ``TokenEvent`` rows together, with the token events' payloads
    built as JSON values. The API writes its answers from the tables' own columns
    (``events.history``); the admin and ad-hoc queries read this.
    """

    # Set on token event rows only: the payload's token and log-probability as stored.
    token = models.TextField(null=True)
    logprob = models.FloatField(null=True)

    class Meta:
        managed = False
        db_table = "events_history"
        ordering = ["-timestamp", "-seq"]

    def __str__(self) -> str:
        return f"{self.type} {self.id}"


class DeadLetter(models.Model):
    """A stream entry the ingester could not store as an event, kept with its error."""

    stream_id = models.CharField(
        max_length=128,
        unique=True,
        help_text="The Redis stream entry id (<host>/ on a host's own stream; #n: the n-th envelope of a "
        "batch entry; @i: its i-th field). "
        "One letter per item of an entry, however often the entry is delivered.",
    )
    event_id = models.UUIDField(
        null=True, blank=True, db_index=True, help_text="The envelope's id, where one could be read."
    )
    body = models.TextField(help_text="The entry as it was on the stream (UTF-8, bad bytes replaced).")
    error = models.JSONField(help_text="The error object.")
    received_at = models.DateTimeField(auto_now_add=True, db_index=True)
    replayed_at = models.DateTimeField(
        null=True, blank=True, help_text="When a replay stored it as an event."
    )

    class Meta:
        ordering = ["-received_at"]

    def __str__(self) -> str:
        return f"Dead letter {self.stream_id}"


model_name_validator = RegexValidator(
    r"\A[A-Za-z0-9][A-Za-z0-9._:@/+-]*\Z",
    "A model name is letters, digits and . _ : @ / + - (starting with a letter or digit)",
    code="invalid_model_name",
)


def model_path_validator(value: str) -> None:
    """An absolute directory path with no ``..`` in it, or a Hugging Face repo id."""
    if _REPO_ID.fullmatch(value):
        return
    parts = PurePosixPath(value).parts
    if not value.startswith("/") or ".." in parts or any(ord(c) < 32 for c in value):
        raise ValidationError(
            "A model path is an absolute directory path (no '..') or a Hugging Face repo id (org/name)",
            code="invalid_model_path",
        )


_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


class WorkerHost(models.Model):
    """A worker host with an event stream of its own (``<MLXSERVE_EVENTS_STREAM>:<name>``) and a Redis
    user that may append to that stream alone (``python manage.py create_worker_host``). What its
    credentials can do to the events stays on that stream: the events on it must carry the host's
    name as their source (``<name>`` or ``<name>/...``)."""

    name = models.CharField(
        max_length=48,
        unique=True,
        validators=[
            RegexValidator(
                r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,47}\Z",
                "A host name is letters, digits and . _ - (starting with a letter or digit), at most 48",
                code="invalid_host",
            )
        ],
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class RegisteredModel(models.Model):
    """A name for a model, so requests can say ``qwen-0.5b`` instead of a path."""

    name = models.CharField(max_length=200, unique=True, validators=[model_name_validator])
    path = models.CharField(
        max_length=1000,
        validators=[model_path_validator],
        help_text="An absolute path to an MLX model directory on the workers (a config.json and "
        ".safetensors weights; no model code is ever run from it), or a Hugging Face repo id "
        "(org/name) already in the workers' local cache. Checked by each worker before it loads it.",
    )
    description = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Generation(models.Model):
    """A generation someone asked for. What happened to it is told by its events."""

    id = models.UUIDField(primary_key=True)
    model = models.CharField(max_length=1000, help_text="As requested: a registry name, a path or a repo id.")
    model_path = models.CharField(max_length=1000, blank=True, help_text="Resolved from the registry.")
    prompt = models.JSONField()
    max_tokens = models.PositiveIntegerField()
    options = models.JSONField(default=dict, help_text="Sampling: temperature, topP, seed.")
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"Generation {self.id}"


class Worker(models.Model):
    """A worker as its events describe it; kept up to date by the ingester."""

    source = models.CharField(max_length=200, unique=True)
    status = models.CharField(max_length=16, blank=True)
    # 64-bit, as the contract's integers: whatever a runtimeStatus may say, the row holds it.
    models_loaded = models.PositiveBigIntegerField(default=0)
    active_tasks = models.PositiveBigIntegerField(default=0)
    last_status_at = models.BigIntegerField(default=0, help_text="Epoch ms of its last runtimeStatus.")
    last_heard_at = models.BigIntegerField(default=0, help_text="Epoch ms of its last event of any type.")
    last_error_at = models.BigIntegerField(default=0, help_text="Epoch ms of its last error event.")
    last_error = models.CharField(max_length=500, blank=True, help_text="That error's code and message, cut.")
    config_version = models.BigIntegerField(
        null=True, blank=True, help_text="The telemetry config version its last runtimeStatus said it runs."
    )
    first_seen_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["source"]

    def __str__(self) -> str:
        return self.source


class RetentionPolicy(models.Model):
    """How long events of one type are kept; types without a policy are kept for good."""

    event_type = models.CharField(max_length=32, unique=True, choices=[(t, t) for t in EVENT_TYPES])
    keep_days = models.PositiveIntegerField(
        # A bound the ingester can apply: past it, "now minus keep_days" leaves the calendar
        # (OverflowError), and a century is as good as for ever.
        validators=[MaxValueValidator(MAX_KEEP_DAYS)],
        help_text=f"Events older than this many days are deleted (at most {MAX_KEEP_DAYS:,}: a century).",
    )

    class Meta:
        ordering = ["event_type"]
        verbose_name_plural = "retention policies"

    def __str__(self) -> str:
        return f"{self.event_type}: {self.keep_days} days"


class PromptPolicy(SingletonModel):
    """How ``generationStarted`` prompts (and queued generations' prompts) are kept at rest.

    One row (pk 1), edited in the admin, applied by the ingester as it stores
    events and by ``POST /api/generations/`` as it records a request.
    """

    KEEP, TRUNCATE, HASH, DROP = "keep", "truncate", "hash", "drop"
    MODES = [
        (KEEP, "Keep the prompt as sent"),
        (TRUNCATE, "Keep the first N characters"),
        (HASH, "Keep only a keyed SHA-256 hash and the length"),
        (DROP, "Drop it (an empty string is stored)"),
    ]

    mode = models.CharField(max_length=16, choices=MODES, default=HASH)
    truncate_chars = models.PositiveIntegerField(
        default=200, help_text="With 'truncate': how many characters of the prompt are kept."
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta(SingletonModel.Meta):
        verbose_name = "prompt privacy policy"
        verbose_name_plural = "prompt privacy policy"

    def __str__(self) -> str:
        return f"Prompts: {self.get_mode_display()}"


class FleetCounter(models.Model):
    """A running total derived from stored events, for the control plane's ``/metrics``.

    The ingester adds to these in the same transaction that stores the events
    (only events stored for the first time count), so every web process reads
    the same figures at scrape and a restart loses nothing. Histogram buckets
    are rows too: ``name`` ends in ``_bucket`` and ``labels`` carries ``le``.
    """

    name = models.CharField(max_length=100)
    # Text, not a bounded varchar: label values are cut to a number of characters, and
    # their JSON escapes can make the text several times longer than that.
    labels = models.TextField(help_text="Sorted label pairs as JSON.")
    value = models.FloatField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["name", "labels"], name="fleet_counter_key")]

    def __str__(self) -> str:
        return f"{self.name}{self.labels} {self.value}"


class FleetLabelValue(models.Model):
    """A label value that has its own series in one fleet metric.

    Label values come from producers' payloads, so they are admitted: registered
    model names always, others up to ``MLXSERVE_METRIC_LABEL_LIMIT`` per label of
    a metric; later ones are counted under the overflow value instead. A value
    unseen for longer than the retention period is folded into the overflow and
    its row deleted, freeing its place.
    """

    metric = models.CharField(max_length=100, help_text="A metric family, e.g. mlxserve_fleet_tokens_total.")
    label = models.CharField(max_length=32)
    # Label values are cut to 120 characters before they get here.
    value = models.CharField(max_length=200)
    last_seen = models.DateTimeField(help_text="Refreshed at most hourly while events carry the value.")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["metric", "label", "value"], name="fleet_label_value_key")
        ]
        indexes = [models.Index(fields=["last_seen"], name="fleet_label_last_seen")]

    def __str__(self) -> str:
        return f"{self.metric}{{{self.label}={self.value!r}}}"


class RollupColumns(models.Model):
    """A count of events of one type, or of the observations in one histogram bucket, for one
    model over one day, hour or minute (``StatsDay``, ``StatsRollup``, ``StatsMinute``).

    The ingester adds to these in the same transaction that stores the events (only
    events stored for the first time count), so they are exact under redelivery, like
    the fleet counters. ``series`` is ``events:<type>`` (``bucket`` 0) or a histogram:
    ``ttftMs``, ``tokensPerSecond``, ``durationMs`` (``bucket`` from ``events.rollups``).
    """

    model = models.CharField(max_length=MODEL_COLUMN_LENGTH, blank=True, default="")
    series = models.CharField(max_length=48)
    bucket = models.SmallIntegerField(default=0)
    count = models.BigIntegerField(default=0)

    unit: ClassVar[str]  # the column holding the unit's start: "day", "hour" or "minute"

    class Meta:
        abstract = True

    def __str__(self) -> str:
        return f"{getattr(self, self.unit)} {self.model} {self.series}[{self.bucket}] {self.count}"


class StatsRollup(RollupColumns):
    """One hour's tally for ``GET /api/stats/``: a window's whole hours are read from here."""

    hour = models.BigIntegerField(help_text="The hour's start, epoch milliseconds.")
    unit = "hour"

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["hour", "model", "series", "bucket"], name="stats_rollup_key")
        ]
        indexes = [models.Index(fields=["model", "hour"], name="stats_rollup_model_hour")]


class StatsDay(RollupColumns):
    """One day's tally (UTC): a window's whole days are read from here."""

    day = models.BigIntegerField(help_text="The day's start (UTC), epoch milliseconds.")
    unit = "day"

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["day", "model", "series", "bucket"], name="stats_day_key")
        ]


class StatsMinute(RollupColumns):
    """One minute's tally: the whole minutes of a window's partial first and last hours are
    read from here, so a window reads at most half a minute of events at each end."""

    minute = models.BigIntegerField(help_text="The minute's start, epoch milliseconds.")
    unit = "minute"

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["minute", "model", "series", "bucket"], name="stats_minute_key")
        ]


class StatsCoverage(SingletonModel):
    """From which hour on the hourly rollups, and the minute and day ones, hold every stored event.
    Time before it (events stored before those rollups existed) is counted from the events
    themselves until ``rollup_events`` has built theirs."""

    covered_from = models.BigIntegerField(default=0, help_text="An hour's start, epoch milliseconds.")
    minutes_from = models.BigIntegerField(
        default=0, help_text="An hour's start, epoch milliseconds: minute and day rollups from here on."
    )

    class Meta(SingletonModel.Meta):
        verbose_name_plural = "stats coverage"

    def __str__(self) -> str:
        return f"Rollups from {self.covered_from}"


class SourceMinute(models.Model):
    """What one source did in one minute: events, tokens and errors, for the fleet views
    (tokens/s, sparklines, errors of the last hour) without counting events. Added to by
    the ingester with each batch (events stored for the first time only); kept two days."""

    minute = models.BigIntegerField(help_text="The minute's start, epoch milliseconds.")
    unit = "minute"
    source = models.CharField(max_length=200)
    events = models.BigIntegerField(default=0)
    tokens = models.BigIntegerField(default=0)
    errors = models.BigIntegerField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["source", "minute"], name="source_minute_key")]
        indexes = [models.Index(fields=["minute"], name="source_minute_minute")]

    def __str__(self) -> str:
        return f"{self.source} {self.minute}: {self.tokens} tokens"
