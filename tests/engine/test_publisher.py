from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from mlxserve.engine.emitter import EngineEventEmitter
from mlxserve.engine.engine import Engine, GenerationRequest
from mlxserve.engine.metrics import WorkerMetrics
from mlxserve.engine.publisher import BufferedPublisher, CircuitBreaker
from tests.factories import RedisServer, stream_envelopes

STREAM = "events"


def stream_events(client: redis.Redis) -> list[dict[str, Any]]:
    return stream_envelopes(client, STREAM)


def publisher_for(
    server: RedisServer, spool: Path, metrics: WorkerMetrics | None = None, **kwargs: Any
) -> BufferedPublisher:
    client = redis.Redis.from_url(server.url, socket_connect_timeout=0.5, socket_timeout=1)
    return BufferedPublisher(
        client=client, stream=STREAM, spool_dir=spool, metrics=metrics or WorkerMetrics(), **kwargs
    )


def emit_runtime_statuses(emitter: EngineEventEmitter, count: int) -> list[str]:
    return [str(emitter.runtime_status(status="ready", models_loaded=i).id) for i in range(count)]


def test_redis_down_for_seconds_mid_generation_loses_no_event(
    own_redis: RedisServer, tmp_path: Path, demo_model: Path
) -> None:
    metrics = WorkerMetrics()
    publisher = publisher_for(own_redis, tmp_path / "spool", metrics)
    engine = Engine(emitter=EngineEventEmitter(source="h/w", publisher=publisher), metrics=metrics)

    def redis_outage() -> None:
        own_redis.stop()
        time.sleep(3)
        own_redis.start()

    outage = threading.Thread(target=redis_outage)
    tokens: list[str] = []

    def on_token(token: str) -> None:
        tokens.append(token)
        if len(tokens) == 50:
            outage.start()  # Redis goes away while tokens keep coming
        if 50 <= len(tokens) < 400:
            time.sleep(0.01)  # keep generating through the outage

    started = time.monotonic()
    result = engine.generate(GenerationRequest(model=str(demo_model), prompt="a", max_tokens=400), on_token)
    generation_seconds = time.monotonic() - started
    outage.join()
    assert publisher.flush(timeout=20)
    publisher.close()
    events = stream_events(redis.Redis.from_url(own_redis.url))
    by_id = {e["id"]: e for e in events}  # a batch cut off mid-pipeline may be resent: stored once by id
    generation = [e for e in dict.fromkeys(e["id"] for e in events) if by_id[e]["generationId"]]
    kinds = [by_id[i]["type"] for i in generation]
    assert kinds == ["generationStarted"] + ["tokenGenerated"] * 400 + ["generationCompleted"]
    assert [by_id[i]["seq"] for i in generation[1:-1]] == list(range(1, 401))
    assert "".join(by_id[i]["payload"]["token"] for i in generation[1:-1]) == result.text
    assert generation_seconds < 10, "generation did not wait for Redis"
    sample = metrics.registry.get_sample_value
    assert (sample("kr_serve_retry_attempts_total", {"operation": "xadd"}) or 0) > 0
    assert (sample("kr_serve_circuit_breaker_state_changes_total", {"state": "open"}) or 0) >= 1
    assert (sample("kr_serve_circuit_breaker_state_changes_total", {"state": "closed"}) or 0) >= 1


