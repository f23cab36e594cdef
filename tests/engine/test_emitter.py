from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any, cast

import pytest
import redis

from mlxserve.contract.events import envelope_to_wire
from mlxserve.contract.stream import ENTRY_FIELD
from mlxserve.contract.validation import ValidationFailed
from mlxserve.engine.emitter import EngineEventEmitter, RedisStreamPublisher
from tests.factories import CollectingPublisher


@pytest.fixture
def collected() -> tuple[EngineEventEmitter, CollectingPublisher]:
    publisher = CollectingPublisher()
    return EngineEventEmitter(source="host/worker-1", publisher=publisher), publisher


def test_each_method_emits_its_event_type(collected: tuple[EngineEventEmitter, CollectingPublisher]) -> None:
    emitter, publisher = collected
    generation = uuid.uuid4()
    emitter.model_loaded(
        model="m", model_path="/models/m", quantization="int4", parameters=8000000000, metadata={"loadMs": 10}
    )
    emitter.model_unloaded(model="m", reason="cache-eviction")
    emitter.model_invalidated(model="m", reason="file-changed")
    emitter.generation_started(generation_id=generation, model="m", prompt="hi", max_tokens=4)
    emitter.token_generated(generation_id=generation, seq=1, model="m", token="x", logprob=-0.25)
    emitter.generation_completed(
        generation_id=generation, seq=2, model="m", tokens_generated=1, duration_ms=12.5, throughput=80.0
    )
    emitter.error(error="boom", code="GenerationFailed", model="m", generation_id=generation, seq=3)
    emitter.runtime_status(status="ready", models_loaded=1, active_tasks=0)
    wires = [envelope_to_wire(e) for e in publisher.envelopes]
    assert [w["type"] for w in wires] == [
        "modelLoaded",
        "modelUnloaded",
        "modelInvalidated",
        "generationStarted",
        "tokenGenerated",
        "generationCompleted",
        "error",
        "runtimeStatus",
    ]
    assert all(w["source"] == "host/worker-1" and w["timestamp"] > 1_700_000_000_000 for w in wires)
    assert len({w["id"] for w in wires}) == 8
    assert wires[4]["payload"] == {"model": "m", "token": "x", "logprob": -0.25}
    assert wires[4]["generationId"] == str(generation) and wires[4]["seq"] == 1
    assert wires[1]["generationId"] is None
    assert "quantization" not in envelope_to_wire(emitter.model_loaded(model="m", model_path="/p"))["payload"]


def test_it_raises_the_error_object_and_publishes_nothing_on_bad_input(
    collected: tuple[EngineEventEmitter, CollectingPublisher],
) -> None:
    emitter, publisher = collected
    with pytest.raises(ValidationFailed) as info:
        emitter.generation_started(generation_id=uuid.uuid4(), model="m", prompt="p", max_tokens=0)
    assert info.value.as_error()["message"] == (
        "Validation error on field 'payload.maxTokens': Must be a positive integer"
    )
    with pytest.raises(ValidationFailed) as info:
        emitter.token_generated(generation_id=None, seq=0, model="m", token="x")  # type: ignore[arg-type]
    assert info.value.field == "generationId"
    with pytest.raises(ValidationFailed) as info:
        emitter.runtime_status(status="sleeping", models_loaded=0)
    assert info.value.issues[0].message == "Status must be one of: ready, busy, error, shutdown"
    with pytest.raises(ValidationFailed):
        emitter.token_generated(generation_id=uuid.uuid4(), seq=0, model="m", token="x", logprob=float("nan"))
    with pytest.raises(ValidationFailed):
        EngineEventEmitter(source="", publisher=publisher).runtime_status(status="ready", models_loaded=0)
    assert publisher.envelopes == []


def test_the_redis_publisher_puts_events_on_the_stream(redis_client: redis.Redis, settings: Any) -> None:
    emitter = EngineEventEmitter(
        source="h/w", publisher=RedisStreamPublisher(redis_client, settings.EVENTS_STREAM)
    )
    sent = emitter.runtime_status(status="busy", models_loaded=2, active_tasks=1)
    [(_, fields)] = cast(Any, redis_client.xrange(settings.EVENTS_STREAM))
    assert json.loads(fields[ENTRY_FIELD]) == envelope_to_wire(sent)


def test_a_lone_surrogate_is_refused_before_it_reaches_the_publisher(
    collected: tuple[EngineEventEmitter, CollectingPublisher],
) -> None:
    emitter, publisher = collected
    with pytest.raises(ValidationFailed) as info:
        emitter.token_generated(generation_id=uuid.uuid4(), seq=1, model="m", token="\ud800")
    assert info.value.issues[0].code == "invalid_string"
    assert publisher.envelopes == []


