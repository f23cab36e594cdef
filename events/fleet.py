"""Fleet metrics derived from stored events: running totals the control plane exports.

The ingester adds each batch's contribution in the same transaction that
stores the batch, counting only events stored for the first time, so the
figures are exact under redelivery, shared by every web process (they read
one table at scrape) and survive restarts. Retention deleting old events does
not lower a counter: Prometheus counters only go up.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta

import msgspec
from django.conf import settings
from django.db import connection, transaction
from django.db.models import Max
from django.utils import timezone

from events.models import MAX_KEEP_DAYS, FleetCounter, FleetLabelValue, RegisteredModel, RetentionPolicy
from events.rollups import FirstToken
from events.upsert import upsert_adding
from mlxserve.contract.events import (
    Envelope,
    ErrorEnvelope,
    GenerationCompletedEnvelope,
    GenerationStartedEnvelope,
    ModelInvalidatedEnvelope,
    ModelLoadedEnvelope,
    ModelUnloadedEnvelope,
    TokenGeneratedEnvelope,
)
from mlxserve.contract.generations import time_to_first_token_ms
from mlxserve.contract.telemetry import (
    BOUNDED_LABELS,
    DURATION_BUCKETS,
    LABEL_VALUE_LENGTH,
    LATENCY_BUCKETS,
    OVERFLOW_LABEL_VALUE,
)

# name -> (kind, help, label names); kind is "counter" or "histogram".
FLEET_METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "mlxserve_events_ingested_total": ("counter", "Events stored, by type", ("type",)),
    "mlxserve_fleet_tokens_total": ("counter", "Tokens generated (tokenGenerated events)", ("model",)),
    "mlxserve_fleet_generations_started_total": ("counter", "Generations started", ("model",)),
    "mlxserve_fleet_generations_completed_total": ("counter", "Generations completed", ("model",)),
    "mlxserve_fleet_errors_total": ("counter", "Error events, by code and model", ("code", "model")),
    "mlxserve_fleet_model_loads_total": ("counter", "Models loaded", ("model", "quantization")),
    "mlxserve_fleet_model_unloads_total": ("counter", "Models unloaded, by reason", ("model", "reason")),
    "mlxserve_fleet_model_invalidations_total": ("counter", "Models invalidated", ("model",)),
    "mlxserve_fleet_generation_duration_seconds": (
        "histogram",
        "Generation duration (generationCompleted durationMs)",
        ("model",),
    ),
    "mlxserve_fleet_time_to_first_token_seconds": (
        "histogram",
        "From generationStarted to the attempt's first tokenGenerated",
        ("model",),
    ),
}

HISTOGRAM_BUCKETS = {
    "mlxserve_fleet_generation_duration_seconds": DURATION_BUCKETS,
    "mlxserve_fleet_time_to_first_token_seconds": LATENCY_BUCKETS,
}


def bucket_label(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


Labels = tuple[tuple[str, str], ...]  # sorted (name, value) pairs, values cut
Key = tuple[str, str, Labels]  # (metric family, series name, labels)
Deltas = defaultdict[Key, float]  # histogram sums are not whole numbers


def _key(family: str, series: str, **labels: str) -> Key:
    return family, series, tuple(sorted((k, v[:LABEL_VALUE_LENGTH]) for k, v in labels.items()))


# An observation counts at most this much (seconds, about 31 years) towards a histogram's
# sum: a producer's absurd duration (the contract allows any finite number) must not
# overflow the running sum, which the database would then refuse for every later event.
OBSERVATION_MAX_SECONDS = 1e9


def _observe(deltas: Deltas, name: str, buckets: Sequence[float], value: float, **labels: str) -> None:
    value = min(value, OBSERVATION_MAX_SECONDS)
    for bound in (*buckets, float("inf")):
        if value <= bound:
            deltas[_key(name, f"{name}_bucket", **labels, le=bucket_label(bound))] += 1
    deltas[_key(name, f"{name}_sum", **labels)] += value
    deltas[_key(name, f"{name}_count", **labels)] += 1


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def fleet_deltas(envelopes: Sequence[Envelope], firsts: Sequence[FirstToken]) -> Deltas:
    """What these newly stored events add to each series, under the label values the
    events carry (``fleet_counters_add`` bounds them); time to first token from ``firsts``
    (the attempts they complete, ``events.rollups.first_tokens``), under the token's model.

    Per event only a tuple is counted (this runs for every event the ingester stores);
    series keys are made once per distinct series at the end.
    """
    counts: Counter[tuple[str, tuple[str, ...]]] = Counter()
    by_type: Counter[type[Envelope]] = Counter()
    tokens_by_model: Counter[str] = Counter()
    observations: list[tuple[str, Sequence[float], float, str]] = []  # (histogram, buckets, value, model)
    for e in envelopes:
        by_type[type(e)] += 1
        if isinstance(e, TokenGeneratedEnvelope):
            tokens_by_model[e.payload.model] += 1
        elif isinstance(e, GenerationStartedEnvelope):
            counts[("mlxserve_fleet_generations_started_total", (e.payload.model,))] += 1
        elif isinstance(e, GenerationCompletedEnvelope):
            counts[("mlxserve_fleet_generations_completed_total", (e.payload.model,))] += 1
            observations.append(
                (
                    "mlxserve_fleet_generation_duration_seconds",
                    DURATION_BUCKETS,
                    e.payload.duration_ms / 1000,
                    e.payload.model,
                )
            )
        elif isinstance(e, ErrorEnvelope):
            counts[("mlxserve_fleet_errors_total", (_text(e.payload.code), _text(e.payload.model)))] += 1
        elif isinstance(e, ModelLoadedEnvelope):
            loaded = (e.payload.model, _text(e.payload.quantization))
            counts[("mlxserve_fleet_model_loads_total", loaded)] += 1
        elif isinstance(e, ModelUnloadedEnvelope):
            counts[("mlxserve_fleet_model_unloads_total", (e.payload.model, _text(e.payload.reason)))] += 1
        elif isinstance(e, ModelInvalidatedEnvelope):
            counts[("mlxserve_fleet_model_invalidations_total", (e.payload.model,))] += 1
    for model, count in tokens_by_model.items():
        counts[("mlxserve_fleet_tokens_total", (model,))] += count
    for first in firsts:
        if (ttft := time_to_first_token_ms(first.started, first.token)) is not None:
            observations.append(
                (
                    "mlxserve_fleet_time_to_first_token_seconds",
                    LATENCY_BUCKETS,
                    ttft / 1000,
                    first.token_model,
                )
            )

    deltas: Deltas = defaultdict(float)
    ingested = "mlxserve_events_ingested_total"
    for kind, count in by_type.items():
        deltas[_key(ingested, ingested, type=str(kind.__struct_config__.tag))] += count
    for (name, values), count in counts.items():
        names = FLEET_METRICS[name][2]
        deltas[_key(name, name, **dict(zip(names, values, strict=True)))] += count
    for name, buckets, value, model in observations:
        _observe(deltas, name, buckets, value, model=model)
    return deltas


def fleet_counters_add(envelopes: Sequence[Envelope], firsts: Sequence[FirstToken]) -> None:
    """Add what these newly stored events say to the running totals (one upsert), each
    label value under its own series or, past the label limit, the overflow value.

    Rows are written in key order, so two ingesters never wait on each other in a cycle.
    """
    deltas = fleet_deltas(envelopes, firsts)
    if not deltas:
        return
    wanted = {(family, name, value) for family, _, labels in deltas for name, value in labels}
    admitted = label_values_admit({w for w in wanted if w[1] in BOUNDED_LABELS and w[2]})
    rows: defaultdict[tuple[str, str], float] = defaultdict(float)
    for (family, series, labels), value in deltas.items():
        bounded = {name: admitted.get((family, name, v), v) for name, v in labels}
        rows[(series, msgspec.json.encode(bounded).decode())] += value
    _upsert(sorted(rows.items()))


def _upsert(items: list[tuple[tuple[str, str], float]]) -> None:
    rows = [(name, labels, float(value)) for (name, labels), value in items]
    upsert_adding(FleetCounter._meta.db_table, ("name", "labels"), ("value",), rows)


# -- bounded label values ----------------------------------------------------------------

# A value's last_seen is written at most this often: a fold needs days, not seconds.
LAST_SEEN_EVERY = timedelta(hours=1)
# Serialises admitting new values (and folding), so two ingesters cannot both take the last place.
_ADMISSION_LOCK = 0x6D6C78_6C6162  # "mlx" "lab"

LabelValue = tuple[str, str, str]  # (metric family, label, value)


def _registered_names() -> set[str]:
    return {name[:LABEL_VALUE_LENGTH] for name in RegisteredModel.objects.values_list("name", flat=True)}


def _admission_lock() -> None:
    if connection.vendor == "postgresql":  # SQLite has one writer at a time already
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_ADMISSION_LOCK])


def label_values_admit(wanted: set[LabelValue], *, now: datetime | None = None) -> dict[LabelValue, str]:
    """The value each of ``wanted`` is counted under: its own, or the overflow value.

    A value admitted before keeps its series (and its last_seen is refreshed hourly).
    A new one is admitted if it is a registered model name, or while its label of
    that metric has fewer than ``MLXSERVE_METRIC_LABEL_LIMIT`` values that are not;
    otherwise it is counted under ``OVERFLOW_LABEL_VALUE``. One query in the common
    case (every value known); new values take a lock, so the limit is exact.
    """
    if not wanted:
        return {}
    now = now or timezone.now()
    known = _known_values(wanted, now)
    new = wanted - known
    if not new:
        return {}
    _admission_lock()
    known = _known_values(new, now)  # admitted by another ingester meanwhile
    new = new - known
    if not new:
        return {}
    limit = settings.METRIC_LABEL_LIMIT
    registered = _registered_names()
    taken: dict[tuple[str, str], int] = {}
    admitted: list[FleetLabelValue] = []
    overflow: dict[LabelValue, str] = {}
    for family, label, value in sorted(new):
        if label == "model" and value in registered:
            admitted.append(FleetLabelValue(metric=family, label=label, value=value, last_seen=now))
            continue
        if (family, label) not in taken:
            held = FleetLabelValue.objects.filter(metric=family, label=label)
            if label == "model":
                held = held.exclude(value__in=registered)
            taken[(family, label)] = held.count()
        if taken[(family, label)] < limit:
            taken[(family, label)] += 1
            admitted.append(FleetLabelValue(metric=family, label=label, value=value, last_seen=now))
        else:
            overflow[(family, label, value)] = OVERFLOW_LABEL_VALUE
    FleetLabelValue.objects.bulk_create(admitted)
    return overflow


def _known_values(wanted: set[LabelValue], now: datetime) -> set[LabelValue]:
    """Which of ``wanted`` are admitted, refreshing the last_seen of those not seen for an hour.

    A value whose row a fold deletes meanwhile is not known: its refresh finds no row.
    """
    values = sorted({v for _, _, v in wanted})
    rows = [
        row
        # In chunks: a batch may carry thousands of distinct values (SQLite takes 32766 parameters).
        for start in range(0, len(values), 500)
        for row in FleetLabelValue.objects.filter(value__in=values[start : start + 500]).values_list(
            "pk", "metric", "label", "value", "last_seen"
        )
    ]
    known: dict[int, LabelValue] = {}
    stale: list[int] = []
    for pk, metric, label, value, last_seen in rows:
        if (metric, label, value) in wanted:
            known[pk] = (metric, label, value)
            if last_seen < now - LAST_SEEN_EVERY:
                stale.append(pk)
    for start in range(0, len(stale), 500):
        chunk = stale[start : start + 500]
        if FleetLabelValue.objects.filter(pk__in=chunk).update(last_seen=now) < len(chunk):
            kept = set(FleetLabelValue.objects.filter(pk__in=chunk).values_list("pk", flat=True))
            for pk in set(chunk) - kept:
                del known[pk]
    return set(known.values())


def fleet_labels_fold(*, now: datetime | None = None, unseen_days: int | None = None) -> int:
    """Fold the series of label values unseen for longer than the retention period (the
    longest a retention policy keeps events) into the overflow value, freeing their places.

    Counts move, none is lost: each folded row's value is added to the overflow row with
    the same other labels. Registered model names are never folded. Returns how many
    label values were folded.
    """
    now = now or timezone.now()
    if unseen_days is None:
        unseen_days = RetentionPolicy.objects.aggregate(days=Max("keep_days"))["days"]
        if unseen_days is None:
            return 0  # no retention: events, and their label values, are kept for ever
    # A row written past the model's bound (by hand in SQL) is applied at the bound.
    cutoff = now - timedelta(days=min(unseen_days, MAX_KEEP_DAYS))
    with transaction.atomic():
        _admission_lock()
        registered = _registered_names()
        # Locks the rows: a value an ingester refreshes meanwhile is read again and left alone.
        stale = [
            row
            for row in FleetLabelValue.objects.select_for_update().filter(last_seen__lt=cutoff)
            if not (row.label == "model" and row.value in registered)
        ]
        if not stale:
            return 0
        folded: dict[str, dict[str, set[str]]] = {}  # family -> label -> values
        for row in stale:
            folded.setdefault(row.metric, {}).setdefault(row.label, set()).add(row.value)
        moved: defaultdict[tuple[str, str], float] = defaultdict(float)
        gone: list[int] = []
        for family, by_label in folded.items():
            names = (
                [family]
                if family.endswith("_total")
                else [f"{family}{s}" for s in ("_bucket", "_sum", "_count")]
            )
            for pk, name, text, value in FleetCounter.objects.filter(name__in=names).values_list(
                "pk", "name", "labels", "value"
            ):
                labels = msgspec.json.decode(text)
                if not any(labels.get(label) in values for label, values in by_label.items()):
                    continue
                for label, values in by_label.items():
                    if labels.get(label) in values:
                        labels[label] = OVERFLOW_LABEL_VALUE
                moved[(name, msgspec.json.encode(dict(sorted(labels.items()))).decode())] += value
                gone.append(pk)
        FleetCounter.objects.filter(pk__in=gone).delete()
        _upsert(sorted(moved.items()))
        FleetLabelValue.objects.filter(pk__in=[row.pk for row in stale]).delete()
    return len(stale)


def fleet_counters_read() -> Iterable[tuple[str, dict[str, str], float]]:
    for name, labels, value in FleetCounter.objects.order_by("name", "labels").values_list(
        "name", "labels", "value"
    ):
        yield name, msgspec.json.decode(labels), value
