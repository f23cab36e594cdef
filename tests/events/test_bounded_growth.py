"""What any one account can make grow is bounded: sources per producer, worker rows forgotten
after a silence, /api/workers/ a page at a time, worker series under the label limit, and
/metrics and /api/schema/ doing the same work whatever the tables hold."""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec
import pytest
import redis
from django.contrib.auth.models import Group, User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from events.models import DeadLetter, Worker
from events.retention import events_retention_apply
from events.storage import events_store
from mlxserve.web.roles import PRODUCER_GROUP
from tests.factories import ingester, make_envelope, token_client

pytestmark = pytest.mark.django_db


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def producer(name: str) -> APIClient:
    user = User.objects.create_user(name)
    user.groups.add(Group.objects.get_or_create(name=PRODUCER_GROUP)[0])
    return token_client(user)


def follow(client: APIClient, url: str) -> list[dict[str, Any]]:
    rows, pages = [], 0
    while url:
        page = client.get(url).json()
        rows += page["results"]
        url = page["next"]
        pages += 1
        assert pages < 1000
    return rows


def test_a_producer_with_100000_sources_makes_at_most_its_share_of_workers(
    redis_client: redis.Redis, settings: Any, reader_client: APIClient
) -> None:
    settings.SOURCES_PER_PRODUCER = 100
    settings.METRIC_LABEL_LIMIT = 50
    acme = producer("acme")
    accepted = 0
    for post in range(20):
        batch = [
            make_envelope(
                "runtimeStatus",
                source=f"acme/{post * 5000 + i}",
                timestamp=now_ms(),
                generationId=None,
                payload={"status": "ready", "modelsLoaded": 0},
            )
            for i in range(5000)
        ]
        answer = acme.post("/api/events/", batch, format="json")
        assert answer.status_code == 207
        accepted += len(answer.json()["accepted"])
        rejected = answer.json()["rejected"]
        if post == 0:
            assert len(rejected) == 4900 and rejected[0]["index"] == 100
            assert rejected[0]["error"]["message"].startswith(
                "Producer 'acme' already posts as 100 sources (MLXSERVE_SOURCES_PER_PRODUCER)"
            )
    assert accepted == 100
    # One envelope from a 101st source: 403; one of its 100: accepted.
    one = make_envelope(
        "runtimeStatus",
        source="acme/new",
        timestamp=now_ms(),
        generationId=None,
        payload={"status": "ready", "modelsLoaded": 0},
    )
    assert acme.post("/api/events/", one, format="json").status_code == 403
    assert (
        acme.post(
            "/api/events/", {**one, "id": str(uuid.uuid4()), "source": "acme/0"}, format="json"
        ).status_code
        == 202
    )
    # Another producer has its own share.
    other = producer("other")
    assert (
        other.post(
            "/api/events/", {**one, "id": str(uuid.uuid4()), "source": "other/w"}, format="json"
        ).status_code
        == 202
    )
    worker = ingester(redis_client, settings)
    for _ in range(5):
        worker.step()
    assert Worker.objects.count() == 101, sorted(Worker.objects.values_list("source", flat=True))[-3:]
    # /api/workers/ a page at a time; every worker once.
    rows = follow(reader_client, "/api/workers/?limit=40")
    assert len(rows) == 101 and len({r["source"] for r in rows}) == 101
    assert rows == sorted(rows, key=lambda r: r["source"])
    # The control plane's scrape: one series per worker for the 50 most recently heard only,
    # the counts by status still all of them; a handful of queries whatever the table holds.
    with CaptureQueriesContext(connection) as queries:
        text = Client().get("/metrics").content.decode()
    assert text.count("mlxserve_fleet_worker_last_heard_timestamp_seconds{") == 50
    assert 'mlxserve_fleet_workers{status="ready"} 101.0' in text
    assert len(queries.captured_queries) < 15


def test_workers_silent_past_the_forget_window_are_forgotten_and_come_back(settings: Any) -> None:
    settings.WORKER_FORGET_AFTER_S = 3600
    now = now_ms()
    Worker.objects.create(source="gone/w", last_heard_at=now - 3_700_000)
    Worker.objects.create(source="here/w", last_heard_at=now - 60_000)
    events_retention_apply(now_ms=now)
    assert list(Worker.objects.values_list("source", flat=True)) == ["here/w"]
    events_store([("1-0", msgspec.json.encode(make_envelope(source="gone/w", timestamp=now)))])
    assert Worker.objects.filter(source="gone/w", last_heard_at=now).exists()


@pytest.mark.parametrize("cursor", ["cD0AeA==", "bm9wZQ==", "cD0" + "eHh4" * 100, "!!"])
def test_a_malformed_workers_cursor_is_400(reader_client: APIClient, cursor: str) -> None:
    answer = reader_client.get("/api/workers/", {"cursor": cursor})
    assert answer.status_code == 400
    assert answer.json()["details"]["issues"][0]["path"] == ["cursor"]


