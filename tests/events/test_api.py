from __future__ import annotations

import json
import uuid
from typing import Any

import msgspec
import pytest
import redis
from rest_framework.test import APIClient

from events.storage import events_store
from tests.factories import T0, make_envelope, stream_envelopes

pytestmark = pytest.mark.django_db

URL = "/api/events/"


def post(client: APIClient, body: Any) -> Any:
    return client.post(URL, data=json.dumps(body), content_type="application/json")


def stream_bodies(redis_client: redis.Redis, stream: str) -> list[dict[str, Any]]:
    return stream_envelopes(redis_client, stream)


def store(*envelopes: dict[str, Any]) -> None:
    events_store([(f"{i}-0", msgspec.json.encode(e)) for i, e in enumerate(envelopes)])


def test_one_envelope_is_accepted_once_redis_has_it(
    producer_client: APIClient, redis_client: redis.Redis, settings: Any
) -> None:
    envelope = make_envelope("tokenGenerated")
    response = post(producer_client, envelope)
    assert response.status_code == 202
    assert response.json() == {"id": envelope["id"]}
    assert stream_bodies(redis_client, settings.EVENTS_STREAM) == [envelope]


def test_an_invalid_envelope_gets_400_with_the_error_object_and_is_not_queued(
    producer_client: APIClient, redis_client: redis.Redis, settings: Any
) -> None:
    response = post(
        producer_client,
        make_envelope("generationStarted", payload={"model": "m", "prompt": "p", "maxTokens": 0}),
    )
    assert response.status_code == 400
    assert response.json() == {
        "code": "InvalidParams",
        "message": "Validation error on field 'payload.maxTokens': Must be a positive integer",
        "details": {
            "field": "payload.maxTokens",
            "issues": [
                {
                    "path": ["payload", "maxTokens"],
                    "message": "Must be a positive integer",
                    "code": "too_small",
                }
            ],
        },
    }
    assert redis_client.xlen(settings.EVENTS_STREAM) == 0


def test_a_mixed_batch_keeps_the_valid_ones(
    producer_client: APIClient, redis_client: redis.Redis, settings: Any
) -> None:
    good_a, good_b = make_envelope("modelLoaded"), make_envelope("runtimeStatus")
    bad = make_envelope("tokenGenerated", seq=-1)
    response = post(producer_client, [good_a, bad, good_b, "nonsense"])
    assert response.status_code == 207
    body = response.json()
    assert body["accepted"] == [good_a["id"], good_b["id"]]
    assert [r["index"] for r in body["rejected"]] == [1, 3]
    assert body["rejected"][0]["error"]["details"]["field"] == "seq"
    assert body["rejected"][1]["error"]["message"] == "Validation error on field 'root': Must be an object"
    assert stream_bodies(redis_client, settings.EVENTS_STREAM) == [good_a, good_b]


def test_an_all_bad_batch_is_still_207_and_queues_nothing(
    producer_client: APIClient, redis_client: redis.Redis, settings: Any
) -> None:
    response = post(producer_client, [{"type": "x"}])
    assert response.status_code == 207
    assert response.json()["accepted"] == []
    assert redis_client.xlen(settings.EVENTS_STREAM) == 0


@pytest.mark.parametrize("body", ["42", '"text"', "null", "true"])
def test_a_body_that_is_neither_object_nor_array_gets_400(producer_client: APIClient, body: str) -> None:
    response = producer_client.post(URL, data=body, content_type="application/json")
    assert response.status_code == 400
    assert response.json()["code"] == "InvalidParams"


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_in_the_json_text_get_400(producer_client: APIClient, literal: str) -> None:
    text = json.dumps(make_envelope("tokenGenerated")).replace('"logprob": -0.5', f'"logprob": {literal}')
    assert literal in text
    response = producer_client.post(URL, data=text, content_type="application/json")
    assert response.status_code == 400
    assert response.json()["details"]["issues"][0]["code"] == "invalid_json"


def test_a_number_too_large_for_a_double_gets_400(producer_client: APIClient) -> None:
    text = json.dumps(make_envelope("tokenGenerated")).replace('"logprob": -0.5', '"logprob": 1e999')
    response = producer_client.post(URL, data=text, content_type="application/json")
    assert response.status_code == 400


def test_a_body_over_the_limit_gets_413_and_is_not_queued(
    producer_client: APIClient, redis_client: redis.Redis, settings: Any
) -> None:
    big = make_envelope("generationStarted", payload={"model": "m", "prompt": "x" * (1024 * 1024)})
    response = post(producer_client, big)
    assert response.status_code == 413
    assert response.json()["code"] == "PayloadTooLarge"
    assert redis_client.xlen(settings.EVENTS_STREAM) == 0


