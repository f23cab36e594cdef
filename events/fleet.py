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

import msgspec
from django.db import connection

from events.models import Event, FleetCounter
from events.schemas import (
    Envelope,
    ErrorEnvelope,
    GenerationCompletedEnvelope,
    GenerationStartedEnvelope,
    ModelInvalidatedEnvelope,
    ModelLoadedEnvelope,
    ModelUnloadedEnvelope,
    TokenGeneratedEnvelope,
)

# Label values are cut to this length: a model path or error code must not make a huge series name.
LABEL_VALUE_LENGTH = 120

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

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
    "mlxserve_fleet_time_to_first_token_seconds": TTFT_BUCKETS,
}


def bucket_label(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


Key = tuple[str, str]  # (series name, labels as sorted JSON)
Deltas = defaultdict[Key, float]  # histogram sums are not whole numbers


def _labels(**labels: str) -> str:
    cut = {k: v[:LABEL_VALUE_LENGTH] for k, v in sorted(labels.items())}
    return msgspec.json.encode(cut).decode()


# An observation counts at most this much (seconds, about 31 years) towards a histogram's
# sum: a producer's absurd duration (the contract allows any finite number) must not
# overflow the running sum, which the database would then refuse for every later event.
OBSERVATION_MAX_SECONDS = 1e9


def _observe(deltas: Deltas, name: str, buckets: Sequence[float], value: float, **labels: str) -> None:
    value = min(value, OBSERVATION_MAX_SECONDS)
    for bound in (*buckets, float("inf")):
        if value <= bound:
            deltas[(f"{name}_bucket", _labels(**labels, le=bucket_label(bound)))] += 1
    deltas[(f"{name}_sum", _labels(**labels))] += value
    deltas[(f"{name}_count", _labels(**labels))] += 1


def _starts_before(tokens: list[TokenGeneratedEnvelope], batch: Sequence[Envelope]) -> dict[Key, int]:
    """The ``generationStarted`` just before each token (same generation, ``seq`` one less):
    from the batch first, then one query for the rest. Keyed (generation id, seq)."""
    starts = {
        (str(e.generation_id), str(e.seq)): e.timestamp
        for e in batch
        if isinstance(e, GenerationStartedEnvelope)
    }
    missing = {t.generation_id for t in tokens if (str(t.generation_id), str(t.seq - 1)) not in starts}
    if missing:
        rows = Event.objects.filter(type="generationStarted", generation_id__in=missing).values_list(
            "generation_id", "seq", "timestamp"
        )
        starts.update({(str(g), str(s)): ts for g, s, ts in rows})
    return starts


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def fleet_deltas(envelopes: Sequence[Envelope]) -> Deltas:
    """What these newly stored events add to each series.

    Per event only a tuple is counted (this runs for every event the ingester stores);
    label JSON is made once per distinct series at the end.
    """
    counts: Counter[tuple[str, tuple[str, ...]]] = Counter()
    by_type: Counter[type[Envelope]] = Counter()
    tokens_by_model: Counter[str] = Counter()
    observations: list[tuple[str, Sequence[float], float, str]] = []  # (histogram, buckets, value, model)
    # A generation's first token can only be its earliest token in this batch (the one
    # with the lowest seq); it is the first when the event just before it is the start.
    earliest: dict[int, TokenGeneratedEnvelope] = {}
    for e in envelopes:
        by_type[type(e)] += 1
        if isinstance(e, TokenGeneratedEnvelope):
            tokens_by_model[e.payload.model] += 1
            key = e.generation_id.int
            seen = earliest.get(key)
            if seen is None or e.seq < seen.seq:
                earliest[key] = e
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
    candidates = list(earliest.values())
    if candidates:
        starts = _starts_before(candidates, envelopes)
        for token in candidates:
            started = starts.get((str(token.generation_id), str(token.seq - 1)))
            if started is not None and token.timestamp >= started:
                observations.append(
                    (
                        "mlxserve_fleet_time_to_first_token_seconds",
                        TTFT_BUCKETS,
                        (token.timestamp - started) / 1000,
                        token.payload.model,
                    )
                )

    deltas: Deltas = defaultdict(float)
    for kind, count in by_type.items():
        deltas[("mlxserve_events_ingested_total", _labels(type=str(kind.__struct_config__.tag)))] += count
    for (name, values), count in counts.items():
        names = FLEET_METRICS[name][2]
        deltas[(name, _labels(**dict(zip(names, values, strict=True))))] += count
    for name, buckets, value, model in observations:
        _observe(deltas, name, buckets, value, model=model)
    return deltas


def fleet_counters_add(envelopes: Sequence[Envelope]) -> None:
    """Add what these newly stored events say to the running totals (one upsert).

    Rows are written in key order, so two ingesters never wait on each other in a cycle.
    """
    deltas = fleet_deltas(envelopes)
    if not deltas:
        return
    table = FleetCounter._meta.db_table
    items = sorted(deltas.items())
    with connection.cursor() as cursor:
        for start in range(0, len(items), 300):
            chunk = items[start : start + 300]
            cursor.execute(
                f"INSERT INTO {table} (name, labels, value) VALUES "
                + ", ".join(["(%s, %s, %s)"] * len(chunk))
                + f" ON CONFLICT (name, labels) DO UPDATE SET value = {table}.value + excluded.value",
                [v for (name, labels), value in chunk for v in (name, labels, float(value))],
            )


def fleet_counters_read() -> Iterable[tuple[str, dict[str, str], float]]:
    for name, labels, value in FleetCounter.objects.order_by("name", "labels").values_list(
        "name", "labels", "value"
    ):
        yield name, msgspec.json.decode(labels), value
