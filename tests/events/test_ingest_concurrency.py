"""Ingesters side by side: four at once on one stream, each batch touching the same workers and
generations as the others'. No deadlock is counted against the events, and every figure kept as
it goes (rollups, fleet counters, worker rows) equals what a scan of the stored events says."""

from __future__ import annotations

import random
import threading
import uuid
from collections import defaultdict
from typing import Any

import msgspec
import pytest
import redis
from django.db import connection

from events.ingest import PAUSING_ERRORS
from events.models import DeadLetter, Event, FleetCounter, StatsRollup, Worker
from events.rollups import rollups_rebuild
from mlxserve.bus import stream_append_batch
from tests.factories import T0, ingester, make_envelope, pending

pytestmark = pytest.mark.django_db(transaction=True)

GENERATIONS, TOKENS, SOURCES = 150, 8, 6


def fleet(rng: random.Random) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for g in range(GENERATIONS):
        gid, source = str(uuid.uuid4()), f"mac-{g % SOURCES}/worker-1"
        start = T0 + g * 1_000
        events.append(
            make_envelope(
                "generationStarted",
                generationId=gid,
                source=source,
                timestamp=start,
                seq=0,
                payload={"model": "m", "prompt": "Hi"},
            )
        )
        events += [
            make_envelope(
                "tokenGenerated",
                generationId=gid,
                source=source,
                timestamp=start + 50 + i * 10,
                seq=1 + i,
                payload={"model": "m", "token": "t"},
            )
            for i in range(TOKENS)
        ]
        events.append(
            make_envelope(
                "generationCompleted",
                generationId=gid,
                source=source,
                timestamp=start + 50 + TOKENS * 10,
                seq=TOKENS + 1,
                payload={"model": "m", "tokensGenerated": TOKENS, "durationMs": 130.0},
            )
        )
    # Every source reports in every part of the stream: each batch updates every worker row.
    events += [
        make_envelope(
            "runtimeStatus",
            source=f"mac-{i % SOURCES}/worker-1",
            timestamp=T0 + rng.randrange(GENERATIONS * 1_000),
            generationId=None,
            payload={"status": "busy", "modelsLoaded": 1, "activeTasks": i % 3},
        )
        for i in range(300)
    ]
    return events


def test_four_ingesters_at_once_store_everything_once_and_count_it_exactly(
    redis_client: redis.Redis, settings: Any
) -> None:
    rng = random.Random(7)
    events = fleet(rng)
    shuffled = events[:]
    rng.shuffle(shuffled)  # a start and its first token usually land in different batches
    for start in range(0, len(shuffled), 12):
        stream_append_batch(
            redis_client,
            settings.EVENTS_STREAM,
            [msgspec.json.encode(e) for e in shuffled[start : start + 12]],
        )
    failures: list[BaseException] = []
    conflicts: list[str] = []

    def run(consumer: str) -> None:
        worker = ingester(redis_client, settings, consumer=consumer, batch_size=24)
        idle = 0
        try:
            while idle < 5:
                try:
                    outcome = worker.step()
                except PAUSING_ERRORS as exc:  # what the ingester's loop would wait out
                    conflicts.append(f"{type(exc).__name__}: {exc}")
                    continue
                idle = 0 if outcome.stored + outcome.duplicates + outcome.dead else idle + 1
        except BaseException as exc:
            failures.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(f"c{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not failures, failures
    assert not conflicts, conflicts[:3]  # a deadlock is retried in place, never a paused delivery
    assert pending(redis_client, settings) == 0
    assert not DeadLetter.objects.exists()
    assert Event.objects.count() == len(events)

    # Workers: each row says what its newest events say, whichever ingester stored them.
    newest: dict[str, int] = defaultdict(int)
    for e in events:
        newest[e["source"]] = max(newest[e["source"]], e["timestamp"])
    assert {w.source: w.last_heard_at for w in Worker.objects.all()} == newest

    # Fleet counters: every token once, every attempt's time to first token once.
    def counter(series: str) -> float:
        return sum(FleetCounter.objects.filter(name=series).values_list("value", flat=True))

    assert counter("mlxserve_fleet_tokens_total") == GENERATIONS * TOKENS
    assert counter("mlxserve_fleet_time_to_first_token_seconds_count") == GENERATIONS
    assert counter("mlxserve_fleet_generations_started_total") == GENERATIONS

    # The stats rollups equal the ones built from a scan of the stored events.
    kept = sorted(StatsRollup.objects.values_list("hour", "model", "series", "bucket", "count"))
    assert sum(n for _, _, series, _, n in kept if series == "ttftMs") == GENERATIONS
    rollups_rebuild(everything=True)
    assert sorted(StatsRollup.objects.values_list("hour", "model", "series", "bucket", "count")) == kept
