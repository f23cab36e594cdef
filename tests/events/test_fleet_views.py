"""The admin as a place to look at the fleet: the index answers "is the fleet healthy", the
workers page says which worker is quiet, slow or failing, without reading JSON."""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import msgspec
import pytest
from django.contrib.auth.models import User
from django.test import Client

from events.models import DeadLetter, SourceMinute, Worker
from events.selectors import fleet_overview, workers_activity
from events.storage import events_store
from tests.factories import make_envelope

pytestmark = pytest.mark.django_db

MINUTE = 60_000


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def store(envelopes: list[dict[str, Any]], prefix: str = "1") -> None:
    events_store([(f"{prefix}-{i}", msgspec.json.encode(e)) for i, e in enumerate(envelopes)])


def fleet(now: int) -> list[dict[str, Any]]:
    """A busy healthy worker (tokens in the last three minutes, an error), a quiet stale one."""
    current = now - now % MINUTE
    busy = "mac-studio-1/worker-1"
    gid = str(uuid.uuid4())
    events = [
        make_envelope(
            "tokenGenerated", source=busy, generationId=gid, seq=i + 1, timestamp=current - m * MINUTE + i
        )
        for m, count in ((1, 120), (2, 60), (3, 30))
        for i in range(count)
    ]
    events.append(
        make_envelope(
            "error",
            source=busy,
            timestamp=current - 2 * MINUTE,
            generationId=None,
            payload={"error": "Metal ran out of memory", "code": "OOM", "model": "llama"},
        )
    )
    events.append(make_envelope("runtimeStatus", source=busy, timestamp=current - 5, generationId=None))
    events.append(
        make_envelope(
            "runtimeStatus", source="mac-mini-7/worker-1", timestamp=now - 3_600_000, generationId=None
        )
    )
    return events


@pytest.fixture
def staff(client: Client) -> Client:
    User.objects.create_user("ada", password="ada-pass-123", is_staff=True, is_superuser=True)
    client.login(username="ada", password="ada-pass-123")
    return client


def test_each_source_minute_counts_tokens_and_errors_once_whatever_is_redelivered() -> None:
    now = now_ms()
    events = fleet(now)
    store(events)
    store(events, prefix="again")  # redelivered: nothing counts twice
    activity = workers_activity(now_ms=now)
    busy = activity["mac-studio-1/worker-1"]
    assert busy.per_minute[-3:] == [30, 60, 120]
    # The last 60 s: none yet in the minute under way, and the part of the one before still in them.
    assert busy.tokens_per_second_last_minute == pytest.approx(120 * (1 - busy.current_fraction) / 60)
    assert busy.tokens_per_second_last_hour == pytest.approx(210 / 3600)
    assert busy.errors_last_hour == 1
    assert sum(SourceMinute.objects.values_list("events", flat=True)) == len(events)


def test_the_index_opens_on_the_fleet(staff: Client) -> None:
    now = now_ms()
    store(fleet(now))
    DeadLetter.objects.create(stream_id="1-0", body="{}", error={"code": "InvalidParams", "message": "x"})
    page = staff.get("/admin/").content.decode()
    panel = page.split('id="fleet-overview"', 1)[1].split("</div>\n</div>", 1)[0]
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", panel))
    assert "2 workers: 2 ready" in text
    assert "1 stale (silent for three heartbeats)" in text
    assert re.search(r"\d+\.\d tokens/s, last minute \(0\.1 over the hour\)", text), text
    assert "1 errors, last hour" in text
    assert "1 dead letters waiting" in text
    assert "ingest lag" in text
    assert "mac-mini-7/worker-1" in text  # the stale one is named, linked
    assert "mlxserve · " in page  # the site is named after the deployment


def test_the_index_says_so_when_redis_does_not_answer(settings: Any) -> None:
    def down() -> dict[str, int]:
        raise ConnectionError("no Redis")

    assert fleet_overview(lag=down).ingest_lag is None


def test_the_workers_page_warns_of_stale_workers_only(staff: Client) -> None:
    now = now_ms()
    store(fleet(now))
    page = staff.get("/admin/events/worker/").content.decode()
    rows = {
        source: row
        for row in re.findall(r"<tr[^>]*>(.*?)</tr>", page, re.DOTALL)
        for source in ("mac-studio-1/worker-1", "mac-mini-7/worker-1")
        if source in row
    }

    def stale_cell(row: str) -> str:
        return re.search(r'<td class="field-stale_warning">(.*?)</td>', row, re.DOTALL).group(1)  # type: ignore[union-attr]

    assert stale_cell(rows["mac-studio-1/worker-1"]) == "-"  # nothing to warn of
    assert "&#9888; stale" in stale_cell(rows["mac-mini-7/worker-1"])
    assert "silent for 1h 0m" in stale_cell(rows["mac-mini-7/worker-1"])
    assert "icon-no.svg" not in page  # no red cross for a healthy worker
    busy = rows["mac-studio-1/worker-1"]
    assert 'class="mlx-spark"' in busy and "210 tokens in the last hour" in busy
    assert "OOM: Metal ran out of memory" in busy
    assert "/admin/events/event/?source=mac-studio-1%2Fworker-1" in busy
    assert Worker.objects.get(source="mac-studio-1/worker-1").last_error == "OOM: Metal ran out of memory"


def test_tokens_per_second_of_the_last_minute_slide_with_the_clock() -> None:
    from events.selectors import WorkerActivity

    half = WorkerActivity(per_minute=[0] * 59 + [60], errors_last_hour=0, current=30, current_fraction=0.5)
    assert half.tokens_per_second_last_minute == 1.0  # 30 now, and half of the 60 before
    start = WorkerActivity(per_minute=[0] * 59 + [120], errors_last_hour=0, current=0, current_fraction=0.0)
    assert start.tokens_per_second_last_minute == 2.0


@pytest.mark.parametrize(("said", "kept"), [(3, 3), (-1, None), (2**63, None), ("3", None), (True, None)])
def test_a_worker_s_config_version_is_kept_only_when_it_is_one(said: Any, kept: int | None) -> None:
    store(
        [
            make_envelope(
                "runtimeStatus",
                source="mac-1/w1",
                timestamp=now_ms(),
                generationId=None,
                payload={"status": "ready", "modelsLoaded": 0, "metadata": {"configVersion": said}},
            )
        ]
    )
    assert Worker.objects.get(source="mac-1/w1").config_version == kept


def test_the_config_page_explains_each_field_and_shows_the_rollout(staff: Client) -> None:
    from telemetry.services import telemetry_config_get

    version = telemetry_config_get().version
    now = now_ms()
    for source, runs in (("mac-1/w1", version), ("mac-2/w1", version - 1 if version else None)):
        metadata = {} if runs is None else {"configVersion": runs}
        store(
            [
                make_envelope(
                    "runtimeStatus",
                    source=source,
                    timestamp=now,
                    generationId=None,
                    payload={"status": "ready", "modelsLoaded": 0, "metadata": metadata},
                )
            ],
            prefix=source,
        )
    page = staff.get("/admin/telemetry/telemetryconfig/", follow=True).content.decode()
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page))
    assert "The port each worker serves its Prometheus metrics on (/metrics)" in text
    assert "From 1024 to 65535. Default 9464." in text
    assert "From 1000 to 600000. Default 60000." in text
    assert "1 to 100 characters. Service name must be alphanumeric with hyphens/underscores." in text
    assert f"Rollout of version {version}" in text
    assert "1 of 2 live workers run it." in text
    assert "Not yet: mac-2/w1 : has not said which version it runs" in text