def test_the_dead_letter_figures_are_read_not_counted_at_scrape() -> None:
    bad = [(f"{i}-0", b"not json") for i in range(30)]
    events_store(bad)
    events_store(bad)  # redelivered: no new letter, nothing counted again
    assert DeadLetter.objects.count() == 30
    with CaptureQueriesContext(connection) as queries:
        text = Client().get("/metrics").content.decode()
    assert "mlxserve_dead_letters_total 30.0" in text
    assert "mlxserve_dead_letters_waiting 30.0" in text
    for query in queries.captured_queries:
        sql = query["sql"].upper()
        if "EVENTS_DEADLETTER" in sql and "COUNT(" in sql:
            assert "LIMIT" in sql, sql  # at most the cap, never the table


def test_the_openapi_schema_is_generated_once_per_process(anon_client: APIClient, monkeypatch: Any) -> None:
    from drf_spectacular.generators import SchemaGenerator

    from mlxserve.web import schema_view

    monkeypatch.setattr(schema_view, "_schema", {})
    calls = []
    original = SchemaGenerator.get_schema

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SchemaGenerator, "get_schema", counted)
    for query in ("", "?format=json", "?version=1", "?version=2"):
        assert anon_client.get(f"/api/schema/{query}").status_code == 200
    assert len(calls) == 1


def test_a_host_writing_the_stream_itself_makes_at_most_its_share_of_workers(settings: Any) -> None:
    # The stream is written by worker hosts' credentials, not through the API's source budget: the
    # ingester makes at most MLXSERVE_SOURCES_PER_PRODUCER worker rows per host, and stores every event.
    settings.SOURCES_PER_PRODUCER = 10
    from events.models import Event

    envelopes = [make_envelope(source=f"rogue/{i}", timestamp=now_ms()) for i in range(300)]
    envelopes += [make_envelope(source="honest/w1", timestamp=now_ms())]
    for start in range(0, len(envelopes), 50):
        events_store(
            [(f"{start}-{i}", msgspec.json.encode(e)) for i, e in enumerate(envelopes[start : start + 50])]
        )
    assert Event.objects.count() == 301
    assert Worker.objects.filter(source__startswith="rogue/").count() == 10
    assert Worker.objects.filter(source="honest/w1").exists()


def test_with_the_ingester_stopped_posts_stop_at_the_backlog_bound_and_none_accepted_is_lost(
    redis_client: redis.Redis, settings: Any
) -> None:
    # Three producers post batches while no ingester runs: the stream grows to its byte bound (one
    # entry past it at most), then every post is 503 with nothing kept; once the ingester runs,
    # every event answered 202/207-accepted is stored.
    from events.models import Event

    settings.STREAM_BACKLOG_BYTES = 400_000
    settings.STREAM_BACKLOG_LIMIT = 0  # the byte bound alone
    producers = {name: producer(name) for name in ("p1", "p2", "p3")}
    accepted: list[str] = []
    refused = 0
    for _round in range(40):
        for name, client in producers.items():
            batch = [make_envelope(source=f"{name}/w", timestamp=now_ms()) for _ in range(100)]
            answer = client.post("/api/events/", batch, format="json")
            if answer.status_code == 503:
                refused += 1
                assert answer["Retry-After"] == "5"
                continue
            assert answer.status_code == 207, answer.content
            accepted += answer.json()["accepted"]
    assert refused > 0 and accepted
    used = int(redis_client.memory_usage(settings.EVENTS_STREAM) or 0)
    assert used < 400_000 + 100_000, used  # the bound, and the entry that crossed it
    worker = ingester(redis_client, settings)
    for _ in range(50):
        if worker.step().stored == 0 and Event.objects.count() >= len(accepted):
            break
    assert set(map(str, Event.objects.values_list("id", flat=True))) == set(accepted)


def test_events_each_in_their_own_minute_and_model_make_a_bounded_number_of_rollup_rows() -> None:
    # A producer stamping every event in a minute and a model of its own (as a hostile one may) makes
    # what it sends grow the rollups linearly: a completed generation is at most three series (its
    # count and two histograms) at three widths (minute, hour, day), nine rows; retention drops them.
    from events.models import RetentionPolicy, SourceMinute, StatsDay, StatsMinute, StatsRollup

    now, n = now_ms(), 600
    envelopes = [
        make_envelope(
            "generationCompleted",
            timestamp=now - i * 60_000,
            payload={"model": f"fake-{i}", "tokensGenerated": 8, "durationMs": 100.0 + i, "throughput": 80.0},
        )
        for i in range(n)
    ]
    for start in range(0, n, 200):
        events_store(
            [(f"{start}-{i}", msgspec.json.encode(e)) for i, e in enumerate(envelopes[start : start + 200])]
        )
    rows = {table: table.objects.count() for table in (StatsMinute, StatsRollup, StatsDay)}
    assert rows[StatsMinute] == 3 * n and sum(rows.values()) <= 9 * n, rows
    assert SourceMinute.objects.count() <= n
    RetentionPolicy.objects.all().delete()
    RetentionPolicy.objects.create(event_type="generationCompleted", keep_days=1)
    events_retention_apply(now_ms=now + 3 * 86_400_000)
    assert sum(table.objects.count() for table in (StatsMinute, StatsRollup, StatsDay)) == 0
