"""Retention at tens of millions of rows on PostgreSQL: batched deletes against one big DELETE.

Fills a scratch database with ``--rows`` events (default 10 million: token events
and some lifecycle events spread over 30 days, all indexes in place), then deletes
one day of token events past the cutoff twice: with ``events_retention_apply``
(one time window of about 10,000 rows a transaction, a range scan of the
(type, timestamp) index) and, as the
baseline, with one ``DELETE ... WHERE type = ... AND timestamp < ...`` for the next
day. Prints rows/s for each and the longest single transaction (how long rows
stay locked and a replica lags).

    .venv/bin/python bench/retention.py [--rows 10000000]
        [--postgres postgres://postgres@127.0.0.1:5432/postgres]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SCRATCH_DB = "mlxserve_bench_retention"
DAY_MS = 86_400_000


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--postgres", default="postgres://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()

    import psycopg

    with psycopg.connect(args.postgres, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {SCRATCH_DB}")
        conn.execute(f"CREATE DATABASE {SCRATCH_DB}")
    os.environ["DATABASE_URL"] = args.postgres.rsplit("/", 1)[0] + "/" + SCRATCH_DB
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mlxserve.settings")
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection

    from events.models import RetentionPolicy
    from events.retention import events_retention_apply

    try:
        call_command("migrate", verbosity=0)
        now_ms = 1_800_000_000_000
        span = 30 * DAY_MS
        print(f"filling {args.rows:,} events over 30 days (indexes in place) ...", flush=True)
        started = time.perf_counter()
        chunk = 1_000_000
        with connection.cursor() as cursor:
            for first in range(0, args.rows, chunk):
                last = min(args.rows, first + chunk)
                cursor.execute(
                    "INSERT INTO events_event (id, type, timestamp, source, generation_id, seq, model, "
                    "payload, ingested_at) SELECT gen_random_uuid(), "
                    "CASE WHEN i %% 50 = 0 THEN 'generationStarted' ELSE 'tokenGenerated' END, "
                    "%s - (i::bigint * %s / %s), 'host-' || (i %% 8) || '/w', NULL, i %% 512, 'llama', "
                    '\'{"model": "llama", "token": "x"}\'::jsonb, now() '
                    "FROM generate_series(%s, %s) AS i",
                    [now_ms, span, args.rows, first, last - 1],
                )
                print(f"  {last:,} rows ({time.perf_counter() - started:.0f}s)", flush=True)
            cursor.execute("ANALYZE events_event")

        RetentionPolicy.objects.exclude(event_type="tokenGenerated").delete()
        # Batched: tokens kept 29 days, so the oldest day goes.
        RetentionPolicy.objects.filter(event_type="tokenGenerated").update(keep_days=29)
        chunks: list[float] = []
        started = time.perf_counter()
        deleted = events_retention_apply(
            now_ms=now_ms, chunk=10_000, on_chunk=lambda _type, _count, seconds: chunks.append(seconds)
        )["tokenGenerated"]
        batched_seconds = time.perf_counter() - started

        # Baseline: one statement for the next day.
        with connection.cursor() as cursor:
            started = time.perf_counter()
            cursor.execute(
                "DELETE FROM events_event WHERE type = 'tokenGenerated' AND timestamp < %s",
                [now_ms - 28 * DAY_MS],
            )
            single_deleted = cursor.rowcount
            single_seconds = time.perf_counter() - started
    finally:
        connection.close()
        with psycopg.connect(args.postgres, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {SCRATCH_DB}")

    print(
        f"batched (about 10,000 rows a transaction): {deleted:,} rows in {batched_seconds:.1f}s "
        f"= {deleted / batched_seconds:,.0f} rows/s, longest transaction {max(chunks):.2f}s"
    )
    print(
        f"baseline (one DELETE): {single_deleted:,} rows in {single_seconds:.1f}s "
        f"= {single_deleted / single_seconds:,.0f} rows/s, one transaction of {single_seconds:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
