"""Every filter of the event list is served by an index in the list's own order: the database
reads the first page off the index, with no sort of the whole match and no backwards walk of
the time index filtered row by row (which grows with the table and with the events' age)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone

from events.filters import EventFilter
from events.history import in_event_order, tokens_matching
from events.models import Channel, EventRecord, TokenEvent
from events.partitions import partitions_ensure
from tests.factories import T0

pytestmark = pytest.mark.django_db

GENERATIONS = 120
TOKENS = 150
OLDEST = uuid.UUID(int=1)
MIDDLE = uuid.UUID(int=GENERATIONS // 2)


@pytest.fixture
def history() -> None:
    """18,000 token events in 120 generations over 12 models and 30 sources, then statistics, as
    autovacuum would keep them."""
    now = timezone.now()
    rows = []
    for g in range(1, GENERATIONS + 1):
        start = T0 + g * 60_000
        for seq in range(TOKENS):
            rows.append(
                EventRecord(
                    id=uuid.uuid4(),
                    type="tokenGenerated" if seq else "generationStarted",
                    timestamp=start + seq * 10,
                    source=f"mac-{g % 30}/worker-1",
                    generation_id=uuid.UUID(int=g),
                    seq=seq,
                    model=f"model-{g % 12}",
                    payload={"model": f"model-{g % 12}", "token": "t"},
                    ingested_at=now,
                )
            )
    rows.append(
        EventRecord(
            id=uuid.uuid4(),
            type="error",
            timestamp=T0 + 30,
            source="mac-1/worker-1",
            seq=0,
            model="model-1",
            payload={"error": "x"},
            ingested_at=now,
        )
    )
    EventRecord.objects.bulk_create(rows, batch_size=2000)
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {EventRecord._meta.db_table}")


FIRST_PAGES: dict[str, tuple[dict[str, str], set[str]]] = {
    # filter -> (query parameters, the indexes that may serve it)
    "oldest generation": ({"generationId": str(OLDEST)}, {"event_generation_time_seq"}),
    "a generation in the middle": ({"generationId": str(MIDDLE)}, {"event_generation_time_seq"}),
    "model": ({"model": "model-3"}, {"event_model_time_seq"}),
    "source": ({"source": "mac-7/worker-1"}, {"event_source_time_seq"}),
    "a rare type": ({"type": "error"}, {"event_type_time_seq"}),
    "time window": ({"since": str(T0 + 600_000), "until": str(T0 + 1_200_000)}, {"event_time_seq"}),
    "generation and type": (
        {"generationId": str(MIDDLE), "type": "tokenGenerated"},
        {"event_generation_time_seq"},
    ),
    "model and window": (
        {"model": "model-3", "since": str(T0 + 600_000)},
        {"event_model_time_seq", "event_time_seq"},
    ),
}


def first_page(params: dict[str, str]) -> Any:
    """The first page's query as the API builds it: filters, its order (ties by id), a row more."""
    records = EventFilter(params, queryset=EventRecord.objects.all()).qs
    return records.order_by("-timestamp", "-seq", "-id")[:101]


