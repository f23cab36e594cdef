"""The event list looks for a page in the day before where it starts (its cursor's time, or now)
and reads everything only when that day holds less than a page: the same pages either way, and
on PostgreSQL the busy case planned and run over the last days' partitions, not all of them."""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any

import msgspec
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from events.partitions import partitions_ensure, partitions_of
from events.storage import events_store
from tests.factories import make_envelope

pytestmark = pytest.mark.django_db

DAY = 86_400_000
URL = "/api/events/"


def store(envelopes: list[dict[str, Any]]) -> None:
    events_store([(f"{i}-0", msgspec.json.encode(e)) for i, e in enumerate(envelopes)])


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@pytest.fixture
def days_ending_now() -> list[tuple[int, int, str]]:
    """Ten days of partitions; 150 token events and 30 status events in the last hour (a busy
    fleet: the first page is in the last day), then 60 token events and 20 errors spread over
    the nine days before (sparse: pages there read past their day). The list's order of them."""
    now = now_ms()
    for day in range(10, -1, -1):
        partitions_ensure(now_ms=now - day * DAY)
    generation = str(uuid.uuid4())
    envelopes = [
        make_envelope(timestamp=now - 3_000_000 + i * 20_000, seq=i + 1, generationId=generation)
        for i in range(150)
    ]
    envelopes += [make_envelope("runtimeStatus", timestamp=now - 3_000_000 + i * 100_000) for i in range(30)]
    old = str(uuid.uuid4())
    envelopes += [
        make_envelope(timestamp=now - DAY - 3_600_000 - i * 12_000_000, seq=i + 1, generationId=old)
        for i in range(60)
    ]
    envelopes += [make_envelope("error", timestamp=now - 2 * DAY - i * 30_000_000) for i in range(20)]
    store(envelopes)
    return sorted(((e["timestamp"], e["seq"], e["id"]) for e in envelopes), reverse=True)


def keys(page: dict[str, Any]) -> list[tuple[int, int, str]]:
    return [(e["timestamp"], e["seq"], e["id"]) for e in page["results"]]


def test_pages_over_ten_days_ending_now_hold_every_event_once_in_order(
    reader_client: APIClient, days_ending_now: list[tuple[int, int, str]]
) -> None:
    pages, url = [], URL + "?limit=40"
    while url:
        body = reader_client.get(url).json()
        pages.append(body)
        url = body["next"]
    assert [key for page in pages for key in keys(page)] == days_ending_now
    assert len(pages) == 7  # 260 events, 40 a page
    # And back: each previous link gives the page before, from the oldest page to the first.
    for before, page in zip(pages[-2::-1], pages[:0:-1], strict=True):
        assert keys(reader_client.get(page["previous"]).json()) == keys(before)


def test_filtered_pages_are_the_filters_events_whichever_day_they_are_in(
    reader_client: APIClient, days_ending_now: list[tuple[int, int, str]]
) -> None:
    tokens = reader_client.get(URL, {"type": "tokenGenerated", "limit": "200"}).json()
    assert len(tokens["results"]) == 200 and tokens["next"]
    rest = reader_client.get(tokens["next"]).json()
    assert len(rest["results"]) == 10 and rest["next"] is None
    assert {e["type"] for e in tokens["results"] + rest["results"]} == {"tokenGenerated"}
    # No error in the last two days: the first page of errors is read past them, in order.
    errors = reader_client.get(URL, {"type": "error", "limit": "5"}).json()
    assert [e["type"] for e in errors["results"]] == ["error"] * 5
    assert keys(errors) == sorted(keys(errors), reverse=True)
    assert all(key[0] <= now_ms() - 2 * DAY for key in keys(errors))
    every_error = reader_client.get(URL, {"type": "error", "limit": "1000"}).json()
    assert len(every_error["results"]) == 20 and keys(every_error)[:5] == keys(errors)


@pytest.mark.parametrize("timestamp", [-(2**63), 2**63 - 1])
@pytest.mark.parametrize("backwards", [False, True])
def test_a_cursor_at_either_end_of_time_is_answered(
    reader_client: APIClient, days_ending_now: list[tuple[int, int, str]], timestamp: int, backwards: bool
) -> None:
    position = f"p={timestamp}_0_{uuid.UUID(int=0).hex}" + ("&r=1" if backwards else "")
    cursor = base64.b64encode(position.encode()).decode()
    response = reader_client.get(URL, {"cursor": cursor, "limit": "1000"})
    assert response.status_code == 200, response.content
    everything = (timestamp > 0) != backwards  # older than the end of time, or newer than its start
    assert len(response.json()["results"]) == (len(days_ending_now) if everything else 0)


def test_the_first_page_of_a_busy_fleet_reads_only_the_last_days_partitions(
    reader_client: APIClient, days_ending_now: list[tuple[int, int, str]]
) -> None:
    with CaptureQueriesContext(connection) as queries:
        page = reader_client.get(URL, {"limit": "100"}).json()
    assert keys(page) == days_ending_now[:100]
    if connection.vendor != "postgresql":
        return  # SQLite keeps one table: nothing to prune, the page is all there is to see
    reads = [
        q["sql"] for q in queries.captured_queries if "events_token" in q["sql"] and "SELECT" in q["sql"]
    ]
    assert len(reads) == 1  # the last day held the page: nothing read a second time
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN (FORMAT JSON) " + reads[0])
        plan = cursor.fetchone()[0]
    scanned = set()

    def walk(node: dict[str, Any]) -> None:
        if "Relation Name" in node:
            scanned.add(node["Relation Name"])
        for child in node.get("Plans", []):
            walk(child)

    walk((json.loads(plan) if isinstance(plan, str) else plan)[0]["Plan"])
    token_partitions = {p.name for p in partitions_of("events_token")}
    assert scanned & token_partitions, scanned
    older = {
        p.name for p in partitions_of("events_token") if p.upper is not None and p.upper < now_ms() - 2 * DAY
    }
    assert len(older) >= 8 and not scanned & older, scanned


@pytest.mark.parametrize("backwards", [False, True])
def test_a_window_in_the_past_looks_for_its_page_where_the_window_is(
    reader_client: APIClient, days_ending_now: list[tuple[int, int, str]], backwards: bool
) -> None:
    """``until`` days back (or, oldest first, ``since``): the page is looked for in the day before
    ``until`` (after ``since``), where the filters' rows are, not in the day before now."""
    until = days_ending_now[-1][0] + 5 * DAY if backwards else now_ms() - DAY - 3_600_000
    window = [key for key in days_ending_now if key[0] <= until]
    query = {"until": str(until), "limit": "5"}
    if backwards:  # a previous page from days before the window: its oldest rows after ``since``
        since = window[-1][0]
        start = f"p={since - 5 * DAY}_0_{uuid.UUID(int=0).hex}&r=1"
        query = {"since": str(since), "until": str(until), "limit": "5"}
        query["cursor"] = base64.b64encode(start.encode()).decode()
    with CaptureQueriesContext(connection) as queries:
        page = reader_client.get(URL, query).json()
    assert keys(page) == (window[-5:] if backwards else window[:5])
    reads = [q for q in queries.captured_queries if "events_token" in q["sql"] and "SELECT" in q["sql"]]
    # PostgreSQL: the day by the window held the page, so the token events were read once;
    # SQLite reads everything at once, as it always does.
    assert len(reads) == 1
