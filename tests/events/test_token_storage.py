"""Token events in typed columns: every answer of the API, the export and the admin is byte for
byte what the JSON rows gave for the same events; redeliveries stored once; what does not fit
stays JSON."""

from __future__ import annotations

import re
import struct
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test import Client
from rest_framework.test import APIClient

import events.decoding
import events.tokens
from events.models import Channel, EventRecord, TokenEvent
from events.storage import events_store
from tests.factories import T0, make_envelope

pytestmark = pytest.mark.django_db(transaction=True)

GENERATIONS = [uuid.UUID(int=n) for n in range(1, 4)]
# Log-probabilities as a worker sends them, and the numbers whose JSON text is easy to get wrong.


def f32(value: float) -> float:
    """The 32-bit float nearest ``value``, as a worker's log-probabilities are."""
    return float(struct.unpack("<f", struct.pack("<f", value))[0])


# Log-probabilities as a worker sends them (32-bit floats, their JSON text easy to get wrong), and
# two a 32-bit float cannot hold (any number may come from an API producer): those stay JSON.
LOGPROBS = [0.0, -0.0, -1.0, f32(-1e-07), f32(-2.5e-05), f32(-0.3), f32(-123.456), f32(-1e22), -0.1, None]
NOT_32_BIT = (-0.1,)
TOKENS = [
    "Hello",
    " world",
    "",
    'say "hi"',
    "back\\slash",
    "tab\there",
    "line\nfeed",
    "\x01\x1f",
    "\b\f\r\x7f",
    "ü€😀",
    "\u2028",
]


def history_events() -> list[dict[str, Any]]:
    """Three generations on two sources and two models, their tokens sharing milliseconds, and
    the token events the typed columns cannot hold (they stay JSON)."""
    events: list[dict[str, Any]] = []
    for g, generation_id in enumerate(GENERATIONS):
        source, model = f"mac-{g % 2}/worker-1", "llama-3-8b" if g < 2 else "qwen"
        start = T0 + g * 1_000
        events.append(
            make_envelope(
                "generationStarted",
                generationId=str(generation_id),
                source=source,
                timestamp=start,
                seq=0,
                payload={"model": model, "prompt": "p", "maxTokens": 10},
            )
        )
        for seq in range(1, 11):
            payload: dict[str, Any] = {"model": model, "token": TOKENS[(seq + g) % len(TOKENS)]}
            if (logprob := LOGPROBS[(seq * 3 + g) % len(LOGPROBS)]) is not None:
                payload["logprob"] = logprob
            events.append(
                make_envelope(
                    "tokenGenerated",
                    generationId=str(generation_id),
                    source=source,
                    timestamp=start + 10 + seq // 3,  # three tokens a millisecond: ties settled by seq
                    seq=seq,
                    payload=payload,
                )
            )
        events.append(
            make_envelope(
                "generationCompleted",
                generationId=str(generation_id),
                source=source,
                timestamp=start + 20,
                seq=11,
                payload={"model": model, "tokensGenerated": 10, "durationMs": 20.0},
            )
        )
    # Not for the typed columns: metadata, a sequence number past 2^31, a model name past 200.
    events.append(make_envelope("tokenGenerated", timestamp=T0 + 15, seq=2**31, source="mac-0/worker-1"))
    events.append(
        make_envelope(
            "tokenGenerated", timestamp=T0 + 15, payload={"model": "m", "token": "x", "metadata": {"k": 1}}
        )
    )
    events.append(
        make_envelope("tokenGenerated", timestamp=T0 + 16, payload={"model": "m" * 250, "token": "y"})
    )
    events.append(make_envelope("error", timestamp=T0 + 15, generationId=None, source="mac-1/worker-1"))
    return events