def test_past_the_memory_bound_events_wait_on_disk_and_arrive_in_order(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    own_redis.stop()
    spool = tmp_path / "spool"
    publisher = publisher_for(own_redis, spool, max_memory=10)
    emitter = EngineEventEmitter(source="h/w", publisher=publisher)
    ids = emit_runtime_statuses(emitter, 100)
    assert publisher.pending() == 100
    on_disk = sum(len(p.read_bytes().splitlines()) for p in spool.glob("*.jsonl"))
    assert on_disk == 90
    own_redis.start()
    assert publisher.flush(timeout=20)
    publisher.close()
    assert list(dict.fromkeys(e["id"] for e in stream_events(redis.Redis.from_url(own_redis.url)))) == ids
    assert list(spool.glob("*.jsonl")) == []


def test_events_left_on_disk_by_a_dead_worker_are_delivered_by_the_next(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    own_redis.stop()
    spool = tmp_path / "spool"
    first = publisher_for(own_redis, spool, max_memory=5)
    ids = emit_runtime_statuses(EngineEventEmitter(source="h/w", publisher=first), 20)
    first.close(timeout=0.5)  # Redis still down: everything stays in the spool file
    assert sum(len(p.read_bytes().splitlines()) for p in spool.glob("*.jsonl")) == 20
    own_redis.start()
    second = publisher_for(own_redis, spool)
    later = emit_runtime_statuses(EngineEventEmitter(source="h/w", publisher=second), 3)
    assert second.flush(timeout=20)
    second.close()
    delivered = list(dict.fromkeys(e["id"] for e in stream_events(redis.Redis.from_url(own_redis.url))))
    assert delivered == ids + later


def test_publish_never_blocks_on_a_dead_redis(tmp_path: Path) -> None:
    client = redis.Redis(port=1, socket_connect_timeout=0.5)
    publisher = BufferedPublisher(client=client, stream=STREAM, spool_dir=tmp_path, metrics=WorkerMetrics())
    emitter = EngineEventEmitter(source="h/w", publisher=publisher)
    started = time.perf_counter()
    for _ in range(1000):
        emitter.token_generated(generation_id=uuid.uuid4(), seq=1, model="m", token="x")
    assert time.perf_counter() - started < 10  # a connection attempt each would take 500 s
    assert publisher.pending() == 1000
    publisher.close(timeout=0.2)


def test_the_circuit_breaker_opens_then_tries_again() -> None:
    changes: list[str] = []
    breaker = CircuitBreaker(threshold=2, cooldown=0.05, on_change=changes.append)
    breaker.failure()
    assert breaker.allow()
    breaker.failure()
    assert not breaker.allow()
    time.sleep(0.06)
    assert breaker.allow() and breaker.state == "half_open"
    breaker.failure()  # the trial failed: open again, longer cool-down
    assert breaker.state == "open" and breaker.cooldown == 0.1
    time.sleep(0.11)
    assert breaker.allow()
    breaker.success()
    assert changes == ["open", "half_open", "open", "half_open", "closed"]


def test_past_the_stream_backlog_limit_events_wait_locally_until_the_ingester_catches_up(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(own_redis.url)
    client.xgroup_create(STREAM, "ingest", id="0", mkstream=True)
    for i in range(5):  # the ingester is behind: five entries nobody has stored
        client.xadd(STREAM, {"e": f'{{"filler": {i}}}'.encode()})
    spool = tmp_path / "spool"
    publisher = publisher_for(own_redis, spool, max_memory=10, backlog_limit=5, group="ingest", linger=0.05)
    emitter = EngineEventEmitter(source="h/w", publisher=publisher)
    ids = emit_runtime_statuses(emitter, 30)
    time.sleep(1.0)
    assert client.xlen(STREAM) == 5, "nothing added while the backlog is at its limit"
    assert publisher.pending() == 30
    assert sum(len(p.read_bytes().splitlines()) for p in spool.glob("*.jsonl")) == 20  # past memory: on disk
    # The ingester stores and acknowledges the backlog; the held events follow, in order.
    read: Any = client.xreadgroup("ingest", "i1", {STREAM: ">"})
    for _stream, entries in read:
        client.xack(STREAM, "ingest", *[entry_id for entry_id, _ in entries])
    assert publisher.flush(timeout=20)
    publisher.close()
    sent = [e["id"] for e in stream_events(client) if "id" in e]
    assert list(dict.fromkeys(sent)) == ids


def test_spooled_events_are_readable_by_the_worker_alone(own_redis: RedisServer, tmp_path: Path) -> None:
    own_redis.stop()
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o755)  # made earlier with looser rights
    publisher = publisher_for(own_redis, spool, max_memory=1)
    emit_runtime_statuses(EngineEventEmitter(source="h/w", publisher=publisher), 5)
    publisher.close(timeout=0.2)
    files = list(spool.iterdir())
    assert any(p.suffix == ".jsonl" for p in files)
    assert spool.stat().st_mode & 0o777 == 0o700
    assert {p.stat().st_mode & 0o777 for p in files} == {0o600}


def test_a_damaged_spool_record_is_skipped_and_counted_and_the_rest_delivered_in_order(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    own_redis.stop()
    spool = tmp_path / "spool"
    first = publisher_for(own_redis, spool, max_memory=1)
    ids = emit_runtime_statuses(EngineEventEmitter(source="h/w", publisher=first), 4)
    first.close(timeout=0.2)
    [left] = spool.glob("*.jsonl")
    lines = left.read_bytes().splitlines(keepends=True)
    # A disk error garbles the second record and the fourth; the others are intact.
    left.write_bytes(lines[0] + b"\x00\xff garbage\n" + lines[2] + b'{"cut off\n' + lines[3])
    own_redis.start()
    metrics = WorkerMetrics()
    second = publisher_for(own_redis, spool, metrics)
    assert second.flush(timeout=20)
    second.close()
    delivered = [e["id"] for e in stream_events(redis.Redis.from_url(own_redis.url))]
    assert delivered == [ids[0], ids[2], ids[3]]
    assert metrics.registry.get_sample_value("kr_serve_errors_total", {"code": "SpoolCorrupt"}) == 2


def test_past_its_size_cap_the_spool_drops_its_oldest_events_and_counts_them(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    own_redis.stop()
    spool, metrics = tmp_path / "spool", WorkerMetrics()
    one_event = 250  # bytes: a runtimeStatus line here is about 240
    publisher = publisher_for(own_redis, spool, metrics, max_memory=1, spool_max_bytes=20 * one_event)
    ids = emit_runtime_statuses(EngineEventEmitter(source="h/w", publisher=publisher), 100)
    deadline = time.monotonic() + 10
    while not metrics.registry.get_sample_value("kr_serve_errors_total", {"code": "SpoolFull"}):
        assert time.monotonic() < deadline, "the cap was never enforced"
        time.sleep(0.05)
    time.sleep(0.3)
    [left] = spool.glob("*.jsonl")
    assert left.stat().st_size <= 20 * one_event
    dropped = int(metrics.registry.get_sample_value("kr_serve_errors_total", {"code": "SpoolFull"}) or 0)
    own_redis.start()
    assert publisher.flush(timeout=20)
    publisher.close()
    delivered = list(dict.fromkeys(e["id"] for e in stream_events(redis.Redis.from_url(own_redis.url))))
    # The one event held in memory and the newest of the spool survive, in order; every event is
    # either delivered or counted as dropped.
    assert delivered == [ids[0], *ids[-(len(delivered) - 1) :]]
    assert len(delivered) + dropped == 100


def test_batches_of_token_events_past_the_memory_bound_keep_their_order(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """``publish_many`` (a generation's token batch) fills memory to its bound, then the spool,
    and later single events follow them: all arrive, in the order they were handed over."""
    own_redis.stop()
    spool = tmp_path / "spool"
    publisher = publisher_for(own_redis, spool, max_memory=10)
    emitter = EngineEventEmitter(source="h/w", publisher=publisher)
    gid, now_ms = uuid.uuid4(), time.time_ns() // 1_000_000
    ids = emit_runtime_statuses(emitter, 4)
    for first in (1, 8, 15):  # 4 + 7 fills memory past its 10; the rest go to disk
        emitter.tokens_generated(
            generation_id=gid, model="m", tokens=[(s, now_ms, f"t{s}", -1.0) for s in range(first, first + 7)]
        )
    ids += emit_runtime_statuses(emitter, 2)
    assert publisher.pending() == 27
    assert sum(len(p.read_bytes().splitlines()) for p in spool.glob("*.jsonl")) == 17
    own_redis.start()
    assert publisher.flush(timeout=20)
    publisher.close()
    events = list({e["id"]: e for e in stream_events(redis.Redis.from_url(own_redis.url))}.values())
    assert [e["seq"] for e in events if e["type"] == "tokenGenerated"] == list(range(1, 22))
    assert [e["type"] for e in events] == ["runtimeStatus"] * 4 + ["tokenGenerated"] * 21 + [
        "runtimeStatus"
    ] * 2
    assert [e["id"] for e in events if e["type"] == "runtimeStatus"] == ids


def test_past_the_streams_bytes_in_redis_events_wait_locally_too(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    # Entries alone would not bound memory (one entry may hold thousands of events): a stream
    # holding more bytes than allowed gets nothing more until the ingester trims it.
    client = redis.Redis.from_url(own_redis.url)
    client.xgroup_create(STREAM, "ingest", id="0", mkstream=True)
    client.xadd(STREAM, {"b": b"[" + b"1," * 100_000 + b"1]"})  # one entry, 200 KB
    publisher = publisher_for(
        own_redis, tmp_path / "spool", max_memory=100, backlog_limit=1_000, group="ingest", linger=0.05
    )
    publisher.backlog_bytes = 100_000
    ids = emit_runtime_statuses(EngineEventEmitter(source="h/w", publisher=publisher), 10)
    time.sleep(1.0)
    assert client.xlen(STREAM) == 1 and publisher.pending() == 10
    client.delete(STREAM)  # stored and trimmed
    client.xgroup_create(STREAM, "ingest", id="0", mkstream=True)
    assert publisher.flush(timeout=20)
    publisher.close()
    assert [e["id"] for e in stream_events(client) if "id" in e] == ids


def test_a_batch_stops_short_of_what_one_entry_may_hold() -> None:
    from mlxserve.contract.stream import ENTRY_MAX_BYTES
    from mlxserve.engine.publisher import _within_entry

    bodies = [b"x" * (700 * 1024)] * 5
    batch = _within_entry(bodies)
    assert len(batch) == 2 and sum(map(len, batch)) < ENTRY_MAX_BYTES
    assert _within_entry([b"y" * (ENTRY_MAX_BYTES // 2 + 10)]) == [b"y" * (ENTRY_MAX_BYTES // 2 + 10)]
