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
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from events.models import DeadLetter
from events.services import stream_lag
from mlxserve.redis_conn import redis_client

logger = logging.getLogger(__name__)


class IngestCollector(Collector):
    def describe(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        # Registering calls describe(), not collect(): no query while Django starts.
        yield CounterMetricFamily(
            "mlxserve_dead_letters", "Stream entries the ingester could not store (ever)"
        )
        for name in (
            "dead_letters_waiting",
            "ingest_stream_length",
            "ingest_pending",
            "ingest_oldest_pending_seconds",
        ):
            yield GaugeMetricFamily(f"mlxserve_{name}", name)

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        try:
            # Dead letters are never deleted (a replay marks them), so the count only grows.
            total = DeadLetter.objects.count()
            waiting = DeadLetter.objects.filter(replayed_at__isnull=True).count()
        except DatabaseError as exc:
            logger.warning("Dead-letter metrics unavailable: %s", exc)
        else:
            yield CounterMetricFamily(
                "mlxserve_dead_letters", "Stream entries the ingester could not store (ever)", value=total
            )
            yield GaugeMetricFamily(
                "mlxserve_dead_letters_waiting", "Dead letters not replayed yet", value=waiting
            )
        try:
            lag = stream_lag(
                client=redis_client(), stream=settings.EVENTS_STREAM, group=settings.EVENTS_CONSUMER_GROUP
            )
        except redis.RedisError as exc:
            logger.warning("Ingest lag metrics unavailable: %s", exc)
            return
        yield GaugeMetricFamily(
            "mlxserve_ingest_stream_length", "Entries in the event stream", value=lag["length"]
        )
        yield GaugeMetricFamily(
            "mlxserve_ingest_pending",
            "Stream entries read by an ingester and not yet stored",
            value=lag["pending"],
        )
        yield GaugeMetricFamily(
            "mlxserve_ingest_oldest_pending_seconds",
            "Age of the oldest entry read and not yet stored",
            value=lag["oldest_pending_ms"] / 1000,
        )


_registered = False


def register() -> None:
    global _registered
    if not _registered:
        REGISTRY.register(IngestCollector())
        _registered = True
