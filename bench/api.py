"""The history API at 10 million events: p50/p99 over HTTP, cursor pages against offset pages.

Fills a scratch PostgreSQL database by COPY with ``--rows`` events (default 10
million: generations of 512 tokens from 8 workers and 4 models over 30 days,
plus errors and status events, every index in place), starts gunicorn on it, and
times ``--requests`` sequential keep-alive requests per case:

- the event list (cursor pagination, 100 a page) unfiltered, with each filter of
  the API's filters, combined, and 50 pages deep by cursor;
- the generation view, the stats endpoint (last hour) and the admin event list;
- the baseline, in the same run against the same server: the same list with
  offset pagination (``?limit=100&offset=N``), at random offsets and filtered.

    .venv/bin/python bench/api.py [--rows 10000000] [--requests 200]
        [--postgres postgres://postgres@127.0.0.1:5432/postgres] [--keep] [--server asgi|wsgi]

The server is gunicorn as deployed (``mlxserve.asgi``, uvicorn's workers; ``--server wsgi``: sync
workers on ``mlxserve.wsgi``, as the figures before 2026-12-06 were measured), 2 processes.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlencode, urlparse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.history_data import DAY_MS, MODELS, PARTITIONS, SOURCES, fill, sizes  # noqa: E402
from mlxserve.host.service_files import WEB_SERVER_ARGS  # noqa: E402  (after the path)

SCRATCH_DB = "mlxserve_bench_api"
# Where the events end: the wall clock (to the minute) when the scratch database was filled, as a
# fleet's events run up to now (the list's first page is looked for in the day before the clock).
# Kept in the database (bench_now) for --keep; a database filled before that ends at 1.8e12.
NOW_MS = 0
LEGACY_NOW_MS = 1_800_000_000_000


class Client:
    def __init__(self, base: str, headers: dict[str, str]) -> None:
        url = urlparse(base)
        # As the server's: a baseline that reads every event may take minutes on a cold cache.
        self.conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=600)
        self.headers = headers

    def get(self, path: str) -> tuple[int, bytes, float]:
        started = time.perf_counter()
        try:
            self.conn.request("GET", path, headers=self.headers)
            response = self.conn.getresponse()
        except (http.client.RemoteDisconnected, ConnectionResetError) as exc:
            # The server closed a kept-alive connection between two requests: say so, reconnect.
            print(f"  (reconnected: {type(exc).__name__}; this request timed from the retry)", flush=True)
            self.conn.close()
            started = time.perf_counter()
            self.conn.request("GET", path, headers=self.headers)
            response = self.conn.getresponse()
        body = response.read()
        return response.status, body, (time.perf_counter() - started) * 1000


ONLY: list[str] = []  # --only: the cases whose names start with one of these


def measure(client: Client, name: str, paths: Callable[[int], str], n: int) -> tuple[float, float]:
    if ONLY and not any(name.startswith(prefix) for prefix in ONLY):
        return 0.0, 0.0
    for i in range(3):  # warm this query's plan and pages, and the worker, first
        client.get(paths(i))
    times = []
    for i in range(n):
        status, body, ms = client.get(paths(i))
        if status != 200:
            raise SystemExit(f"{name}: HTTP {status} {body[:300]!r}")
        times.append(ms)
    times.sort()
    p50, p99 = statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.99))]
    print(f"  {name:<52} p50 {p50:7.1f} ms   p99 {p99:7.1f} ms", flush=True)
    return p50, p99


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--postgres", default="postgres://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--keep", action="store_true", help="reuse a filled scratch database if present")
    parser.add_argument(
        "--layout",
        choices=["typed", "json"],
        default="typed",
        help="token events in typed columns (events_token, as stored now) or JSON rows (before issue 25)",
    )
    parser.add_argument(
        "--server",
        choices=["asgi", "wsgi"],
        default="asgi",
        help="the web server: ASGI with uvicorn's workers, as deployed (default), or gunicorn's sync workers",
    )
    parser.add_argument(
        "--only", action="append", default=[], help="only the cases whose names start with this (repeatable)"
    )
    args = parser.parse_args()
    ONLY.extend(args.only)

    import psycopg

    scratch = f"{SCRATCH_DB}_{args.layout}"
    dsn = args.postgres.rsplit("/", 1)[0] + "/" + scratch
    with psycopg.connect(args.postgres, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [scratch]).fetchone()
        if not (args.keep and exists):
            conn.execute(f"DROP DATABASE IF EXISTS {scratch}")
            conn.execute(f"CREATE DATABASE {scratch}")
            exists = None
    env = {
        **os.environ,
        "DATABASE_URL": dsn,
        "DJANGO_SETTINGS_MODULE": "bench.api_settings",
        # The web server takes its keys from the environment only (DEBUG is off): bench-only ones.
        "SECRET_KEY": os.environ.get("SECRET_KEY") or secrets.token_urlsafe(50),
        "MLXSERVE_PROMPT_HASH_KEY": os.environ.get("MLXSERVE_PROMPT_HASH_KEY") or secrets.token_urlsafe(50),
    }
    python = sys.executable
    subprocess.run([python, "manage.py", "migrate", "-v", "0"], cwd=ROOT, env=env, check=True)
    global NOW_MS
    with psycopg.connect(dsn, autocommit=True) as conn:
        if exists:
            kept = conn.execute("SELECT to_regclass('bench_now') IS NOT NULL").fetchone()
            row = conn.execute("SELECT now_ms FROM bench_now").fetchone() if kept and kept[0] else None
            NOW_MS = int(row[0]) if row else LEGACY_NOW_MS
        else:
            NOW_MS = time.time_ns() // 60_000_000_000 * 60_000
            conn.execute("CREATE TABLE bench_now (now_ms bigint NOT NULL)")
            conn.execute("INSERT INTO bench_now VALUES (%s)", [NOW_MS])
    if not exists:
        script = PARTITIONS.format(days=31, now=NOW_MS)
        subprocess.run([python, "manage.py", "shell", "-c", script], cwd=ROOT, env=env, check=True)
        print(f"filling {args.rows:,} events by COPY (indexes in place) ...", flush=True)
        fill(dsn, args.rows, args.layout, NOW_MS)
    on_disk = sizes(dsn)
    tokens = on_disk["events_token rows"] or on_disk["events_event rows"]
    per_token = (on_disk["events_token"] if args.layout == "typed" else on_disk["events_event"]) / max(
        tokens, 1
    )
    print(
        f"on disk ({args.layout}): token events {on_disk['events_token'] / 2**30:.2f} GiB for "
        f"{on_disk['events_token rows']:,.0f} rows; JSON events "
        f"{on_disk['events_event'] / 2**30:.2f} GiB for "
        f"{on_disk['events_event rows']:,.0f} rows; {per_token:.0f} bytes a token event, indexes included "
        "(bar: at most 200)",
        flush=True,
    )
    with psycopg.connect(dsn) as conn:
        rolled_up = conn.execute("SELECT 1 FROM events_statsrollup LIMIT 1").fetchone()
    if not rolled_up:
        # COPY bypasses the ingester, so the stats rollups are built from the stored events.
        print("building the hourly stats rollups (rollup_events --rebuild) ...", flush=True)
        started = time.perf_counter()
        subprocess.run([python, "manage.py", "rollup_events", "--rebuild"], cwd=ROOT, env=env, check=True)
        print(f"rollups built in {time.perf_counter() - started:.0f}s", flush=True)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("ANALYZE events_statsrollup")  # as autovacuum would after a bulk load
    with psycopg.connect(dsn) as conn:
        # The oldest, a middle and the newest generation: a filter whose cost grows with the
        # events' age shows on the oldest.
        picked = {
            name: conn.execute(
                "SELECT generation_id FROM events_event WHERE type = 'generationCompleted' "
                f"AND timestamp {op} %s ORDER BY timestamp {order} LIMIT 1",
                [bound],
            ).fetchone()
            for name, op, order, bound in (
                ("oldest", ">=", "ASC", 0),
                ("middle", "<", "DESC", NOW_MS - 15 * DAY_MS),
                ("newest", "<=", "DESC", NOW_MS),
            )
        }
        gen = picked["middle"]
    generation_id = str(gen[0]) if gen else ""
    generations = {name: str(row[0]) for name, row in picked.items() if row}
    if "oldest" in generations:  # its admin page is the Generation row's (COPY made only events)
        with psycopg.connect(dsn) as conn:
            conn.execute(
                "INSERT INTO events_generation"
                " (id, model, model_path, prompt, max_tokens, options, created_at)"
                " VALUES (%s, %s, '', '\"hmac-sha256:00\"', 512, '{}', now()) ON CONFLICT (id) DO NOTHING",
                [generations["oldest"], MODELS[0]],
            )
    rows = int(on_disk["events_token rows"] + on_disk["events_event rows"]) or args.rows
    token = (
        subprocess.run(
            [python, "manage.py", "shell", "-c", BENCH_USER],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )

    # The web server as `make run` and docs/operations.md run it (ASGI, uvicorn's workers), or
    # gunicorn's sync WSGI workers (--server wsgi; the figures before 2026-12-06).
    application = list(WEB_SERVER_ARGS) if args.server == "asgi" else ["mlxserve.wsgi"]
    server = subprocess.Popen(
        [
            str(Path(python).parent / "gunicorn"),
            *application,
            "--bind",
            f"127.0.0.1:{args.port}",
            "--workers",
            "2",
            "--log-level",
            "warning",
            "--timeout",
            "600",  # the baselines that read every event take seconds at 30 million
        ],
        cwd=ROOT,
        env=env,
    )
    try:
        base = f"http://127.0.0.1:{args.port}"
        for _ in range(100):
            try:
                Client(base, {}).get("/api/schema/")
                break
            except OSError:
                time.sleep(0.2)
        client = Client(base, {"Authorization": f"Token {token}"})
        run(client, args.requests, generation_id, rows, generations)
        if not ONLY or any(prefix.startswith("admin") for prefix in ONLY):
            admin_cases(base, args.requests, generations.get("oldest", ""))
    finally:
        server.terminate()
        server.wait(timeout=30)
    if not ONLY:
        retention_day(env, args.layout)
    return 0


RETENTION_DAY = """
import time
from django.db import connection
from events.partitions import partition_drop, partitions_of
from events.retention import _delete_before
if "{layout}" == "typed":
    # The oldest day holding token events.
    for oldest in [p for p in partitions_of("events_token") if p.lower is not None]:
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT count(*) FROM {{oldest.name}}")
            rows = cursor.fetchone()[0]
        if rows:
            break
    started = time.perf_counter()
    assert partition_drop("events_token", oldest)
    seconds = time.perf_counter() - started
    dead = 0
