"""Posting events as a producer: bound to its own source, within its event budget, and
refused while the stream's backlog is past its limit (nothing kept in each case)."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from rest_framework.test import APIClient

from events.ingest import EventIngester
from tests.factories import make_envelope, stream_envelopes

pytestmark = pytest.mark.django_db

URL = "/api/events/"


def queued(redis_client: redis.Redis, settings: Any) -> list[str]:
    return [e["id"] for e in stream_envelopes(redis_client, settings.EVENTS_STREAM)]


@pytest.mark.parametrize("source", ["mac-studio-3", "mac-studio-3/worker-1", "mac-studio-3/a/b"])
def test_a_producer_posts_as_its_own_host_and_its_workers(
    producer_client: APIClient, redis_client: redis.Redis, settings: Any, source: str
) -> None:
    envelope = make_envelope(source=source)
    assert producer_client.post(URL, envelope, format="json").status_code == 202
    assert queued(redis_client, settings) == [envelope["id"]]


@pytest.mark.parametrize(
    "source", ["mac-studio-4/worker-1", "mac-studio-3x/worker-1", "mac-studio", "x/mac-studio-3"]
)
def test_a_producer_cannot_post_as_another_host(
    producer_client: APIClient, redis_client: redis.Redis, settings: Any, source: str
) -> None:
    response = producer_client.post(URL, make_envelope(source=source), format="json")
    assert response.status_code == 403
    assert response.json() == {
        "code": "Forbidden",
        "message": "Producer 'mac-studio-3' may only post events whose source is 'mac-studio-3' or "
        f"starts with 'mac-studio-3/'; this one's is '{source}'",
    }
    assert queued(redis_client, settings) == []


def test_in_a_batch_foreign_events_are_rejected_by_index_and_the_rest_accepted(
    producer_client: APIClient, redis_client: redis.Redis, settings: Any
) -> None:
    mine, foreign, also_mine = (
        make_envelope(source="mac-studio-3/w1"),
        make_envelope(source="mac-studio-4/w1"),
        make_envelope(source="mac-studio-3/w2"),
    )
    response = producer_client.post(URL, [mine, foreign, also_mine], format="json")
    assert response.status_code == 207
    assert response.json()["accepted"] == [mine["id"], also_mine["id"]]
    [rejected] = response.json()["rejected"]
    assert (rejected["index"], rejected["error"]["code"]) == (1, "Forbidden")
    assert queued(redis_client, settings) == [mine["id"], also_mine["id"]]


def test_staff_may_post_any_source(staff_client: APIClient) -> None:
    assert staff_client.post(URL, make_envelope(source="anything/at-all"), format="json").status_code == 202


def test_the_event_budget_counts_events_not_requests_and_keeps_nothing_of_a_post_over_it(
    producer_client: APIClient, staff_client: APIClient, redis_client: redis.Redis, settings: Any
) -> None:
    settings.PRODUCER_EVENT_RATE = "5/min"
    first = [make_envelope() for _ in range(3)]
    assert producer_client.post(URL, first, format="json").status_code == 207
    over = producer_client.post(URL, [make_envelope() for _ in range(3)], format="json")  # 6 > 5
    assert over.status_code == 429
    assert over.json()["code"] == "Throttled"
    assert over.json()["message"].startswith("Event budget of 5/min used up for this account")
    assert 1 <= int(over["Retry-After"]) <= 60
    assert queued(redis_client, settings) == [e["id"] for e in first]  # none of the refused post
    # Two more fit exactly; the one after does not. Another account has its own budget.
    assert producer_client.post(URL, [make_envelope(), make_envelope()], format="json").status_code == 207
    assert producer_client.post(URL, make_envelope(), format="json").status_code == 429
    assert staff_client.post(URL, make_envelope(), format="json").status_code == 202


def test_the_budget_is_shared_by_every_web_process(
    producer_client: APIClient, redis_client: redis.Redis, settings: Any
) -> None:
    # Another process of the same deployment has spent 4 of 5 this minute (the count lives in Redis).
    from events.intake import budget_spend

    settings.PRODUCER_EVENT_RATE = "5/min"
    budget_spend(client=redis_client, account="mac-studio-3", events=4, rate="5/min")
    assert producer_client.post(URL, [make_envelope(), make_envelope()], format="json").status_code == 429
    assert producer_client.post(URL, make_envelope(), format="json").status_code == 202


def test_past_the_backlog_limit_posts_get_503_until_the_ingester_catches_up(
    producer_client: APIClient, redis_client: redis.Redis, settings: Any
) -> None:
    settings.STREAM_BACKLOG_LIMIT = 3
    sent = [make_envelope() for _ in range(3)]
    for envelope in sent:
        assert producer_client.post(URL, envelope, format="json").status_code == 202
    refused = producer_client.post(URL, make_envelope(), format="json")
    assert refused.status_code == 503
    assert refused.json()["code"] == "Unavailable"
    assert "3 entries not yet stored" in refused.json()["message"]
    assert refused["Retry-After"] == "5"
    assert queued(redis_client, settings) == [e["id"] for e in sent]
    # The ingester stores the backlog; posts are accepted again.
    ingester = EventIngester(
        client=redis_client,
        stream=settings.EVENTS_STREAM,
        group=settings.EVENTS_CONSUMER_GROUP,
        consumer="c1",
        block_ms=10,
    )
    assert ingester.step().stored == 3
    assert producer_client.post(URL, make_envelope(), format="json").status_code == 202


def test_rates_read_as_drf_writes_them() -> None:
    from events.intake import parse_rate

    assert parse_rate("60000/min") == (60000, 60)
    assert parse_rate("10/s") == (10, 1)
    with pytest.raises(ValueError, match="A rate is N/s, N/min, N/hour or N/day"):
        parse_rate("lots")