def test_who_may_post(
    anon_client: APIClient, reader_client: APIClient, staff_client: APIClient, producer_client: APIClient
) -> None:
    assert post(anon_client, make_envelope()).status_code == 401
    assert post(reader_client, make_envelope()).status_code == 403
    assert post(staff_client, make_envelope()).status_code == 202
    assert post(producer_client, make_envelope()).status_code == 202


def test_who_may_read(anon_client: APIClient, reader_client: APIClient, producer_client: APIClient) -> None:
    assert anon_client.get(URL).status_code == 401
    assert anon_client.get(URL).json()["code"] == "Unauthorized"
    assert producer_client.get(URL).status_code == 403
    assert reader_client.get(URL).status_code == 200
    envelope = make_envelope("error")
    store(envelope)
    assert anon_client.get(f"{URL}{envelope['id']}/").status_code == 401
    assert producer_client.get(f"{URL}{envelope['id']}/").status_code == 403


def test_a_redis_outage_gets_503_and_nothing_is_claimed_accepted(
    producer_client: APIClient, settings: Any
) -> None:
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    response = post(producer_client, make_envelope())
    assert response.status_code == 503
    assert response.json()["code"] == "Unavailable"


def test_an_event_reads_back_once_stored(reader_client: APIClient) -> None:
    envelope = make_envelope("tokenGenerated")
    assert reader_client.get(f"{URL}{envelope['id']}/").status_code == 404
    store(envelope)
    body = reader_client.get(f"{URL}{envelope['id']}/").json()
    assert {k: body[k] for k in envelope} == envelope
    assert "ingestedAt" in body
    assert reader_client.get(f"{URL}not-a-uuid/").status_code == 404


def test_the_list_is_newest_first_and_filters_combine(reader_client: APIClient) -> None:
    generation = str(uuid.uuid4())
    events = [
        make_envelope("generationStarted", timestamp=T0 + 1000, generationId=generation, source="host-a/w1"),
        make_envelope(
            "tokenGenerated", timestamp=T0 + 2000, generationId=generation, seq=1, source="host-a/w1"
        ),
        make_envelope(
            "tokenGenerated",
            timestamp=T0 + 3000,
            seq=1,
            source="host-b/w1",
            payload={"model": "qwen", "token": "x"},
        ),
        make_envelope("error", timestamp=T0 + 4000, source="host-b/w1"),
    ]
    store(*events)

    def ids(query: str) -> list[str]:
        response = reader_client.get(URL + query)
        assert response.status_code == 200, response.json()
        return [e["id"] for e in response.json()["results"]]

    assert ids("") == [e["id"] for e in reversed(events)]
    assert ids("?type=tokenGenerated") == [events[2]["id"], events[1]["id"]]
    assert ids("?model=qwen") == [events[2]["id"]]
    assert ids("?model=llama-3-8b&type=tokenGenerated") == [events[1]["id"]]
    assert ids("?source=host-b/w1") == [events[3]["id"], events[2]["id"]]
    assert ids(f"?generationId={generation}") == [events[1]["id"], events[0]["id"]]
    assert ids(f"?since={T0 + 2000}&until={T0 + 3000}") == [events[2]["id"], events[1]["id"]]
    assert ids(f"?since={T0 + 2001}") == [events[3]["id"], events[2]["id"]]
    assert ids(f"?until={T0 + 999}") == []


@pytest.mark.parametrize("query", ["?type=nope", "?since=abc", "?until=1.5", "?generationId=xyz"])
def test_bad_filters_get_400_with_the_error_object(reader_client: APIClient, query: str) -> None:
    response = reader_client.get(URL + query)
    assert response.status_code == 400
    assert response.json()["code"] == "InvalidParams"


def test_cursor_pages_stay_stable_while_events_arrive(reader_client: APIClient) -> None:
    store(*[make_envelope("runtimeStatus", timestamp=T0 + 1000 + i) for i in range(5)])
    first = reader_client.get(URL + "?limit=2").json()
    assert [e["timestamp"] for e in first["results"]] == [T0 + 1004, T0 + 1003]
    store(make_envelope("runtimeStatus", timestamp=T0 + 5000))  # a newer event arrives meanwhile
    second = reader_client.get(first["next"]).json()
    assert [e["timestamp"] for e in second["results"]] == [T0 + 1002, T0 + 1001]
    third = reader_client.get(second["next"]).json()
    assert [e["timestamp"] for e in third["results"]] == [T0 + 1000]
    assert third["next"] is None


def test_the_openapi_schema_is_valid_and_complete() -> None:
    from django.core.management import call_command

    # --fail-on-warn: every endpoint's request and responses are described, and the
    # schema validates against the OpenAPI 3 specification.
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", "/dev/null")


