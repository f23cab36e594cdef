"""``ingest_events`` as operators run it: a process, stopped politely or cut off from Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

import msgspec
import pytest
import redis
from django.conf import settings as django_settings

from events.backlog import stream_lag
from events.models import Event
from mlxserve.bus import stream_append_batch
from tests.factories import TEST_REDIS_URL, RedisServer, database_url, token_bodies

pytestmark = pytest.mark.django_db(transaction=True)


def fill(client: redis.Redis, stream: str, count: int) -> None:
    bodies = token_bodies(count)
    for start in range(0, count, 500):
        stream_append_batch(client, stream, bodies[start : start + 500])


def start_ingester(settings: Any, redis_url: str, *extra: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "DATABASE_URL": database_url(),
        "REDIS_URL": redis_url,
        "MLXSERVE_EVENTS_STREAM": settings.EVENTS_STREAM,
        "MLXSERVE_EVENTS_GROUP": settings.EVENTS_CONSUMER_GROUP,
        "MLXSERVE_CONFIG_KEY": settings.TELEMETRY_CONFIG_KEY,
    }
    return subprocess.Popen(
        [
            sys.executable,
            "manage.py",
            "ingest_events",
            "--consumer",
            "i1",
            "--block-ms",
            "50",
            "--batch-size",
            "1000",
            *extra,
        ],
        env=env,
        cwd=django_settings.BASE_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def wait_until_nothing_pending(client: redis.Redis, settings: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lag = stream_lag(client=client, stream=settings.EVENTS_STREAM, group=settings.EVENTS_CONSUMER_GROUP)
        if not lag["pending"]:
            return
        time.sleep(0.05)


def assert_stored_once_and_acknowledged(client: redis.Redis, settings: Any, count: int) -> None:
    assert Event.objects.count() == Event.objects.values("id").distinct().count() == count
    lag = stream_lag(client=client, stream=settings.EVENTS_STREAM, group=settings.EVENTS_CONSUMER_GROUP)
    assert lag["pending"] == 0


def wait_for_count(minimum: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while (count := Event.objects.count()) < minimum:
        assert time.monotonic() < deadline, f"only {count} of {minimum} events stored"
        time.sleep(0.02)
    return count


def test_sigterm_finishes_the_batch_acknowledges_and_exits(redis_client: redis.Redis, settings: Any) -> None:
    fill(redis_client, settings.EVENTS_STREAM, 50_000)
    process = start_ingester(settings, TEST_REDIS_URL)
    wait_for_count(5_000, timeout=60)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output.decode()[-2000:]
    assert b"Stopped: stored" in output
    stopped_at = Event.objects.count()
    assert stopped_at < 50_000
    lag = stream_lag(client=redis_client, stream=settings.EVENTS_STREAM, group=settings.EVENTS_CONSUMER_GROUP)
    assert lag["pending"] == 0, "everything it read was stored and acknowledged before it left"
    again = start_ingester(settings, TEST_REDIS_URL, "--exit-when-idle")
    again.communicate(timeout=120)
    assert Event.objects.count() == Event.objects.values("id").distinct().count() == 50_000


def test_redis_gone_for_ten_seconds_loses_nothing_and_the_ingester_recovers(
    own_redis: RedisServer, settings: Any
) -> None:
    client = redis.Redis.from_url(own_redis.url)
    fill(client, settings.EVENTS_STREAM, 60_000)
    process = start_ingester(settings, own_redis.url)
    try:
        wait_for_count(2_000, timeout=60)
        own_redis.stop()  # append-only file, fsync always: it comes back with the stream and the group
        time.sleep(10)
        assert process.poll() is None, "the ingester must wait for Redis, not die"
        own_redis.start()
        wait_for_count(60_000, timeout=120)
        wait_until_nothing_pending(client, settings)
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    assert b"Ingest paused (ConnectionError" in output
    assert_stored_once_and_acknowledged(client, settings, 60_000)


def test_a_database_outage_acknowledges_nothing_and_the_ingester_recovers(
    redis_client: redis.Redis, settings: Any
) -> None:
    from django.db import connection

    process = start_ingester(settings, TEST_REDIS_URL)
    try:
        fill(redis_client, settings.EVENTS_STREAM, 1_000)
        wait_for_count(1_000, timeout=60)
        with connection.cursor() as cursor:
            cursor.execute("ALTER TABLE events_token RENAME TO events_token_away")
        try:
            fill(redis_client, settings.EVENTS_STREAM, 2_000)
            time.sleep(3)
            lag = stream_lag(
                client=redis_client, stream=settings.EVENTS_STREAM, group=settings.EVENTS_CONSUMER_GROUP
            )
            assert lag["pending"] > 0, "read while the table was gone, so not acknowledged"
            assert process.poll() is None, "the ingester must wait for the database, not die"
        finally:
            with connection.cursor() as cursor:
                cursor.execute("ALTER TABLE events_token_away RENAME TO events_token")
        wait_for_count(3_000, timeout=60)
        wait_until_nothing_pending(redis_client, settings)
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    assert b"Ingest paused (" in output
    assert_stored_once_and_acknowledged(redis_client, settings, 3_000)


def test_a_running_ingester_stores_the_next_good_event_within_seconds_of_each_poison(
    redis_client: redis.Redis, settings: Any
) -> None:
    from events.models import DeadLetter
    from mlxserve.contract.stream import BATCH_FIELD, ENTRY_FIELD
    from tests.factories import make_envelope

    def now_ms() -> int:
        return time.time_ns() // 1_000_000

    nested = b"[" * 100_000 + b"]" * 100_000
    poisons: list[dict[bytes, bytes]] = [
        {ENTRY_FIELD: b"\xff\xfe\xfd"},
        {ENTRY_FIELD: nested},
        {BATCH_FIELD: b"[" + nested + b", 7]"},
        {b"unknown": b"field"},
        {ENTRY_FIELD: msgspec.json.encode(make_envelope("error", timestamp=now_ms() + 86_400_000))},
        {
            ENTRY_FIELD: msgspec.json.encode(
                make_envelope(
                    "runtimeStatus",
                    timestamp=now_ms(),
                    payload={"status": "ready", "modelsLoaded": 2**63 - 1, "activeTasks": 2**40},
                )
            )
        },
    ]
    process = start_ingester(settings, TEST_REDIS_URL)
    try:
        for poison in poisons:
            redis_client.xadd(settings.EVENTS_STREAM, poison)  # type: ignore[arg-type]
            good = make_envelope("error", timestamp=now_ms())
            redis_client.xadd(settings.EVENTS_STREAM, {ENTRY_FIELD: msgspec.json.encode(good)})
            deadline = time.monotonic() + 10
            while not Event.objects.filter(pk=good["id"]).exists():
                assert process.poll() is None, process.communicate()[0].decode()[-2000:]
                assert time.monotonic() < deadline, f"the good event after {poison!r:.60} was not stored"
                time.sleep(0.05)
        wait_until_nothing_pending(redis_client, settings)
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output.decode()[-2000:]
    assert b"Ingest paused" not in output
    assert DeadLetter.objects.count() == 6  # five poisons, and the second item of the batch
    assert Event.objects.count() == len(poisons) + 1  # the goods and the runtime status