def test_a_worker_whose_clock_was_never_set_logs_and_counts_each_refused_event(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from mlxserve.engine import emitter as emitter_module

    refused: list[ValidationFailed] = []
    publisher = CollectingPublisher()
    emitter = EngineEventEmitter(source="mac-1/w1", publisher=publisher, on_refused=refused.append)
    # A Mac whose clock reads 1970 (a dead RTC battery, no network time yet).
    monkeypatch.setattr(emitter_module.time, "time_ns", lambda: 86_400 * 10**9)
    with caplog.at_level("ERROR", logger="mlxserve.engine.emitter"), pytest.raises(ValidationFailed):
        emitter.runtime_status(status="ready", models_loaded=0)
    assert publisher.envelopes == []
    assert [exc.field for exc in refused] == ["timestamp"]
    assert (
        "Invalid runtimeStatus payload: Validation error on field 'timestamp': Timestamp must be epoch"
        in caplog.text
    )


# -- event ids: idempotency keys nobody can guess -------------------------------------


def test_event_ids_are_version_4_uuids_from_the_operating_systems_generator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mlxserve.engine import emitter as emitter_module

    ids = [emitter_module.random_uuid() for _ in range(1000)]
    assert len(set(ids)) == 1000
    for made in ids[:50]:
        assert made.version == 4 and made.variant == uuid.RFC_4122
        assert uuid.UUID(str(made)) == made and hash(made) == hash(uuid.UUID(str(made)))
    # Where the bytes come from: a fresh emitter's pool is read from os.urandom.
    monkeypatch.setattr(emitter_module.os, "urandom", lambda n: bytes(range(16)) * (n // 16))
    fresh = emitter_module._random_uuids()
    assert fresh() == uuid.UUID(bytes=bytes(range(16)), version=4)


def test_event_ids_are_unique_across_threads_and_a_fork() -> None:
    from mlxserve.engine.emitter import random_uuid

    seen: list[list[uuid.UUID]] = [[] for _ in range(8)]

    def draw(into: list[uuid.UUID]) -> None:
        into.extend(random_uuid() for _ in range(5000))

    threads = [threading.Thread(target=draw, args=(bucket,)) for bucket in seen]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({i for bucket in seen for i in bucket}) == 40_000

    random_uuid()  # the pool is part-used when the worker forks
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        os.write(write, b"".join(random_uuid().bytes for _ in range(300)))
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    os.waitpid(child, 0)
    in_child = {uuid.UUID(bytes=data[i : i + 16]) for i in range(0, len(data), 16)}
    in_parent = {random_uuid() for _ in range(300)}
    assert len(in_child) == 300 and not in_child & in_parent


# -- listeners: the emitter without a publisher ------------------------------------------------


def test_listeners_get_the_events_of_their_type_and_star_gets_all() -> None:
    emitter = EngineEventEmitter(source="app/1")
    tokens: list[str] = []
    every: list[str] = []
    emitter.on("tokenGenerated", lambda e: tokens.append(cast(Any, e).payload.token))
    emitter.on("*", lambda e: every.append(e.type))
    gid = uuid.uuid4()
    emitter.generation_started(generation_id=gid, model="m", prompt="p")
    emitter.token_generated(generation_id=gid, seq=1, model="m", token="a")
    emitter.emit("tokenGenerated", {"model": "m", "token": "b"}, generation_id=gid, seq=2)
    assert tokens == ["a", "b"]
    assert every == ["generationStarted", "tokenGenerated", "tokenGenerated"]


def test_off_stops_a_listener_and_an_unknown_type_is_refused() -> None:
    emitter = EngineEventEmitter(source="app/1")
    seen: list[int] = []

    def listener(e: Any) -> None:
        seen.append(e.seq)

    emitter.on("runtimeStatus", listener)
    emitter.runtime_status(status="ready", models_loaded=0)
    emitter.off("runtimeStatus", listener)
    emitter.off("runtimeStatus", listener)  # not listening any more: nothing happens
    emitter.runtime_status(status="busy", models_loaded=0)
    assert seen == [0]
    with pytest.raises(ValueError, match="No event type 'tokens'"):
        emitter.on("tokens", listener)


def test_an_invalid_payload_is_logged_raised_and_reaches_no_listener(
    caplog: pytest.LogCaptureFixture,
) -> None:
    publisher = CollectingPublisher()
    emitter = EngineEventEmitter(source="app/1", publisher=publisher)
    seen: list[Any] = []
    emitter.on("*", seen.append)
    with (
        caplog.at_level("ERROR", logger="mlxserve.engine.emitter"),
        pytest.raises(ValidationFailed) as caught,
    ):
        emitter.token_generated(generation_id=uuid.uuid4(), seq=1, model="", token="x", logprob=float("nan"))
    assert caught.value.code == "InvalidParams"
    assert seen == [] and publisher.envelopes == []
    assert (
        "Invalid tokenGenerated payload: Validation error on field 'payload.model': Cannot be empty"
        in caplog.text
    )
    assert "payload.logprob: Must be a finite number" in caplog.text


def test_a_listener_that_raises_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    publisher = CollectingPublisher()
    emitter = EngineEventEmitter(source="app/1", publisher=publisher)
    after: list[str] = []

    def broken(e: Any) -> None:
        raise RuntimeError("listener bug")

    emitter.on("modelLoaded", broken)
    emitter.on("modelLoaded", lambda e: after.append(cast(Any, e).payload.model))
    with caplog.at_level("ERROR"):
        envelope = emitter.model_loaded(model="m", model_path="/m")
    assert after == ["m"] and publisher.envelopes == [envelope]
    assert "A listener of modelLoaded events failed" in caplog.text and "listener bug" in caplog.text


def test_the_publisher_is_one_listener_among_others(caplog: pytest.LogCaptureFixture) -> None:
    bodies: list[bytes] = []

    class Down:
        def publish(self, envelope: Any, body: bytes) -> None:
            bodies.append(body)
            raise redis.ConnectionError("Redis is down")

        def publish_many(self, batch: Sequence[bytes]) -> None:
            raise AssertionError("a batch of one event")

    emitter = EngineEventEmitter(source="app/1", publisher=Down())
    seen: list[Any] = []
    emitter.on("*", seen.append)
    with caplog.at_level("ERROR"):
        envelope = emitter.runtime_status(status="ready", models_loaded=0)
    assert seen == [envelope]  # the others still hear of it
    assert json.loads(bodies[0])["type"] == "runtimeStatus"  # with the JSON the emitter encoded
    assert "A listener of runtimeStatus events failed" in caplog.text and "Redis is down" in caplog.text


@pytest.mark.parametrize(
    "fields",
    [
        {"model": "m", "token": "x", "logprob": -0.25},
        {"model": "m", "token": "", "logprob": 0.0},
        {"model": "m" * 5000, "token": 'é\n\t"\\'},
        {"model": "", "token": "x", "logprob": -1.0},  # empty model
        {"model": "m", "token": "\ud800", "logprob": -1.0},  # lone surrogate
        {"model": "m", "token": "x", "logprob": float("-inf")},
        {"model": "m", "token": "x", "logprob": 1e400},
        {"model": 7, "token": "x", "logprob": -1.0},
        {"model": "m", "token": object(), "logprob": -1.0},
        {"model": "m", "token": "x", "logprob": True},
        {"model": "m", "token": "x", "logprob": -1.0, "seq": -1},
        {"model": "m", "token": "x", "logprob": -1.0, "seq": 2**63},
        {"model": "m", "token": "x", "logprob": -1.0, "generation_id": "not-a-uuid"},
        {"model": "m", "token": "x", "logprob": -1.0, "generation_id": str(uuid.UUID(int=5))},
        {"model": "m", "token": "x", "metadata": {"k": [1, 2]}},
    ],
)
def test_token_events_say_exactly_what_the_generic_emit_says(fields: dict[str, Any]) -> None:
    """``token_generated`` takes a short way for the usual token: same events, same refusals."""
    gid = fields.pop("generation_id", uuid.UUID(int=1))
    seq = fields.pop("seq", 3)
    outcomes: list[tuple[Any, ...]] = []
    for short in (True, False):
        publisher = CollectingPublisher()
        emitter = EngineEventEmitter(source="h/w", publisher=publisher)
        heard: list[Any] = []
        emitter.on("tokenGenerated", heard.append)
        try:
            if short:
                sent = emitter.token_generated(generation_id=gid, seq=seq, **fields)
            else:
                sent = emitter.emit("tokenGenerated", dict(fields), generation_id=gid, seq=seq)
        except ValidationFailed as exc:
            outcomes.append(("refused", exc.as_error(), publisher.envelopes, heard))
            continue
        wire = envelope_to_wire(sent)
        del wire["id"], wire["timestamp"]
        assert heard == [sent] and publisher.envelopes == [sent]
        outcomes.append(("sent", wire, len(publisher.envelopes), len(heard)))
    assert outcomes[0] == outcomes[1]


_NOW_MS = time.time_ns() // 1_000_000
GOOD_TOKENS = [(1, _NOW_MS - 5, "x", -0.25), (2, _NOW_MS - 4, 'é\n"', 0.0), (3, _NOW_MS - 4, "", -3.5)]


def _batch_then_one_by_one(rows: list[tuple[Any, ...]], gid: Any = None, model: Any = "m") -> list[Any]:
    """What ``tokens_generated`` and ``token_generated`` (one call a token) each make of ``rows``:
    the events the publisher and a typed listener got (ids and timestamps aside), the refusal."""
    gid = uuid.UUID(int=1) if gid is None else gid
    outcomes: list[Any] = []
    for batch in (True, False):
        publisher = CollectingPublisher()
        refused: list[ValidationFailed] = []
        emitter = EngineEventEmitter(source="h/w", publisher=publisher, on_refused=refused.append)
        heard: list[Any] = []
        emitter.on("tokenGenerated", heard.append)
        error = None
        try:
            if batch:
                emitter.tokens_generated(generation_id=gid, model=model, tokens=rows)
            else:
                for seq, _, token, logprob in rows:
                    emitter.token_generated(
                        generation_id=gid, seq=seq, model=model, token=token, logprob=logprob
                    )
        except ValidationFailed as exc:
            error = exc.as_error()
        wires = [envelope_to_wire(e) for e in publisher.envelopes]
        assert [envelope_to_wire(e) for e in heard] == wires
        for wire in wires:
            del wire["id"], wire["timestamp"]
        outcomes.append((wires, error, len(refused)))
    return outcomes


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"row": 1, "logprob": float("nan")},
        {"row": 2, "logprob": float("inf")},
        {"row": 0, "logprob": 1},  # an int: the strict decoder refuses it
        {"row": 1, "logprob": True},
        {"row": 1, "token": "\udc80"},  # lone surrogate
        {"row": 2, "token": None},
        {"row": 1, "seq": -1},
        {"row": 2, "seq": 2**63},
        {"row": 1, "seq": True},
        {"row": 0, "timestamp": 946_684_799_999},  # before 2000
        {"row": 2, "timestamp": 2**63},
        {"row": 1, "timestamp": _NOW_MS + 11 * 60_000},  # ahead of the clock by more than 10 minutes
        {"row": 2, "timestamp": _NOW_MS + 9 * 60_000},  # ahead, but within the 10 minutes
        {"row": 1, "timestamp": 1.8e12},  # a float
        {"gid": "not-a-uuid"},
        {"gid": str(uuid.UUID(int=7)).upper()},
        {"gid": 12},
        {"model": ""},
        {"model": "m" * 5000},
    ],
)
def test_a_batch_of_token_events_says_what_one_call_a_token_says(change: dict[str, Any]) -> None:
    """The engine sends tokens a batch at a time, checked by the contract's per-token rules after
    one full decode: same events, same refusal (those before the bad one sent), as one call each."""
    change = dict(change)
    rows = [list(row) for row in GOOD_TOKENS]
    bad_row = change.pop("row", None)
    if bad_row is not None:
        for field, value in change.items():
            rows[bad_row][["seq", "timestamp", "token", "logprob"].index(field)] = value
    batch, single = _batch_then_one_by_one(
        [tuple(r) for r in rows], change.get("gid"), change.get("model", "m")
    )
    assert batch == single
    sent, error, refusals = batch
    assert bool(error) == bool(refusals)  # a refusal is raised and counted once
    assert len(sent) == (3 if error is None else bad_row or 0)  # those before the bad one are sent


