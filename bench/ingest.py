"""Events/s from the Redis stream into PostgreSQL (the bars: at least 25,000 events/s sustained,
50,000 for one ingester process).

The ingester (``EventIngester``: XREADGROUP, validation, COPY + INSERT ... ON
CONFLICT, XACK after commit) beside a baseline of one ORM ``save()`` per event,
on the same kind of data in the same run. Events are written to the stream as
workers write them (one entry per batch of 500). The database is a scratch one
this script creates and drops.

    .venv/bin/python bench/ingest.py [--events 200000] [--baseline-events 10000]
        [--postgres postgres://postgres@127.0.0.1:5432/postgres] [--redis-url redis://127.0.0.1:6379/12]
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SCRATCH_DB = "mlxserve_bench_ingest"


def drain(consumer: str, redis_url: str) -> int:
    """One ingester (consumer ``consumer`` of the group) storing until the stream is empty,
    with the garbage collection ``ingest_events`` runs with."""
    from events.ingest import gc_for_batches

    with gc_for_batches():
        return _drain(consumer, redis_url)


def _drain(consumer: str, redis_url: str) -> int:
    import redis
    from django.db import connection

    from events.ingest import EventIngester

    client = redis.Redis.from_url(redis_url)
    ingester = EventIngester(
        client=client, stream="bench:events", group="bench", consumer=consumer, block_ms=10
    )
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        backend = cursor.fetchone()[0]
    stored, started, last_report = 0, time.perf_counter(), time.perf_counter()
    cpu, backend_cpu = time.process_time(), _cpu_seconds(backend)
    try:
        while True:
            outcome = ingester.step()
            stored += outcome.stored
            if time.perf_counter() - last_report >= 2:
                rate = stored / (time.perf_counter() - started)
                print(f"  {consumer}: {stored:,} stored, {rate:,.0f} events/s", flush=True)
                last_report = time.perf_counter()
            if outcome.stored + outcome.duplicates + outcome.dead == 0:
                # The cost itself, which the noise of a shared host moves less than a rate:
                # CPU time of this process and of its PostgreSQL backend, per event stored.
                line = "CPU per event: ingester {:.1f} µs, its PostgreSQL backend {:.1f} µs"
                mine = (time.process_time() - cpu) / max(stored, 1) * 1e6
                theirs = (_cpu_seconds(backend) - backend_cpu) / max(stored, 1) * 1e6
                print(f"  {consumer}: " + line.format(mine, theirs))
                return stored
    finally:
        connection.close()


def _cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of a local process (Linux /proc), 0 where it cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--baseline-events", type=int, default=10_000)
    parser.add_argument(
        "--per-entry",
        type=int,
        default=500,
        help="Events per stream entry: 500 as workers send, 1 as the API does.",
    )
    parser.add_argument(
        "--consumers",
        type=int,
        default=1,
        help="Ingester processes in the consumer group (as `ingest_events` run N times).",
    )
    parser.add_argument("--postgres", default="postgres://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    args = parser.parse_args()

    import psycopg

    admin_url = args.postgres
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {SCRATCH_DB}")
        conn.execute(f"CREATE DATABASE {SCRATCH_DB}")
    os.environ["DATABASE_URL"] = admin_url.rsplit("/", 1)[0] + "/" + SCRATCH_DB
    os.environ["REDIS_URL"] = args.redis_url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mlxserve.settings")

    import django

    django.setup()
    import msgspec
    import redis
    from django.core.management import call_command
    from django.db import connection

    from events.models import Event, EventRecord
    from events.storage import _EVENT_COLUMNS, _event_values
    from mlxserve.bus import stream_append_batch
    from mlxserve.contract.events import envelope_decode

    call_command("migrate", verbosity=0)
    client = redis.Redis.from_url(args.redis_url)
    client.flushdb()
    try:
        source = "bench-host/worker-1"
        # The last minutes: the day's partition, where a worker's tokens go.
        start_ms = int(time.time() * 1000) - args.events

        def envelope(i: int, generation: str) -> bytes:
            return msgspec.json.encode(
                {
                    "id": str(uuid.uuid4()),
                    "type": "tokenGenerated",
                    "timestamp": start_ms + i,
                    "source": source,
                    "generationId": generation,
                    "seq": i % 512 + 1,
                    "payload": {
                        "model": "llama-3-8b",
                        "token": f" tok{i % 997}",
                        # A 32-bit float, as mlx computes it.
                        "logprob": struct.unpack("<f", struct.pack("<f", -0.5 - (i % 7) / 10))[0],
                    },
                }
            )

        print(f"writing {args.events:,} events to the stream ...", flush=True)
        generation = str(uuid.uuid4())
        batch: list[bytes] = []
        for i in range(args.events):
            if i % 512 == 0:
                generation = str(uuid.uuid4())
            batch.append(envelope(i, generation))
            if len(batch) == args.per_entry:
                stream_append_batch(client, "bench:events", batch)
                batch = []
        stream_append_batch(client, "bench:events", batch)

        connection.close()  # the consumers open their own
        started = time.perf_counter()
        if args.consumers == 1:
            stored = drain("c1", args.redis_url)
        else:
            import multiprocessing

            context = multiprocessing.get_context("fork")
            with context.Pool(args.consumers) as pool:
                stored = sum(pool.starmap(drain, [(f"c{n}", args.redis_url) for n in range(args.consumers)]))
        ingest_seconds = time.perf_counter() - started
        assert Event.objects.count() == args.events == stored, "not every event was stored"
        pending = client.xpending("bench:events", "bench")["pending"]
        assert pending == 0, f"{pending} entries left unacknowledged"
        ingest_rate = stored / ingest_seconds

        print(f"baseline: one ORM save() per event, {args.baseline_events:,} events ...", flush=True)
        from django.utils import timezone

        bodies = [envelope(i, str(uuid.uuid4())) for i in range(args.baseline_events)]
        started = time.perf_counter()
        for body in bodies:
            values = dict(
                zip(
                    _EVENT_COLUMNS,
                    _event_values(envelope_decode(body), timezone.now()),
                    strict=True,
                )
            )
            values["payload"] = msgspec.json.decode(values["payload"])
            EventRecord(**values).save()  # the JSON table: a row per event, as the ORM would
        baseline_rate = args.baseline_events / (time.perf_counter() - started)
    finally:
        client.flushdb()
        connection.close()
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {SCRATCH_DB} WITH (FORCE)")  # the pool's connections too

    print(
        f"ingester ({args.consumers} process(es)): {ingest_rate:,.0f} events/s "
        f"({args.events:,} events, {args.per_entry} per stream entry, "
        "stream to PostgreSQL, acknowledged)"
    )
    print(
        f"baseline: {baseline_rate:,.0f} events/s (ORM save() per event); "
        f"the ingester is {ingest_rate / baseline_rate:.0f}x faster"
    )
    # The contract's bar is 25,000 events/s; issue 14 raised it to 45,000 for one process, issue 25 to 50,000.
    bar = 50_000 if args.consumers == 1 else 25_000
    verdict = "PASS" if ingest_rate >= bar else "FAIL"
    print(f"{verdict} (bar {bar:,} events/s)")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