else:
    with connection.cursor() as cursor:
        cursor.execute("SELECT min(timestamp) FROM events_event WHERE type = 'tokenGenerated'")
        first = cursor.fetchone()[0]
    end = first - first % 86_400_000 + 86_400_000
    started = time.perf_counter()
    rows = _delete_before("events_event", "type = %s AND ", ["tokenGenerated"], end, 10_000, None)
    seconds = time.perf_counter() - started
    dead = rows
print(f"RETENTION {{rows}} {{seconds}} {{dead}}")
"""


def retention_day(env: dict[str, str], layout: str) -> None:
    """One day of token events retired as retention does it: its partition dropped (typed), or
    deleted a window at a time (json, before)."""
    out = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", RETENTION_DAY.format(layout=layout)],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    _, rows, seconds, dead = out.strip().splitlines()[-1].split()
    print(
        f"retention of the oldest day ({layout}): {int(rows):,} token events in {float(seconds):.3f} s, "
        f"{int(dead):,} dead tuples left for VACUUM (bar: under 1 s, none)",
        flush=True,
    )


BENCH_USER = """
from django.contrib.auth.models import User
from rest_framework.authtoken.models import Token
user, _ = User.objects.get_or_create(username="bench", defaults={"is_staff": True, "is_superuser": True})
user.set_password("bench-pass-123"); user.save()
print(Token.objects.get_or_create(user=user)[0].key)
"""


def run(client: Client, n: int, generation_id: str, rows: int, generations: dict[str, str]) -> None:
    rng = random.Random(11)
    hour_until = NOW_MS - 3 * DAY_MS
    hour = {"since": hour_until - 3_600_000, "until": hour_until}

    def events(**query: object) -> Callable[[int], str]:
        return lambda i: "/api/events/?" + urlencode({"limit": 100, **query})

    _, deep_body, _ = client.get("/api/events/?limit=100")
    cursor_url = json.loads(deep_body)["next"]
    for _ in range(49):
        _, body, _ = client.get(urlparse(cursor_url).path + "?" + urlparse(cursor_url).query)
        cursor_url = json.loads(body)["next"]
    deep = urlparse(cursor_url).path + "?" + urlparse(cursor_url).query

    print(f"cursor pagination (the API), {n} requests each:", flush=True)
    figures = {
        "list, newest first": measure(client, "list, newest first", events(), n),
        "type=error": measure(client, "type=error (1% of generations)", events(type="error"), n),
        "model": measure(client, "model=qwen-2.5-7b", events(model="qwen-2.5-7b"), n),
        "source": measure(client, "source=mac-studio-3/worker-1", events(source=SOURCES[3]), n),
        **{
            f"generationId ({age})": measure(
                client, f"generationId=<the {age} generation>", events(generationId=gid), n
            )
            for age, gid in generations.items()
        },
        "generationId+type": measure(
            client,
            "generationId=<the oldest>&type=tokenGenerated",
            events(generationId=generations.get("oldest", generation_id), type="tokenGenerated"),
            n,
        ),
        "model+type": measure(client, "model+type=error", events(model=MODELS[1], type="error"), n),
        "since+until": measure(client, "since+until (one hour, 30 days back)", events(**hour), n),
        "combined": measure(
            client,
            "type+model+source+since+until",
            events(type="tokenGenerated", model=MODELS[1], source=SOURCES[1], **hour),
            n,
        ),
        "deep": measure(client, "page 51 by cursor", lambda i: deep, n),
        "generation": measure(
            client, "generation view (514 events)", lambda i: f"/api/generations/{generation_id}/", n
        ),
        "stats": measure(client, "stats, one hour", lambda i: "/api/stats/?" + urlencode(hour), n),
    }
    month = {"since": NOW_MS - 30 * DAY_MS, "until": NOW_MS}
    # Windows that start and end inside an hour: whole hours from the rollups, the edges read.
    # Each edge anywhere in its hour: up to half an hour of events is read at each end.
    shifted = [
        {
            "since": month["since"] + rng.randrange(3_600_000),
            "until": month["until"] - rng.randrange(3_600_000),
        }
        for _ in range(n + 3)
    ]
    shifted[0] = month
    stats = {
        "30 days": measure(client, "stats, 30 days", lambda i: "/api/stats/?" + urlencode(shifted[i]), n),
        "30 days, model": measure(
            client,
            "stats, 30 days, model=qwen-2.5-7b",
            lambda i: "/api/stats/?" + urlencode({**shifted[i], "model": MODELS[1]}),
            n,
        ),
    }
    # Deep offsets take seconds each at 10M rows: fewer requests, the same percentiles.
    n = min(n, 15)
    print(f"offset pagination (baseline), {n} requests each:", flush=True)
    offsets = [rng.randrange(0, rows - 100) for _ in range(n + 1)]
    measure(
        client,
        "offset list, random offset",
        lambda i: f"/bench/offset-events/?limit=100&offset={offsets[i]}",
        n,
    )
    measure(
        client,
        "offset list, model=qwen-2.5-7b, random offset",
        lambda i: f"/bench/offset-events/?limit=100&model={MODELS[1]}&offset={offsets[i] // 4}",
        n,
    )
    measure(client, "offset list, page 51", lambda i: "/bench/offset-events/?limit=100&offset=5000", n)
    m = min(n, 5)
    # Reading every event of 30 days takes minutes at tens of millions: two days and a bit
    # (a whole day, whole hours, minutes and seconds at each end) are timed and compared.
    days = {"since": NOW_MS - 2 * DAY_MS - 1_234_567, "until": NOW_MS - 777_777}
    print(f"stats read from every event (baseline), {m} requests each:", flush=True)
    measure(client, "stats, 2 days, rollups", lambda i: "/api/stats/?" + urlencode(days), m)
    measure(client, "stats, 2 days, every event read", lambda i: "/bench/scan-stats/?" + urlencode(days), m)
    # The rollups must say what reading every event says.
    rolled = json.loads(client.get("/api/stats/?" + urlencode(days))[1])
    scanned = json.loads(client.get("/bench/scan-stats/?" + urlencode(days))[1])
    if rolled["events"] != scanned["events"] or rolled["generations"] != scanned["generations"]:
        raise SystemExit(f"stats from rollups differ from the events: {rolled} != {scanned}")
    for figure in ("timeToFirstTokenMs", "tokensPerSecond", "durationMs"):
        print(f"  {figure}: rollups {rolled[figure]}, every event read {scanned[figure]}")
    barred = {name: p99 for name, (_, p99) in figures.items() if name != "stats"}
    worst = max(barred, key=lambda name: barred[name])
    print(f"worst p99, event list and generation view: {barred[worst]:.1f} ms ({worst}; bar: under 20 ms)")
    slowest = max(stats, key=lambda name: stats[name][1])
    print(f"worst p99, stats over 30 days: {stats[slowest][1]:.1f} ms ({slowest}; bar: under 50 ms)")


def admin_cases(base: str, n: int, generation_id: str = "") -> None:
    import re

    url = urlparse(base)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=60)
    conn.request("GET", "/admin/login/")
    response = conn.getresponse()
    response.read()
    cookies = {
        c.split("=", 1)[0]: c.split("=", 1)[1].split(";")[0]
        for c in response.headers.get_all("Set-Cookie") or []
    }
    csrf = cookies["csrftoken"]
    conn.request(
        "POST",
        "/admin/login/",
        body=urlencode(
            {
                "username": "bench",
                "password": "bench-pass-123",
                "csrfmiddlewaretoken": csrf,
                "next": "/admin/",
            }
        ),
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "Cookie": f"csrftoken={csrf}",
            "Referer": base,
        },
    )
    response = conn.getresponse()
    response.read()
    session = re.search(r"sessionid=([^;]+)", " ".join(response.headers.get_all("Set-Cookie") or []))
    if not session:
        raise SystemExit("admin login failed")
    client = Client(base, {"Cookie": f"sessionid={session.group(1)}; csrftoken={csrf}"})
    print(f"admin event list, {n} requests each:", flush=True)
    measure(client, "admin list, newest first", lambda i: "/admin/events/event/", n)
    measure(
        client,
        "admin list, source + type",
        lambda i: f"/admin/events/event/?source={SOURCES[2]}&type__exact=error",
        n,
    )
    measure(client, "admin list, model", lambda i: f"/admin/events/event/?model={MODELS[1]}", n)
    print(f"admin pages, {n} requests each:", flush=True)
    measure(client, "admin index (the fleet panel)", lambda i: "/admin/", n)
    measure(client, "admin workers (sparklines, last errors)", lambda i: "/admin/events/worker/", n)
    if generation_id:
        measure(
            client,
            "admin generation page (514 events, shaded text, chart)",
            lambda i: f"/admin/events/generation/{generation_id}/change/",
            n,
        )


if __name__ == "__main__":
    sys.exit(main())
