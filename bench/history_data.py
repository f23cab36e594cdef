"""A scratch PostgreSQL database of history events for bench/api.py: a fleet's month of
generations (512 tokens each, 8 workers, 4 models, errors among them) written by COPY in the order
the ingester writes them, into time partitions made first, then vacuumed as autovacuum would."""

from __future__ import annotations

import random
import struct
import time
import uuid
from collections.abc import Iterator

DAY_MS = 86_400_000
MODELS = ["llama-3-8b", "qwen-2.5-7b", "mistral-7b", "phi-3-mini"]
SOURCES = [f"mac-studio-{i}/worker-1" for i in range(8)]
TOKENS = 512


FLOAT32 = struct.Struct("<f")
CONCURRENT = 16  # generations running at once, their tokens interleaved in time as a fleet's are


def _lines(
    rows: int, layout: str, channels: dict[tuple[str, str], int], now_ms: int
) -> Iterator[tuple[str, str]]:
    """(table, COPY line) of every event, in time order within each group of CONCURRENT
    generations (the order the ingester writes them). ``layout`` "typed": token events as
    events_token rows; "json": as events_event rows with a JSON payload (before issue 25)."""
    rng = random.Random(7)
    generations = max(rows // (TOKENS + 2), 1)
    span = 30 * DAY_MS
    at = "2026-11-26 00:00:00+00"
    for group in range(0, generations, CONCURRENT):
        batch: list[tuple[int, str, str]] = []
        t_group = now_ms - span + group * span // generations
        for g in range(group, min(group + CONCURRENT, generations)):
            gid = uuid.UUID(int=rng.getrandbits(128), version=4)
            source, model = SOURCES[g % len(SOURCES)], MODELS[g % len(MODELS)]
            t0 = t_group + (g - group) * 37

            def record(
                kind: str,
                ts: int,
                seq: int,
                payload: str,
                source: str = source,
                model: str = model,
                gid: uuid.UUID = gid,
                batch: list[tuple[int, str, str]] = batch,
            ) -> None:
                ident = uuid.UUID(int=rng.getrandbits(128), version=4)
                line = f"{ident}\t{kind}\t{ts}\t{source}\t{gid}\t{seq}\t{model}\t{payload}\t{at}\n"
                batch.append((ts, "events_event", line))

            record("generationStarted", t0, 0, f'{{"model": "{model}", "prompt": "hmac-sha256:00"}}')
            channel = channels.get((source, model), 0)
            for seq in range(1, TOKENS + 1):
                # A 32-bit float, as mlx computes it (and as the typed column holds it).
                ts, logprob = t0 + 150 + seq * 20, FLOAT32.unpack(FLOAT32.pack(-rng.random() * 4))[0]
                if layout == "json":
                    payload = f'{{"model": "{model}", "token": "t{seq}", "logprob": {logprob!r}}}'
                    record("tokenGenerated", ts, seq, payload)
                else:
                    ident = uuid.UUID(int=rng.getrandbits(128), version=4)
                    batch.append(
                        (
                            ts,
                            "events_token",
                            f"{ident.hex}\t{gid.hex}\t{ts}\t{logprob!r}\t{at}\t{seq}\t{channel}\tt{seq}\n",
                        )
                    )
            completed = (
                f'{{"model": "{model}", "tokensGenerated": {TOKENS}, "durationMs": {150 + TOKENS * 20}}}'
            )
            record("generationCompleted", t0 + 200 + TOKENS * 20, TOKENS + 1, completed)
            if g % 97 == 0:
                record(
                    "error", t0 + 300, 0, f'{{"error": "Out of memory", "code": "OOM", "model": "{model}"}}'
                )
        batch.sort(key=lambda item: item[0])
        yield from ((table, line) for _, table, line in batch)


def fill(dsn: str, rows: int, layout: str, now_ms: int) -> None:
    """COPY ``rows`` events in, ending at ``now_ms`` (the time partitions made for them first)."""
    import psycopg

    started = time.perf_counter()
    token_columns = 'id, generation_id, "timestamp", logprob, ingested_at, seq, channel_id, token'
    columns = "id, type, timestamp, source, generation_id, seq, model, payload, ingested_at"
    written = 0
    with psycopg.connect(dsn) as conn, conn.cursor() as cursor:
        channels = {}
        for g in range(len(SOURCES)):
            pair = (SOURCES[g % len(SOURCES)], MODELS[g % len(MODELS)])
            cursor.execute(
                "INSERT INTO events_channel (source, model) VALUES (%s, %s) RETURNING id", list(pair)
            )
            channels[pair] = cursor.fetchone()[0]  # type: ignore[index]
        buffers: dict[str, list[str]] = {"events_event": [], "events_token": []}

        def flush() -> None:
            for table, lines in buffers.items():
                if lines:
                    with cursor.copy(
                        f"COPY {table} ({token_columns if table == 'events_token' else columns}) FROM STDIN"
                    ) as copy:
                        copy.write("".join(lines))
                    lines.clear()
            conn.commit()

        for table, line in _lines(rows, layout, channels, now_ms):
            buffers[table].append(line)
            written += 1
            if written % 100_000 == 0:
                flush()
                if written % 2_000_000 == 0:
                    print(f"  {written:,} rows ({time.perf_counter() - started:.0f}s)", flush=True)
        flush()
    # As autovacuum would after a bulk load (it is off on this machine; since PostgreSQL 13 it also
    # vacuums insert-only tables): the statistics, and the hint bits and visibility map a table that
    # has been read and vacuumed has. Right after COPY, each first read of a row writes its hint
    # bits: measured so, the API was 5-10 ms slower a request and deep offsets timed out.
    print("VACUUM (ANALYZE) after the bulk load ...", flush=True)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE) events_event")
        conn.execute("VACUUM (ANALYZE) events_token")
    print(f"filled {written:,} events ({layout}) in {time.perf_counter() - started:.0f}s", flush=True)


PARTITIONS = """
from events.partitions import partitions_ensure
for day in range({days}, -2, -1):
    partitions_ensure(now_ms={now} - day * 86_400_000)
"""


def sizes(dsn: str) -> dict[str, float]:
    """Bytes on disk (heap, TOAST, every index) per stored event of each table, and its rows."""
    import psycopg

    figures: dict[str, float] = {}
    with psycopg.connect(dsn) as conn:
        for table in ("events_token", "events_event"):
            total, count = conn.execute(
                "SELECT coalesce(sum(pg_total_relation_size(i.inhrelid)), 0), coalesce(sum(c.reltuples), 0) "
                "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = %s::regclass",
                [table],
            ).fetchone()  # type: ignore[misc]
            figures[table] = float(total)
            figures[f"{table} rows"] = float(count)
    return figures
