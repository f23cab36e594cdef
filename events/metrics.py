"""Control-plane metrics about ingestion, computed when Prometheus scrapes.

Read from the database and Redis at scrape time rather than counted in one
process: the web server runs as several processes and the ingester as
another, and these numbers are the shared truth they all see.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import redis
from django.conf import settings
from django.db import DatabaseError
from django.db.models import Count
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from events.backlog import streams_lag
from events.fleet import FLEET_METRICS, HISTOGRAM_BUCKETS, bucket_label, fleet_counters_read
from events.ingest import host_stream, worker_hosts
from events.models import DeadLetter, Worker
from events.selectors import DEAD_LETTERS_COUNTED, heard_since
from events.storage import dead_letters_total
from mlxserve.contract.events import RUNTIME_STATES
from mlxserve.redis_conn import redis_client
from mlxserve.web.metrics_view import collector_register

logger = logging.getLogger(__name__)


# The ingest gauges: name (after ``mlxserve_``), help, and the key of ``stream_lag`` they show
# (with its scale to base units).
INGEST_GAUGES: tuple[tuple[str, str, str, float], ...] = (
    ("ingest_stream_length", "Entries in the event stream", "length", 1),
    ("ingest_pending", "Stream entries read by an ingester and not yet stored", "pending", 1),
    (
        "ingest_oldest_pending_seconds",
        "Age of the oldest entry read and not yet stored",
        "oldest_pending_ms",
        1e-3,
    ),
    ("ingest_undelivered", "Stream entries no ingester has read yet", "undelivered", 1),
    (
        "ingest_lag_seconds",
        "How long the oldest event not yet stored has waited (read or not)",
        "lag_ms",
        1e-3,
    ),
)
DEAD_LETTERS = ("mlxserve_dead_letters", "Stream entries the ingester could not store (ever)")
DEAD_LETTERS_WAITING = ("mlxserve_dead_letters_waiting", "Dead letters not replayed yet")


class IngestCollector(Collector):
    def describe(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        # Registering calls describe(), not collect(): no query while Django starts.
        yield CounterMetricFamily(*DEAD_LETTERS)
        yield GaugeMetricFamily(*DEAD_LETTERS_WAITING)
        for name, help_text, _, _ in INGEST_GAUGES:
            yield GaugeMetricFamily(f"mlxserve_{name}", help_text)

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        try:
            # Counted as they are stored (a running total), and those waiting counted up to a cap:
            # a scrape never counts the whole table.
            total = dead_letters_total()
            waiting = (
                DeadLetter.objects.filter(replayed_at__isnull=True).order_by()[:DEAD_LETTERS_COUNTED].count()
            )
        except DatabaseError as exc:
            logger.warning("Dead-letter metrics unavailable: %s", exc)
        else:
            yield CounterMetricFamily(*DEAD_LETTERS, value=total)
            yield GaugeMetricFamily(*DEAD_LETTERS_WAITING, value=waiting)
        try:
            streams = [
                settings.EVENTS_STREAM,
                *(host_stream(settings.EVENTS_STREAM, h) for h in worker_hosts()),
            ]
            lag = streams_lag(client=redis_client(), streams=streams, group=settings.EVENTS_CONSUMER_GROUP)
        except (redis.RedisError, DatabaseError) as exc:
            logger.warning("Ingest lag metrics unavailable: %s", exc)
            return
        for name, help_text, key, scale in INGEST_GAUGES:
            yield GaugeMetricFamily(f"mlxserve_{name}", help_text, value=lag[key] * scale)


WORKER_STATES = (*RUNTIME_STATES, "unknown")  # unknown: never said


class FleetCollector(Collector):
    """What the stored events say about the fleet: running totals kept by the ingester
    (``events.fleet``) and the workers' state, read from the database at scrape."""

    def describe(self) -> Iterator[Metric]:
        return iter(())  # nothing queried while Django starts

    def collect(self) -> Iterator[Metric]:
        # Bounded work and series whatever the fleet holds: counts are counted by the database,
        # and a series per worker only for the MLXSERVE_METRIC_LABEL_LIMIT most recently heard.
        try:
            rows = list(fleet_counters_read())
            counts = dict(Worker.objects.order_by().values_list("status").annotate(n=Count("id")))
            silent = Worker.objects.filter(last_heard_at__lt=heard_since()).exclude(status="shutdown").count()
            recent = list(
                Worker.objects.order_by("-last_heard_at", "source").values_list(
                    "source", "status", "last_heard_at"
                )[: settings.METRIC_LABEL_LIMIT]
            )
        except DatabaseError as exc:
            logger.warning("Fleet metrics unavailable: %s", exc)
            return
        yield from _families(rows)
        by_state = dict.fromkeys(WORKER_STATES, 0)
        for status, n in counts.items():
            state = status or "unknown"
            by_state[state] = by_state.get(state, 0) + n
        stale = GaugeMetricFamily(
            "mlxserve_fleet_workers_stale", "Workers silent for three heartbeat intervals or more"
        )
        heard = GaugeMetricFamily(
            "mlxserve_fleet_worker_last_heard_timestamp_seconds",
            "When each worker was last heard from (any event), Unix seconds; the "
            "MLXSERVE_METRIC_LABEL_LIMIT most recently heard",
            labels=["source", "status"],
        )
        for source, status, last_heard_at in recent:
            heard.add_metric([source, status or "unknown"], last_heard_at / 1000)
        stale.add_metric([], silent)
        by_status = GaugeMetricFamily(
            "mlxserve_fleet_workers", "Workers by their last runtimeStatus", labels=["status"]
        )
        for state, count in by_state.items():
            by_status.add_metric([state], count)
        yield by_status
        yield stale
        yield heard


def _families(rows: list[tuple[str, dict[str, str], float]]) -> Iterator[Metric]:
    series: dict[str, list[tuple[dict[str, str], float]]] = {}
    for name, labels, value in rows:
        series.setdefault(name, []).append((labels, value))
    for name, (kind, help_text, label_names) in FLEET_METRICS.items():
        if kind == "counter":
            counter = CounterMetricFamily(name.removesuffix("_total"), help_text, labels=label_names)
            for labels, value in series.get(name, []):
                counter.add_metric([labels.get(n, "") for n in label_names], value)
            yield counter
            continue
        histogram = HistogramMetricFamily(name, help_text, labels=label_names)
        sums = {
            tuple(labels.get(n, "") for n in label_names): v for labels, v in series.get(f"{name}_sum", [])
        }
        buckets: dict[tuple[str, ...], list[tuple[str, float]]] = {}
        for labels, value in series.get(f"{name}_bucket", []):
            key = tuple(labels.get(n, "") for n in label_names)
            buckets.setdefault(key, []).append((labels["le"], value))
        bounds = [bucket_label(b) for b in (*HISTOGRAM_BUCKETS[name], float("inf"))]
        for key, observed in buckets.items():
            # Stored cumulative; a bucket no observation fell into has no row: it is 0.
            counts = dict(observed)
            histogram.add_metric(list(key), [(b, counts.get(b, 0.0)) for b in bounds], sums.get(key, 0.0))
        yield histogram


CONTROL_PLANE_COLLECTORS: tuple[Collector, ...] = (IngestCollector(), FleetCollector())


def register() -> None:
    """Hand the control plane's collectors to ``/metrics`` (read at scrape, in either mode)."""
    for collector in CONTROL_PLANE_COLLECTORS:
        collector_register(collector)
