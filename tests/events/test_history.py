"""Answering questions from history: stats over a window, the NDJSON export, the prompt policy."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from typing import Any

import msgspec
import pytest
from django.db import connection
from rest_framework.test import APIClient

from events.models import Event, Generation, PromptPolicy
from events.privacy import HASH_PREFIX, prompt_redact
from events.storage import events_store
from tests.factories import T0, generation, make_envelope

pytestmark = pytest.mark.django_db


def store(envelopes: list[dict[str, Any]]) -> None:
    events_store([(f"{i}-0", msgspec.json.encode(e)) for i, e in enumerate(envelopes)])


def test_stats_count_by_type_and_model_and_give_percentiles(reader_client: APIClient) -> None:
    events = []
    for i, ttft in enumerate([100, 200, 300, 400, 500]):
        events += generation(start=T0 + i * 10_000, ttft=ttft, tokens=4, throughput=float(10 * (i + 1)))
    events += generation(start=T0 + 60_000, ttft=50, tokens=2, model="qwen")
    events.append(make_envelope("error", timestamp=T0 + 1000, generationId=None))
    events.append(make_envelope("tokenGenerated", timestamp=T0 + 10_000_000))  # outside the window
    store(events)

    body = reader_client.get(f"/api/stats/?since={T0}&until={T0 + 120_000}").json()
    assert body["events"]["byType"] == {
        "generationStarted": 6,
        "tokenGenerated": 22,
        "generationCompleted": 6,
        "error": 1,
    }
    assert body["events"]["total"] == 35
    assert body["events"]["byModel"] == {"llama-3-8b": 30, "qwen": 4, "nope": 1}
    assert body["generations"] == {"started": 6, "completed": 6, "errors": 1}
    assert body["timeToFirstTokenMs"]["count"] == 6
    # TTFTs 50, 100, ..., 500: the median sits between 200 and 300.
    assert body["timeToFirstTokenMs"]["p50"] == 250.0
    assert body["timeToFirstTokenMs"]["p99"] == pytest.approx(495.0)
    # Throughputs 10..50, and qwen, which sends none: the token after the first over its 70 ms, 14.29/s.
    assert body["tokensPerSecond"]["p50"] == pytest.approx((20 + 30) / 2, abs=1e-3)
    assert body["tokensPerSecond"]["fleet"] == pytest.approx(22 / 120, abs=1e-3)

    only_qwen = reader_client.get(f"/api/stats/?since={T0}&until={T0 + 120_000}&model=qwen").json()
    assert only_qwen["events"]["total"] == 4
    assert only_qwen["timeToFirstTokenMs"]["p50"] == 50.0


def test_stats_of_an_empty_window_say_so(reader_client: APIClient) -> None:
    body = reader_client.get("/api/stats/").json()
    assert body["events"]["total"] == 0
    assert body["until"] - body["since"] == 3_600_000
    assert body["timeToFirstTokenMs"] == {"count": 0, "p50": None, "p95": None, "p99": None}


@pytest.mark.parametrize(
    ("query", "field"),
    [("since=abc", "since"), ("since=10&until=5", "since"), ("until=-1", "until")],
)
def test_bad_stats_windows_get_the_error_object(reader_client: APIClient, query: str, field: str) -> None:
    response = reader_client.get(f"/api/stats/?{query}")
    assert response.status_code == 400
    assert response.json()["code"] == "InvalidParams"
    assert response.json()["details"]["issues"][0]["path"][0] == field


def test_the_export_streams_a_time_range_as_ndjson_oldest_first(reader_client: APIClient) -> None:
    # Several events share a millisecond: the keyset must neither skip nor repeat one.
    events = [make_envelope("tokenGenerated", timestamp=T0 + i // 3, seq=i) for i in range(5000)]
    events.append(make_envelope("tokenGenerated", timestamp=T0 + 99_999))  # after until
    store(events)
    response = reader_client.get(f"/api/events/export/?since={T0}&until={T0 + 50_000}")
    assert response.status_code == 200
    assert response["Content-Type"] == "application/x-ndjson"
    assert response.streaming
    chunks = list(response.streaming_content)  # type: ignore[attr-defined]
    assert len(chunks) == 3  # read 2,000 rows at a time, never all at once
    lines = b"".join(chunks).decode().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["id"] for r in rows] == [e["id"] for e in events[:5000]]
    assert rows[0] == {**events[0], "ingestedAt": rows[0]["ingestedAt"]}


def test_the_export_takes_the_list_filters_and_needs_since(reader_client: APIClient) -> None:
    store([make_envelope("tokenGenerated", timestamp=T0), make_envelope("error", timestamp=T0 + 1)])
    export = reader_client.get(f"/api/events/export/?since={T0}&type=error")
    lines = b"".join(export.streaming_content).splitlines()  # type: ignore[attr-defined]
    assert [json.loads(line)["type"] for line in lines] == ["error"]
    response = reader_client.get("/api/events/export/")
    assert response.status_code == 400
    assert response.json()["details"]["issues"][0]["path"] == ["since"]


def policy(mode: str, chars: int = 5) -> PromptPolicy:
    PromptPolicy.objects.update_or_create(pk=1, defaults={"mode": mode, "truncate_chars": chars})
    return PromptPolicy.objects.get(pk=1)


@pytest.mark.parametrize(
    ("mode", "prompt", "stored"),
    [
        ("keep", "My name is Ada Lovelace", "My name is Ada Lovelace"),
        ("truncate", "My name is Ada Lovelace", "My na"),
        ("truncate", "Hi", "Hi"),
        ("truncate", {"messages": [{"role": "user", "content": "x"}]}, '{"mes'),
        ("drop", "My name is Ada Lovelace", ""),
        ("keep", {"messages": []}, {"messages": []}),
    ],
)
def test_the_prompt_policy_is_applied_at_ingest(mode: str, prompt: Any, stored: Any) -> None:
    policy(mode)
    envelope = make_envelope("generationStarted", payload={"model": "m", "prompt": prompt, "maxTokens": 3})
    store([envelope])
    assert Event.objects.get(pk=envelope["id"]).payload == {"model": "m", "prompt": stored, "maxTokens": 3}


def test_hashing_keeps_no_text_but_matches_equal_prompts() -> None:
    current = policy("hash")
    first, second, other = (
        make_envelope("generationStarted", payload={"model": "m", "prompt": p})
        for p in ("call me at 555-0100", "call me at 555-0100", "something else")
    )
    store([first, second, other])
    stored = {e["id"]: Event.objects.get(pk=e["id"]).payload["prompt"] for e in (first, second, other)}
    assert stored[first["id"]] == stored[second["id"]] != stored[other["id"]]
    # Only the prefix and a hex digest: no character of the text (a digest may well contain "555").
    assert re.fullmatch(re.escape(HASH_PREFIX) + "[0-9a-f]{64}", stored[first["id"]])
    assert stored[first["id"]] == prompt_redact("call me at 555-0100", current)


def test_prompt_hashes_follow_their_own_key_not_the_secret_key(settings: Any) -> None:
    """Rotating SECRET_KEY (sessions) leaves hashes alone; hosts sharing MLXSERVE_PROMPT_HASH_KEY agree."""
    current = policy("hash")
    settings.PROMPT_HASH_KEY = "fleet-wide-prompt-key"
    settings.SECRET_KEY = "one-secret-key"
    before = prompt_redact("call me at 555-0100", current)
    settings.SECRET_KEY = "a-rotated-secret-key"
    assert prompt_redact("call me at 555-0100", current) == before
    settings.PROMPT_HASH_KEY = "another-deployment"
    assert prompt_redact("call me at 555-0100", current) != before
    # The hash is hmac-sha256 over the prompt, keyed from MLXSERVE_PROMPT_HASH_KEY (Django's salted_hmac).
    key = hashlib.sha256(b"mlxserve.prompt" + b"another-deployment").digest()
    expected = hmac.new(key, b"call me at 555-0100", hashlib.sha256).hexdigest()
    assert prompt_redact("call me at 555-0100", current) == HASH_PREFIX + expected


def test_the_default_policy_hashes(operator_client: APIClient, any_model_served: object) -> None:
    from events.models import RegisteredModel

    RegisteredModel.objects.create(name="demo", path="/models/demo")
    assert PromptPolicy.objects.get(pk=1).mode == "hash"
    response = operator_client.post(
        "/api/generations/",
        data=json.dumps({"model": "demo", "prompt": "my secret", "maxTokens": 2}),
        content_type="application/json",
    )
    assert response.status_code == 202
    recorded = Generation.objects.get(pk=response.json()["generationId"])
    assert recorded.prompt.startswith(HASH_PREFIX)


def test_a_generations_rows_are_read_by_prepared_statements_on_generic_plans(
    reader_client: APIClient,
) -> None:
    """On PostgreSQL a generation's rows (no time bound: every daily partition) are read by
    prepared statements on generic plans, planned once a connection; nothing else is prepared,
    so the connection's ``force_generic_plan`` changes no other query's plan."""
    events = generation(start=T0, ttft=100, tokens=20)
    store(events)
    gid = events[0]["generationId"]
    for _ in range(3):
        body = reader_client.get(f"/api/generations/{gid}/").json()
        assert [e["id"] for e in body["events"]] == [e["id"] for e in events]
        listed = reader_client.get(f"/api/events/?generationId={gid}&limit=5").json()["results"]
        assert [e["id"] for e in listed] == [e["id"] for e in events[::-1][:5]]
    assert reader_client.get("/api/events/?limit=5").status_code == 200
    if connection.vendor != "postgresql":
        return  # SQLite plans every query anew, cheaply: the ORM reads them
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements")
        prepared = cursor.fetchall()
    # The generation view's two tables and its own row, and the list's (generation filter, page
    # size 5): each run three times, each time on its generic plan.
    assert len(prepared) == 5, prepared
    assert all(generic == 3 and custom == 0 for _, generic, custom in prepared), prepared
    by_generation = [sql for sql, _, _ in prepared if '"generation_id" =' in sql]
    assert len(by_generation) == 4
    assert [sql for sql, _, _ in prepared if '"events_generation"."id" =' in sql]


def test_the_generation_view_shows_the_generations_own_row_read_with_its_events(
    reader_client: APIClient,
) -> None:
    """The model asked for and when, from the generation's row (read in the events' round trip);
    a generation with no events yet is shown queued, one with no row from its events."""
    events = generation(start=T0, ttft=100, tokens=3)
    store(events)
    gid = events[0]["generationId"]
    row = Generation.objects.create(id=gid, model="as-asked", prompt="p", max_tokens=3)
    body = reader_client.get(f"/api/generations/{gid}/").json()
    assert body["model"] == "as-asked"
    assert body["createdAt"] == msgspec.json.encode(row.created_at).decode().strip('"')
    assert body["createdAt"].endswith("Z") and len(body["events"]) == len(events)
    queued = Generation.objects.create(id=events[0]["id"], model="later", prompt="p", max_tokens=3)
    body = reader_client.get(f"/api/generations/{queued.id}/").json()
    assert (body["state"], body["model"], body["events"]) == ("queued", "later", [])
    Generation.objects.filter(pk=gid).delete()
    body = reader_client.get(f"/api/generations/{gid}/").json()
    assert body["createdAt"] is None and body["model"] == events[0]["payload"]["model"]