def test_the_openapi_schema_and_docs_are_served(anon_client: APIClient) -> None:
    schema = anon_client.get("/api/schema/?format=json")
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    assert {"/api/events/", "/api/events/{id}/", "/api/telemetry/config/"} <= set(paths)
    assert anon_client.get("/api/docs/").status_code == 200


def test_workers_go_stale_after_three_missed_heartbeats(reader_client: APIClient) -> None:
    import time

    from events.models import Worker
    from telemetry.services import telemetry_config_patch

    telemetry_config_patch(data={"exportIntervalMs": 1000}, user=None, via="api")
    now = time.time_ns() // 1_000_000
    Worker.objects.create(source="fresh/w", status="ready", last_heard_at=now - 2500)
    Worker.objects.create(source="silent/w", status="busy", last_heard_at=now - 3500)
    workers = {w["source"]: w for w in reader_client.get("/api/workers/").json()["results"]}
    assert workers["fresh/w"]["stale"] is False
    assert workers["silent/w"]["stale"] is True
    assert workers["silent/w"]["status"] == "busy"


def test_a_lone_surrogate_escape_gets_400(producer_client: APIClient) -> None:
    text = json.dumps(make_envelope("tokenGenerated")).replace('"Hello"', '"\\ud800"')
    response = producer_client.post(URL, data=text, content_type="application/json")
    assert response.status_code == 400


def test_attempts_sharing_a_millisecond_are_told_apart_by_seq(reader_client: APIClient) -> None:
    generation = str(uuid.uuid4())

    def event(
        event_type: str, seq: int, ts: int, attempt: int | None = None, **payload: Any
    ) -> dict[str, Any]:
        base: dict[str, Any] = {"model": "m", **payload}
        if attempt is not None:
            base["metadata"] = {"attempt": attempt}
        return make_envelope(event_type, generationId=generation, seq=seq, timestamp=T0 + ts, payload=base)

    store(
        event("generationStarted", 0, 1000, attempt=1, prompt="p"),
        event("tokenGenerated", 1, 1001, token="a"),
        event("tokenGenerated", 2, 1002, token="b"),
        event("generationStarted", 0, 1002, attempt=2, prompt="p"),  # same ms as attempt 1's last token
        event("generationCompleted", 3, 1002, tokensGenerated=2, durationMs=2),
        event("tokenGenerated", 1, 1003, token="c"),
        event("generationCompleted", 2, 1004, tokensGenerated=1, durationMs=2),
    )
    detail = reader_client.get(f"/api/generations/{generation}/").json()
    assert [(a["attempt"], a["state"], a["text"]) for a in detail["attempts"]] == [
        (1, "completed", "ab"),
        (2, "completed", "c"),
    ]
    assert detail["text"] == "c" and detail["attempt"] == 2


def follow(client: APIClient, url: str, link: str = "next") -> list[dict[str, Any]]:
    pages, seen = [], 0
    while url:
        page = client.get(url).json()
        pages.append(page)
        url = page[link]
        seen += 1
        assert seen < 100, "the links loop"
    return pages


def test_following_next_visits_every_event_once_in_order_whatever_the_ties(reader_client: APIClient) -> None:
    # 2,500 events of one timestamp (DRF's offset cursor repeated page 2 for ever past 1,000),
    # many of them also sharing a seq, beside a few of other times.
    tied = [make_envelope("runtimeStatus", timestamp=T0 + 5_000, seq=i % 7) for i in range(2_500)]
    others = [make_envelope("runtimeStatus", timestamp=T0 + t, seq=0) for t in (4_000, 6_000)]
    store(*tied, *others)
    pages = follow(reader_client, URL + "?limit=1000")
    ids = [e["id"] for page in pages for e in page["results"]]
    assert [len(page["results"]) for page in pages] == [1000, 1000, 502]
    assert len(ids) == len(set(ids)) == 2_502
    keys = [(e["timestamp"], e["seq"], e["id"]) for page in pages for e in page["results"]]
    assert keys == sorted(keys, reverse=True), "newest first, then seq, then id"
    # Back from the last page by `previous`: the same pages, in reverse.
    back = follow(reader_client, pages[-1]["previous"], "previous")
    assert [e["id"] for page in reversed(back) for e in page["results"]] == ids[:2_000]
    assert pages[0]["previous"] is None and back[-1]["previous"] is None


def test_pages_of_a_filter_hold_exactly_its_events_across_ties(reader_client: APIClient) -> None:
    store(
        *[make_envelope("tokenGenerated", timestamp=T0 + 1_000, seq=1, source=f"s{i % 2}") for i in range(30)]
    )
    pages = follow(reader_client, URL + "?limit=4&source=s1")
    ids = [e["id"] for page in pages for e in page["results"]]
    assert len(ids) == len(set(ids)) == 15
    assert {e["source"] for page in pages for e in page["results"]} == {"s1"}
