"""The ingester killed with SIGKILL at random moments loses and duplicates nothing."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
import redis
from django.conf import settings as django_settings

from events.backlog import stream_lag
from events.models import Event
from mlxserve.bus import stream_append, stream_append_batch
from tests.factories import TEST_REDIS_URL, database_url, token_bodies

pytestmark = pytest.mark.django_db(transaction=True)

TOTAL = 200_000


def test_sigkill_at_random_moments_loses_and_duplicates_nothing(
    redis_client: redis.Redis, settings: Any
) -> None:
    rng = random.Random(20261126)
    bodies = token_bodies(TOTAL)
    # Workers' batches and the API's single entries, mixed.
    position = 0
    while position < TOTAL:
        if rng.random() < 0.9:
            stream_append_batch(redis_client, settings.EVENTS_STREAM, bodies[position : position + 500])
            position += 500
        else:
            stream_append(redis_client, settings.EVENTS_STREAM, bodies[position : position + 50])
            position += 50

    env = {
        **os.environ,
        "DATABASE_URL": database_url(),
        "REDIS_URL": TEST_REDIS_URL,
        "MLXSERVE_EVENTS_STREAM": settings.EVENTS_STREAM,
        "MLXSERVE_EVENTS_GROUP": settings.EVENTS_CONSUMER_GROUP,
        "MLXSERVE_CONFIG_KEY": settings.TELEMETRY_CONFIG_KEY,
    }
    command = [sys.executable, "manage.py", "ingest_events", "--consumer", "ingester-1", "--block-ms", "50"]
    for kill in range(5):
        process = subprocess.Popen(
            command,
            env=env,
            cwd=django_settings.BASE_DIR,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # Kill it once it has stored past a random mark: mid-stream, often mid-batch.
        mark = int(TOTAL * (kill + rng.uniform(0.2, 0.8)) / 6)
        deadline = time.monotonic() + 60
        while Event.objects.count() < mark and time.monotonic() < deadline:
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert Event.objects.count() < TOTAL, "killed before the end"
    finished = subprocess.run(
        [*command, "--exit-when-idle"],
        env=env,
        cwd=django_settings.BASE_DIR,
        capture_output=True,
        timeout=300,
    )
    assert finished.returncode == 0, finished.stderr.decode()[-2000:]
    assert Event.objects.count() == TOTAL
    assert Event.objects.values("id").distinct().count() == TOTAL
    assert (
        stream_lag(client=redis_client, stream=settings.EVENTS_STREAM, group=settings.EVENTS_CONSUMER_GROUP)[
            "pending"
        ]
        == 0
    )
