"""The upgrade to partitioned events on a table holding events: how long it takes, and how long
writes wait while it runs.

Makes a scratch PostgreSQL database at migration 0019 (the JSON events table as before: one
table, key ``id``, five list indexes), fills it with ``--rows`` events by COPY, ANALYZEs it (as
autovacuum would), then runs migration 0020 while a writer inserts an event every 10 ms through
the whole run (as an ingester would) and records each insert's wait. Prints the migration's
time, its time per million rows, and the longest wait of a write: the window in which the
ingester is held up.

    .venv/bin/python bench/upgrade.py [--rows 1000000] [--postgres postgres://postgres@127.0.0.1:5432/postgres]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRATCH_DB = "mlxserve_bench_upgrade"
T0 = 1_764_115_200_000


def fill(dsn: str, rows: int) -> None:
    import psycopg

    columns = "id, type, timestamp, source, generation_id, seq, model, payload, ingested_at"
    started = time.perf_counter()
    with psycopg.connect(dsn) as conn, conn.cursor() as cursor:
        for start in range(0, rows, 100_000):
            lines = []
            for n in range(start, min(rows, start + 100_000)):
                gid = uuid.UUID(int=n // 250 + 1)
                lines.append(
                    f"{uuid.uuid4()}\ttokenGenerated\t{T0 + n * 20}\tmac-{n % 8}/worker-1\t{gid}\t{n % 250}\t"
                    f'llama-3-8b\t{{"model": "llama-3-8b", "token": "t{n}", "logprob": -0.25}}\t'
                    "2025-11-26 00:00:00+00\n"
                )
            with cursor.copy(f"COPY events_event ({columns}) FROM STDIN") as copy:
                copy.write("".join(lines))
            conn.commit()
            print(f"  {min(rows, start + 100_000):,} rows ({time.perf_counter() - started:.0f}s)", flush=True)
        cursor.execute("ANALYZE events_event")
        conn.commit()


def writer(dsn: str, stop: threading.Event, waits: list[float]) -> None:
    """An event every 10 ms, as an ingester stores them, each insert's wait recorded."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        n = 0
        while not stop.is_set():
            started = time.perf_counter()
            conn.execute(
                "INSERT INTO events_event (id, type, timestamp, source, generation_id, seq, model, payload, "
                "ingested_at) VALUES (%s, 'runtimeStatus', %s, 'mac-0', NULL, %s, '', '{}', now())",
                [uuid.uuid4(), int(time.time() * 1000), n],
            )
            waits.append(time.perf_counter() - started)
            n += 1
            time.sleep(0.01)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--postgres", default="postgres://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()

    import psycopg

    dsn = args.postgres.rsplit("/", 1)[0] + "/" + SCRATCH_DB
    with psycopg.connect(args.postgres, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {SCRATCH_DB}")
        conn.execute(f"CREATE DATABASE {SCRATCH_DB}")
    env = {**os.environ, "DATABASE_URL": dsn, "MLXSERVE_DB_POOL_SIZE": "0"}
    migrate = [sys.executable, "manage.py", "migrate", "-v", "0"]
    subprocess.run([*migrate, "events", "0019_token_events"], cwd=ROOT, env=env, check=True)
    print(f"filling {args.rows:,} events into the table as it was (key id, five indexes) ...", flush=True)
    fill(dsn, args.rows)

    stop, waits = threading.Event(), list[float]()
    thread = threading.Thread(target=writer, args=(dsn, stop, waits))
    thread.start()
    time.sleep(1)
    started = time.perf_counter()
    subprocess.run([*migrate, "events", "0020_time_partitions"], cwd=ROOT, env=env, check=True)
    seconds = time.perf_counter() - started
    time.sleep(1)
    stop.set()
    thread.join()
    with psycopg.connect(dsn) as conn:
        kept = conn.execute("SELECT count(*) FROM events_event").fetchone()
        where = conn.execute(
            "SELECT tableoid::regclass::text, count(*) FROM events_event GROUP BY 1 ORDER BY 1"
        ).fetchall()
    per_million = seconds / args.rows * 1e6
    print(f"migration 0020: {seconds:.1f} s for {args.rows:,} rows ({per_million:.1f} s a million)")
    print(f"writes during it: {len(waits)}, longest wait {max(waits) * 1000:.0f} ms (the ingester's pause)")
    print(f"rows after: {kept[0] if kept else 0:,} in {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