def store(envelopes: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    """In two batches, the second redelivering part of the first (stored once all the same), at
    the same two moments each time they are stored."""
    bodies = [(f"{i}-0", msgspec.json.encode(e)) for i, e in enumerate(envelopes)]
    for moment, batch in ((1, bodies[: len(bodies) // 2]), (2, bodies[len(bodies) // 3 :])):
        at = datetime(2025, 11, 26, 0, 0, moment, 123456, tzinfo=UTC)
        with monkeypatch.context() as clock:
            clock.setattr(events.decoding.timezone, "now", lambda at=at: at)
            events_store(batch)


LISTS = [
    {},
    {"type": "tokenGenerated"},
    {"type": "error"},
    {"model": "qwen"},
    {"model": "llama-3-8b", "type": "tokenGenerated"},
    {"source": "mac-1/worker-1"},
    {"source": "mac-0/worker-1", "model": "llama-3-8b"},
    {"source": "nobody"},
    {"generationId": str(GENERATIONS[1])},
    {"generationId": str(GENERATIONS[2]), "type": "tokenGenerated"},
    {"since": str(T0 + 12), "until": str(T0 + 1_013)},
    {"model": "m" * 250},
]


def pages(client: APIClient, params: dict[str, str]) -> Iterator[bytes]:
    """Every page of a list, forwards at 7 a page, then backwards from the last one."""
    url: str | None = "/api/events/?" + "&".join(f"{k}={v}" for k, v in {**params, "limit": "7"}.items())
    last = None
    while url:
        response = client.get(url)
        assert response.status_code == 200, response.content
        yield response.content
        last, url = response.json(), response.json()["next"]
    url = last["previous"] if last else None
    while url:
        response = client.get(url)
        yield response.content
        url = response.json()["previous"]


def answers(client: APIClient, admin: Client, envelopes: list[dict[str, Any]]) -> dict[str, list[bytes]]:
    """Everything a user can read of these events: lists, export, each event, each generation,
    the admin's list and each event's admin page (its CSRF token taken out)."""
    got: dict[str, list[bytes]] = {}
    for params in LISTS:
        got[f"list {params}"] = list(pages(client, params))
        export = client.get("/api/events/export/", {**params, "since": "0"})
        got[f"export {params}"] = [b"".join(export.streaming_content)]  # type: ignore[attr-defined]
    got["events"] = [client.get(f"/api/events/{e['id']}/").content for e in envelopes]
    got["generations"] = [client.get(f"/api/generations/{g}/").content for g in GENERATIONS]
    csrf = re.compile(rb'name="csrfmiddlewaretoken" value="[^"]*"')
    for query in ("", "?type__exact=tokenGenerated", "?source=mac-0/worker-1", f"?q={GENERATIONS[0]}"):
        page = admin.get(f"/admin/events/event/{query}")
        assert page.status_code == 200
        got[f"admin {query}"] = [csrf.sub(b"", page.content)]
    got["admin pages"] = [
        csrf.sub(b"", admin.get(f"/admin/events/event/{e['id']}/change/").content) for e in envelopes
    ]
    return got


def test_every_answer_is_the_same_byte_for_byte_as_from_json_rows(
    reader_client: APIClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin = Client()
    admin.force_login(User.objects.create_superuser("root", "root@example.com", "pw"))
    envelopes = history_events()

    with monkeypatch.context() as before:
        before.setattr(events.tokens, "token_compact", lambda envelope: False)  # as stored until now
        store(envelopes, monkeypatch)
    assert not TokenEvent.objects.exists()
    as_json = answers(reader_client, admin, envelopes)

    EventRecord.objects.all().delete()
    store(envelopes, monkeypatch)
    # 30 of the 33 token events in typed columns but those of a log-probability wider than 32 bits,
    # the three that do not fit as JSON with the rest (on SQLite, which keeps no -0.0 in a number
    # column, those of log-probability -0.0 too).
    tokens = [e["payload"] for e in envelopes if e["type"] == "tokenGenerated"]
    wide = sum(1 for p in tokens if p.get("logprob") in NOT_32_BIT)
    signed_zeros = (
        sum(1 for p in tokens if str(p.get("logprob")) == "-0.0") if connection.vendor == "sqlite" else 0
    )
    assert TokenEvent.objects.count() == 30 - wide - signed_zeros > 20
    assert EventRecord.objects.filter(type="tokenGenerated").count() == 3 + wide + signed_zeros
    assert sorted(Channel.objects.values_list("source", "model")) == [
        ("mac-0/worker-1", "llama-3-8b"),
        ("mac-0/worker-1", "qwen"),
        ("mac-1/worker-1", "llama-3-8b"),
    ]
    compact = answers(reader_client, admin, envelopes)

    assert compact.keys() == as_json.keys()
    for name, pieces in as_json.items():
        assert compact[name] == pieces, name
    # Not vacuous: the lists held the token events, with their escapes and numbers.
    everything = b"".join(as_json["export {}"])
    assert everything.count(b'"type":"tokenGenerated"') == 33
    assert b'"logprob": 0.0' in everything or b'"logprob":0.0' in everything


def test_a_redelivered_token_is_stored_once_and_so_is_an_id_reused_at_another_time(
    reader_client: APIClient,
) -> None:
    token = make_envelope("tokenGenerated", timestamp=T0, seq=1)
    events_store([("1-0", msgspec.json.encode(token))])
    outcome = events_store([("1-0", msgspec.json.encode(token)), ("2-0", msgspec.json.encode(token))])
    assert (outcome.stored, outcome.duplicates) == (0, 2)
    assert TokenEvent.objects.count() == 1

    # The same id at another time (a producer reusing ids): still the id stored once.
    later = {**token, "timestamp": T0 + 5, "payload": {"model": "m", "token": "other"}}
    outcome = events_store([("3-0", msgspec.json.encode(later))])
    assert (outcome.stored, outcome.duplicates) == (0, 1)
    assert [e["timestamp"] for e in reader_client.get("/api/events/").json()["results"]] == [T0]
    assert (
        reader_client.get(f"/api/events/{token['id']}/").json()["payload"]["token"]
        == token["payload"]["token"]
    )


def test_a_token_stored_as_json_before_the_upgrade_reads_as_before(reader_client: APIClient) -> None:
    token = make_envelope(
        "tokenGenerated", timestamp=T0, seq=1, payload={"model": "m", "token": "t", "logprob": -1.0}
    )
    EventRecord.objects.create(
        id=token["id"],
        type="tokenGenerated",
        timestamp=T0,
        source=token["source"],
        generation_id=token["generationId"],
        seq=1,
        model="m",
        payload=token["payload"],
        ingested_at="2025-11-26T00:00:01Z",
    )
    newer = make_envelope("tokenGenerated", timestamp=T0 + 1, seq=2, generationId=token["generationId"])
    events_store([("1-0", msgspec.json.encode(newer))])
    listed = reader_client.get(f"/api/events/?generationId={token['generationId']}").json()["results"]
    assert [e["id"] for e in listed] == [newer["id"], token["id"]]
    assert listed[1]["payload"] == {"model": "m", "token": "t", "logprob": -1.0}


def test_a_host_gets_channels_for_its_share_of_pairs_and_its_other_tokens_are_stored_as_json(
    reader_client: APIClient, settings: Any
) -> None:
    # A compromised host sending tokens under ever new model names cannot use up the 16-bit channel
    # ids another host's tokens need: past its share, its tokens are JSON rows, readable the same way.
    settings.CHANNELS_PER_PRODUCER = 3
    flood = [
        make_envelope(
            "tokenGenerated",
            timestamp=T0 + i,
            seq=i + 1,
            source=f"rogue/w{i % 2}",
            payload={"model": f"fake-{i}", "token": f"t{i}"},
        )
        for i in range(6)
    ]
    honest = make_envelope("tokenGenerated", timestamp=T0 + 10, seq=1, source="mac-1/worker-1")
    outcome = events_store([(f"{i}-0", msgspec.json.encode(e)) for i, e in enumerate([*flood, honest])])
    assert outcome.stored == 7
    assert Channel.objects.filter(source__startswith="rogue/").count() == 3
    assert Channel.objects.filter(source="mac-1/worker-1").count() == 1
    assert TokenEvent.objects.count() == 4 and EventRecord.objects.filter(type="tokenGenerated").count() == 3
    # A later batch of the same host: no more channels for it; every token listed as it was sent.
    later = make_envelope("tokenGenerated", timestamp=T0 + 20, seq=9, source="rogue/w9")
    assert events_store([("9-0", msgspec.json.encode(later))]).stored == 1
    assert Channel.objects.filter(source__startswith="rogue/").count() == 3
    assert EventRecord.objects.filter(type="tokenGenerated").count() == 4
    listed = reader_client.get("/api/events/", {"source": "rogue/w0", "limit": "100"}).json()["results"]
    assert sorted((e["payload"]["model"], e["payload"]["token"]) for e in listed) == [
        (f"fake-{i}", f"t{i}") for i in (0, 2, 4)
    ]


def test_a_pair_past_the_16_bit_channel_ids_is_stored_as_json_and_reads_the_same(
    reader_client: APIClient,
) -> None:
    # A fleet (or a producer) that has made 32,767 (source, model) pairs: the next ones' tokens
    # cannot name theirs in 16 bits, and are stored as JSON rows, whole and readable.
    token = make_envelope("tokenGenerated", timestamp=T0, seq=1, payload={"model": "far", "token": "t"})
    Channel.objects.create(id=40_000, source=token["source"], model="far")
    assert events_store([("1-0", msgspec.json.encode(token))]).stored == 1
    assert not TokenEvent.objects.exists()
    assert EventRecord.objects.filter(id=token["id"], type="tokenGenerated").exists()
    assert reader_client.get(f"/api/events/{token['id']}/").json()["payload"] == {
        "model": "far",
        "token": "t",
    }


@pytest.mark.parametrize("logprob", [*LOGPROBS, f32(-1e-30), -1e300, 5e-324])
@pytest.mark.parametrize("token", ["plain", 'quo"te\\back\n\t\x01', "ünï ✓ 😀", ""])
def test_a_token_payload_read_for_figures_is_what_decoding_its_bytes_gives(
    logprob: float | None, token: str
) -> None:
    """The generation view reads each token's payload as a value instead of decoding the bytes it
    writes out: the same keys in the same order, the same values and signs, on this database."""
    raw = events.tokens.token_payload("llama-3-8b", token, logprob)
    value = events.tokens.token_payload_value("llama-3-8b", token, logprob)
    decoded = msgspec.json.decode(raw)
    assert list(value.items()) == list(decoded.items())
    assert [repr(v) for v in value.values()] == [repr(v) for v in decoded.values()]  # -0.0 vs 0.0
