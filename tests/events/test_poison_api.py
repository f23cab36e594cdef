"""What a buggy or hostile client can send to the API: bodies no parser should take, cursors and
parameters out of range, oversized batches. Each gets its 4xx with the error object, never a 500."""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec
import pytest
import redis
from rest_framework.test import APIClient

from mlxserve.web.roles import ADMIN_GROUP
from tests.factories import make_envelope, role_user, token_client

pytestmark = pytest.mark.django_db


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def deep(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


@pytest.fixture
def admin_client() -> APIClient:
    return token_client(role_user("boss", ADMIN_GROUP, is_staff=True))


WRITES = [
    ("post", "/api/events/"),
    ("post", "/api/generations/"),
    ("post", "/api/workers/unload/"),
    ("put", "/api/telemetry/config/"),
    ("patch", "/api/telemetry/config/"),
]


@pytest.mark.parametrize(("method", "path"), WRITES)
@pytest.mark.parametrize(
    ("body", "message"),
    [
        (deep(3_000), "Nested too deeply"),
        (deep(100_000), "Nested too deeply"),
        (b'{"a": ' + deep(5_000) + b"}", "Nested too deeply"),
        (b"1" * 5_000, "Number out of range (integers are at most 64 bits)"),
        (b'{"enabled": ' + b"9" * 5_000 + b"}", "Number out of range (integers are at most 64 bits)"),
        (b'{"a": "\xff\xfe"}', "Invalid JSON: not UTF-8 text"),
        (b"\xef\xbb\xbf[", "Invalid JSON: Input data was truncated"),
    ],
    ids=[
        "deep-3000",
        "deep-100000",
        "deep-in-object",
        "huge-int",
        "huge-int-field",
        "not-utf8",
        "bom-then-junk",
    ],
)
def test_bodies_no_parser_should_take_get_400_with_the_error_object_on_every_write(
    admin_client: APIClient,
    redis_client: redis.Redis,
    settings: Any,
    method: str,
    path: str,
    body: bytes,
    message: str,
) -> None:
    response = getattr(admin_client, method)(path, data=body, content_type="application/json")
    assert response.status_code == 400, response.content
    assert response.json()["code"] == "InvalidParams"
    assert response.json()["details"]["issues"][0]["message"] == message
    assert redis_client.xlen(settings.EVENTS_STREAM) == 0


def test_metadata_nested_past_the_limit_is_refused_on_the_api_and_the_rest_of_a_batch_kept(
    admin_client: APIClient,
) -> None:
    nested: Any = {}
    for _ in range(200):
        nested = {"a": nested}
    bad = make_envelope("error", timestamp=now_ms(), payload={"error": "x", "metadata": nested})
    good = make_envelope("error", timestamp=now_ms())
    response = admin_client.post("/api/events/", [bad, good], format="json")
    assert response.status_code == 207
    assert response.json()["accepted"] == [good["id"]]
    issue = response.json()["rejected"][0]["error"]["details"]["issues"][0]
    assert (issue["message"], issue["code"], len(issue["path"])) == ("Nested too deeply", "too_deep", 2 + 64)


def test_a_json_body_after_a_byte_order_mark_is_accepted(admin_client: APIClient) -> None:
    envelope = make_envelope(timestamp=now_ms())
    response = admin_client.post(
        "/api/events/", data=b"\xef\xbb\xbf" + msgspec.json.encode(envelope), content_type="application/json"
    )
    assert response.status_code == 202
    assert response.json() == {"id": envelope["id"]}


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "multipart/form-data; boundary=x"])
def test_a_wrong_content_type_gets_415_with_the_error_object(
    admin_client: APIClient, content_type: str
) -> None:
    response = admin_client.post("/api/events/", data=b"{}", content_type=content_type)
    assert response.status_code == 415
    assert response.json()["code"] == "UnsupportedMediaType"


def _cursor(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    "cursor",
    [
        _cursor("p=abc"),
        _cursor("p=1e5"),
        _cursor("p=" + "9" * 30),
        _cursor("p=-" + "9" * 19),
        _cursor("p=12%00"),
        _cursor("o=-1&p=5"),
        _cursor("o=abc"),
        _cursor("r=x"),
        _cursor("p=" + "1" * 5000),
        "not base64!",
        "w6k=",  # base64 of non-ASCII bytes
        "%FF%FE",
        "é",
        "",
    ],
)
@pytest.mark.parametrize("path", ["/api/events/", "/api/dead-letters/"])
def test_every_malformed_cursor_gets_400(admin_client: APIClient, cursor: str, path: str) -> None:
    response = admin_client.get(path, {"cursor": cursor})
    if cursor == "":
        assert response.status_code == 200  # no cursor: the first page
        return
    assert response.status_code == 400, response.content
    assert response.json()["details"]["issues"][0]["path"] == ["cursor"]


@pytest.mark.parametrize(
    "query",
    [
        "since=-1",
        "until=-5",
        "since=" + "9" * 30,
        "since=" + "9" * 5000,
        "until=1e400",
        "since=NaN",
        "generationId=" + "x" * 5000,
        "type=" + "é" * 100,
        "source=a%00b",
        "model=a%00b",
    ],
)
def test_query_parameters_out_of_range_or_of_the_wrong_kind_get_400(
    admin_client: APIClient, query: str
) -> None:
    response = admin_client.get("/api/events/?" + query)
    assert response.status_code == 400, response.content
    assert response.json()["code"] == "InvalidParams"


@pytest.mark.parametrize("query", ["limit=-1", "limit=" + "9" * 40, "limit=abc", "source=" + "s" * 5000])
def test_harmless_odd_parameters_get_a_page(admin_client: APIClient, query: str) -> None:
    assert admin_client.get("/api/events/?" + query).status_code == 200


def test_huge_ids_in_paths_are_404_not_500(admin_client: APIClient) -> None:
    for path in (f"/api/dead-letters/{'9' * 40}/replay/", f"/api/events/{uuid.uuid4()}/"):
        response = admin_client.post(path) if "replay" in path else admin_client.get(path)
        assert response.status_code == 404
        assert response.json()["code"] == "NotFound"


def test_a_batch_of_more_envelopes_than_allowed_is_refused_whole(
    admin_client: APIClient, redis_client: redis.Redis, settings: Any
) -> None:
    response = admin_client.post(
        "/api/events/", data=b"[" + b",".join([b"1"] * 5001) + b"]", content_type="application/json"
    )
    assert response.status_code == 400
    assert (
        response.json()["message"]
        == "Validation error on field 'root': Too many envelopes in one request (5001; at most 5000)"
    )
    assert redis_client.xlen(settings.EVENTS_STREAM) == 0
    fine = admin_client.post(
        "/api/events/", data=b"[" + b",".join([b"1"] * 5000) + b"]", content_type="application/json"
    )
    assert fine.status_code == 207
    assert len(fine.json()["rejected"]) == 5000
