"""Fleet metrics derived from stored events: running totals the control plane exports.

The ingester adds each batch's contribution in the same transaction that
stores the batch, counting only events stored for the first time, so the
figures are exact under redelivery, shared by every web process (they read
one table at scrape) and survive restarts. Retention deleting old events does
not lower a counter: Prometheus counters only go up.
"""

from __future__ import annotations

from collections import Counter
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
Deltas = Counter[Key]  # float values: histogram sums are not whole


def _labels(**labels: str) -> str:
    cut = {k: v[:LABEL_VALUE_LENGTH] for k, v in sorted(labels.items())}
    return msgspec.json.encode(cut).decode()


def _observe(deltas: Counter[Key], name: str, buckets: Sequence[float], value: float, **labels: str) -> None:
    for bound in (*buckets, float("inf")):
        if value <= bound:
            deltas[(f"{name}_bucket", _labels(**labels, le=bucket_label(bound)))] += 1
    deltas[(f"{name}_sum", _labels(**labels))] += value  # type: ignore[assignment]
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


def fleet_deltas(envelopes: Sequence[Envelope]) -> Counter[Key]:
    deltas: Deltas = Counter()
    # A token is a first token when the event just before it (seq one less) is its
    # generation's start; one preceded by a token in this batch cannot be.
    tokens_seen = {(e.generation_id, e.seq) for e in envelopes if isinstance(e, TokenGeneratedEnvelope)}
    candidates: list[TokenGeneratedEnvelope] = []
    for e in envelopes:
        deltas[("mlxserve_events_ingested_total", _labels(type=str(type(e).__struct_config__.tag)))] += 1
        if isinstance(e, TokenGeneratedEnvelope):
            deltas[("mlxserve_fleet_tokens_total", _labels(model=e.payload.model))] += 1
            if (e.generation_id, e.seq - 1) not in tokens_seen:
                candidates.append(e)
        elif isinstance(e, GenerationStartedEnvelope):
            deltas[("mlxserve_fleet_generations_started_total", _labels(model=e.payload.model))] += 1
        elif isinstance(e, GenerationCompletedEnvelope):
            deltas[("mlxserve_fleet_generations_completed_total", _labels(model=e.payload.model))] += 1
            _observe(
                deltas,
                "mlxserve_fleet_generation_duration_seconds",
                DURATION_BUCKETS,
                e.payload.duration_ms / 1000,
                model=e.payload.model,
            )
        elif isinstance(e, ErrorEnvelope):
            code = e.payload.code if isinstance(e.payload.code, str) else ""
            model = e.payload.model if isinstance(e.payload.model, str) else ""
            deltas[("mlxserve_fleet_errors_total", _labels(code=code, model=model))] += 1
        elif isinstance(e, ModelLoadedEnvelope):
            quantization = e.payload.quantization if isinstance(e.payload.quantization, str) else ""
            deltas[
                (
                    "mlxserve_fleet_model_loads_total",
                    _labels(model=e.payload.model, quantization=quantization),
                )
            ] += 1
        elif isinstance(e, ModelUnloadedEnvelope):
            reason = e.payload.reason if isinstance(e.payload.reason, str) else ""
            deltas[("mlxserve_fleet_model_unloads_total", _labels(model=e.payload.model, reason=reason))] += 1
        elif isinstance(e, ModelInvalidatedEnvelope):
            deltas[("mlxserve_fleet_model_invalidations_total", _labels(model=e.payload.model))] += 1
    if candidates:
        starts = _starts_before(candidates, envelopes)
        for token in candidates:
            started = starts.get((str(token.generation_id), str(token.seq - 1)))
            if started is not None and token.timestamp >= started:
                _observe(
                    deltas,
                    "mlxserve_fleet_time_to_first_token_seconds",
                    TTFT_BUCKETS,
                    (token.timestamp - started) / 1000,
                    model=token.payload.model,
                )
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