def root_index(name: str) -> str:
    """The table's index a partition's index belongs to (itself on a plain table)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT p.relname FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent "
            "WHERE i.inhrelid = %s::regclass",
            [name],
        )
        row = cursor.fetchone()
    return name if row is None else root_index(row[0])


def plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes += plan_nodes(child)
    return nodes


@pytest.mark.usefixtures("history")
@pytest.mark.parametrize("case", sorted(FIRST_PAGES))
def test_each_filter_reads_its_first_page_off_an_index_in_the_list_order(case: str) -> None:
    params, indexes = FIRST_PAGES[case]
    queryset = first_page(params)
    assert len(list(queryset)) > 0
    if connection.vendor == "postgresql":
        [plan] = json.loads(queryset.explain(format="json"))
        nodes = plan_nodes(plan["Plan"])
        kinds = [n["Node Type"] for n in nodes]
        # At most the ties on (timestamp, seq) are put in id order, a few rows at a time, as
        # the index hands them over.
        # A plain Sort only where the planner expects a handful of matches (a rare type): never
        # a sort of a large match.
        for node in nodes:
            if node["Node Type"] == "Sort":
                assert node["Plans"][0]["Plan Rows"] < 1000, node
        for node in nodes:
            if node["Node Type"] == "Incremental Sort":
                presorted = [key.split(".")[-1].strip('"') for key in node["Presorted Key"]]
                assert presorted == ["timestamp", "seq"], node
        # No table read whole, but an empty partition (a day with none of these events).
        assert all(n["Plan Rows"] <= 1 for n in nodes if n["Node Type"] == "Seq Scan"), kinds
        used = {root_index(n["Index Name"]) for n in nodes if "Index" in n["Node Type"]}
        assert used & indexes, (used, kinds)
    else:
        plan = queryset.explain()
        assert "USE TEMP B-TREE FOR ORDER BY" not in plan, plan
        assert any(f"INDEX {name}" in plan for name in indexes), plan


@pytest.fixture
def token_history() -> None:
    """18,000 token events in typed columns: 120 generations over 12 models and 30 sources, in
    their day's partition (made as the ingester makes it) on PostgreSQL."""
    partitions_ensure(now_ms=T0)
    now = timezone.now()
    channels = {
        (f"mac-{g % 30}/worker-1", f"model-{g % 12}"): Channel.objects.get_or_create(
            source=f"mac-{g % 30}/worker-1", model=f"model-{g % 12}"
        )[0].id
        for g in range(1, GENERATIONS + 1)
    }
    TokenEvent.objects.bulk_create(
        [
            TokenEvent(
                id=uuid.uuid4(),
                generation_id=uuid.UUID(int=g),
                timestamp=T0 + g * 60_000 + seq * 10,
                seq=seq,
                channel_id=channels[(f"mac-{g % 30}/worker-1", f"model-{g % 12}")],
                token="t",
                logprob=-0.5,
                ingested_at=now,
            )
            for g in range(1, GENERATIONS + 1)
            for seq in range(1, TOKENS)
        ],
        batch_size=2000,
    )
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {TokenEvent._meta.db_table}")


TOKEN_PAGES: dict[str, tuple[dict[str, str], set[str]]] = {
    "no filter": ({}, {"token_time"}),
    "oldest generation": ({"generationId": str(OLDEST)}, {"token_generation"}),
    "source": ({"source": "mac-7/worker-1"}, {"token_channel_time"}),
    "model": ({"model": "model-3"}, {"token_channel_time"}),
    "time window": ({"since": str(T0 + 600_000), "until": str(T0 + 1_200_000)}, {"token_time"}),
    "source and window": ({"source": "mac-7/worker-1", "since": str(T0 + 600_000)}, {"token_channel_time"}),
}


@pytest.mark.usefixtures("token_history")
@pytest.mark.parametrize("case", sorted(TOKEN_PAGES))
def test_each_filter_reads_its_first_page_of_token_events_off_an_index(case: str) -> None:
    params, indexes = TOKEN_PAGES[case]
    querysets = tokens_matching(params)
    assert querysets
    for tokens in querysets:
        page = in_event_order(tokens)[:101]
        assert len(list(page)) > 0
        if connection.vendor != "postgresql":
            plan = page.explain()
            assert any(f"INDEX {name}" in plan for name in indexes), plan
            continue
        [plan] = json.loads(page.explain(format="json"))
        nodes = plan_nodes(plan["Plan"])
        # Sorted only as the index hands the rows over (ties of a millisecond), or a handful.
        for node in nodes:
            if node["Node Type"] == "Sort":
                assert node["Plans"][0]["Plan Rows"] < 1000, node
        # No table read whole, but an empty partition (a day with none of these events) or the
        # (source, model) pairs the rows are joined to (a few hundred rows).
        read_whole = [
            (n["Relation Name"], n["Plan Rows"])
            for n in nodes
            if n["Node Type"] == "Seq Scan" and n["Plan Rows"] > 1 and n["Relation Name"] != "events_channel"
        ]
        assert not read_whole, read_whole
        used = {root_index(n["Index Name"]) for n in nodes if "Index" in n["Node Type"]}
        assert used & indexes, (used, [n["Node Type"] for n in nodes])