def test_a_batch_of_token_events_goes_to_the_publisher_in_one_take(tmp_path: Any) -> None:
    """The publisher gets the batch's JSON at once (``publish_many``), each event valid and with
    its own random id."""
    taken: list[list[bytes]] = []

    class Many:
        def publish(self, envelope: Any, body: bytes) -> None:
            raise AssertionError("one at a time")

        def publish_many(self, bodies: Sequence[bytes]) -> None:
            taken.append(list(bodies))

    emitter = EngineEventEmitter(source="h/w", publisher=Many())
    gid = uuid.uuid4()
    emitter.tokens_generated(generation_id=gid, model="m", tokens=GOOD_TOKENS)
    [bodies] = taken
    from mlxserve.contract.events import envelope_decode

    events = [envelope_decode(b) for b in bodies]
    assert [(e.seq, getattr(e.payload, "token", None), e.generation_id) for e in events] == [
        (1, "x", gid),
        (2, 'é\n"', gid),
        (3, "", gid),
    ]
    assert len({e.id for e in events}) == 3 and all(e.id.version == 4 for e in events)
    emitter.tokens_generated(generation_id=gid, model="m", tokens=[])
    assert len(taken) == 1  # an empty batch sends nothing


def test_random_uuid_strings_are_canonical_version_4_and_unique() -> None:
    from mlxserve.engine.emitter import random_uuid_strings

    ids = random_uuid_strings(5000)
    parsed = [uuid.UUID(text) for text in ids]
    assert [str(p) for p in parsed] == ids  # canonical: lower case, hyphens where they go
    assert {p.version for p in parsed} == {4} and {p.variant for p in parsed} == {uuid.RFC_4122}
    assert len(set(ids)) == 5000
    # every variant digit and the random bits around the fixed ones all occur
    assert {text[19] for text in ids} == set("89ab") and len({text[14:18] for text in ids}) > 1000
