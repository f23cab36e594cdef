"""Robustness: schemathesis drives every operation of /api/schema/, hypothesis throws
arbitrary JSON at POST /api/events/. No 500, no response outside the schema, no partial write."""

from __future__ import annotations

import base64
import json
import os
import urllib.parse
from typing import Any

import pytest
import redis
import schemathesis
from django.contrib.auth.models import User
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.factories import make_envelope, stream_envelopes

pytestmark = pytest.mark.django_db

schema = schemathesis.openapi.from_wsgi("/api/schema/", get_wsgi_application())

# The same examples every run, so a CI run is repeatable; MLXSERVE_FUZZ_RANDOM=1 explores new ones
# (with more examples: MLXSERVE_FUZZ_EXAMPLES=500).
FUZZ = settings(
    max_examples=int(os.environ.get("MLXSERVE_FUZZ_EXAMPLES", "30")),
    derandomize=os.environ.get("MLXSERVE_FUZZ_RANDOM") != "1",
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
    ],
)


@pytest.fixture(autouse=True)
def _one_connection_for_the_test() -> Any:
    """Calls go to the WSGI app in this thread; like Django's test client, keep the test's
    database connection (and its transaction) open across requests."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@pytest.fixture
def staff_token(db: Any) -> str:
    user = User.objects.create_user("fuzz-staff", is_staff=True, is_superuser=True)
    return Token.objects.create(user=user).key


@schema.parametrize()
@FUZZ
def test_every_operation_answers_within_its_schema(
    case: Any, staff_token: str, any_model_served: Any
) -> None:
    case.call_and_validate(
        headers={"Authorization": f"Token {staff_token}"},
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ],
    )


# Anything JSON can hold, and envelopes with one field replaced by anything.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
FIELDS = ["id", "type", "timestamp", "source", "generationId", "seq", "payload"]


@st.composite
def mangled_envelopes(draw: Any) -> Any:
    envelope = make_envelope(draw(st.sampled_from(["tokenGenerated", "generationStarted", "runtimeStatus"])))
    if draw(st.booleans()):
        envelope[draw(st.sampled_from(FIELDS))] = draw(json_values)
    if isinstance(envelope["payload"], dict) and draw(st.booleans()):
        envelope["payload"] = {**envelope["payload"], draw(st.text(max_size=8)): draw(json_values)}
    return envelope


bodies = st.one_of(
    json_values,
    mangled_envelopes(),
    st.lists(st.one_of(mangled_envelopes(), json_values), max_size=6),
)


@FUZZ
@given(body=bodies)
def test_posting_events_never_500s_and_never_writes_partly(
    body: Any, producer_client: APIClient, redis_client: redis.Redis, settings: Any
) -> None:
    settings.API_POST_RATE = ""
    redis_client.flushdb()
    response = producer_client.post("/api/events/", data=json.dumps(body), content_type="application/json")
    # 403: a valid envelope whose (mangled) source is not the producer's own.
    assert response.status_code in (202, 207, 400, 403), response.content
    queued = [e["id"] for e in stream_envelopes(redis_client, settings.EVENTS_STREAM)]
    answer = response.json()
    if response.status_code == 202:
        assert queued == [answer["id"]]
    elif response.status_code == 207:
        # Exactly the accepted ones are on the stream, in order; every other index is rejected.
        assert queued == answer["accepted"]
        assert len(answer["accepted"]) + len(answer["rejected"]) == len(body)
    elif response.status_code == 403:
        assert queued == []
        assert answer["code"] == "Forbidden"
    else:
        assert queued == []
        assert {"code", "message", "details"} <= set(answer)


@FUZZ
@given(raw=st.binary(max_size=200))
def test_raw_bytes_never_500(raw: bytes, producer_client: APIClient, redis_client: redis.Redis) -> None:
    response = producer_client.post("/api/events/", data=raw, content_type="application/json")
    assert response.status_code in (202, 207, 400, 429)


# Deep nesting wherever JSON may nest: at the top, in a payload, in metadata, in a batch item.
@st.composite
def deeply_nested_bodies(draw: Any) -> bytes:
    levels = draw(st.sampled_from([63, 64, 65, 100, 999, 1_000, 3_000, 100_000]))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    nested = opener * levels + "0" + closer * levels
    envelope = json.dumps(make_envelope("error"))
    where = draw(st.sampled_from(["top", "payload", "metadata", "batch"]))
    if where == "top":
        text = nested
    elif where == "payload":
        text = envelope.replace('"payload": {', f'"payload": {{"x": {nested}, ', 1)
    elif where == "metadata":
        text = envelope.replace('"payload": {', f'"payload": {{"metadata": {{"m": {nested}}}, ', 1)
    else:
        text = f"[{envelope.replace(make_envelope('error')['id'], '')}, {nested}]"
    return text.encode()


@FUZZ
@given(body=deeply_nested_bodies())
def test_deep_nesting_anywhere_never_500s(
    body: bytes, staff_client: APIClient, redis_client: redis.Redis, settings: Any
) -> None:
    settings.API_POST_RATE = ""
    for method, path in (
        ("post", "/api/events/"),
        ("put", "/api/telemetry/config/"),
        ("post", "/api/generations/"),
    ):
        response = getattr(staff_client, method)(path, data=body, content_type="application/json")
        assert response.status_code in (202, 207, 400), response.content
        if response.status_code == 400:
            assert {"code", "message", "details"} <= set(response.json())


cursor_texts = st.one_of(
    st.text(max_size=40),
    st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()),
    st.lists(
        st.tuples(st.sampled_from(["o", "r", "p", "x", ""]), st.text(max_size=25)), min_size=1, max_size=4
    ).map(lambda pairs: base64.b64encode(urllib.parse.urlencode(pairs).encode()).decode()),
)


@FUZZ
@given(cursor=cursor_texts, path=st.sampled_from(["/api/events/", "/api/dead-letters/"]))
def test_any_cursor_gets_a_page_or_400(cursor: str, path: str, staff_client: APIClient) -> None:
    response = staff_client.get(path, {"cursor": cursor})
    assert response.status_code in (200, 400), response.content
    if response.status_code == 400:
        assert response.json()["details"]["issues"][0]["path"] == ["cursor"]


@FUZZ
@given(
    params=st.dictionaries(
        st.sampled_from(["since", "until", "limit", "type", "model", "source", "generationId"]),
        st.one_of(st.text(max_size=30), st.integers().map(str), st.just("9" * 5000)),
        max_size=4,
    ),
    path=st.sampled_from(["/api/events/", "/api/stats/", "/api/events/export/"]),
)
def test_any_query_parameters_get_an_answer_or_400(
    params: dict[str, str], path: str, staff_client: APIClient
) -> None:
    response = staff_client.get(path, params)
    assert response.status_code in (200, 400), response.content
    if response.status_code == 400:
        assert response.json()["code"] == "InvalidParams"
