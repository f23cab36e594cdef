"""The OpenAI-compatible endpoint as its clients see it, each figure beside its baseline from the same run.

Starts the stack as `make run` does (gunicorn with 2 uvicorn workers, the ingester, one Celery worker
serving the demo model) on a scratch SQLite database and Redis database 12 of the local server, then, with
the official ``openai`` client:

1. time to first token: 200 sequential streamed chat requests; the client's (request sent to first delta)
   beside the worker engine's own (``metadata.timeToFirstTokenMs`` of each ``generationCompleted``:
   generation start to first token). Bar: client median at most engine median + 25 ms.
2. token delivery: 20 streams of 256 tokens; each delta's arrival at the client (wall clock) minus its
   token's time on the worker (the ``tokenGenerated`` event's timestamp, same host clock). Bar: p99 at most
   50 ms.
3. 200 streams open at once (one generating, the rest waiting in the queue): the web processes' resident
   memory before and at the peak, and ``/api/events/`` and the admin index answered meanwhile (200 each).
   Bar: growth at most 100 MB, p99 at most 200 ms.
4. cancellation: 20 streams closed after 20 deltas; the worker's ``generationCompleted`` (its wall clock)
   minus the close, beside the generation's own token step (median inter-token gap). Bar: at most one step +
   100 ms.

    .venv/bin/python bench/serving.py [--ttft-requests 200] [--streams 200]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from openai.types.chat import ChatCompletionMessageParam

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlxserve.host.service_files import WEB_SERVER_ARGS  # noqa: E402  (after the path)

PY = str(ROOT / ".venv" / "bin" / "python")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me a story"}]
# A prompt whose greedy continuation by the demo model meets no end-of-sequence token for thousands of tokens.
LONG: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello"},
]


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def met(holds: bool) -> str:
    return "met" if holds else "NOT met"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@contextlib.contextmanager
def stack(work: Path, port: int) -> Iterator[tuple[str, dict[str, str], list[int]]]:
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{work / 'db.sqlite3'}",
        "REDIS_URL": REDIS_URL,
        "MLXSERVE_VAR_DIR": str(work / "var"),
        "MLXSERVE_QUEUE_TIMEOUT_S": "900",
        "MLXSERVE_WORKER_SOURCE": "bench-host/worker-1",
        "MLXSERVE_SPOOL_DIR": str(work / "spool"),
        "MLXSERVE_WORKER_MODELS": "demo",
        "MLXSERVE_API_POST_RATE": "",
    }
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()
    (work / "var").mkdir()
    subprocess.run([PY, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
    subprocess.run([PY, "manage.py", "create_demo_model", str(work / "demo")], cwd=ROOT, env=env, check=True)
    subprocess.run(
        [PY, "manage.py", "register_model", "demo", str(work / "demo")], cwd=ROOT, env=env, check=True
    )
    env["SECRET_KEY"] = (work / "var" / "secret-key").read_text().strip()
    env["MLXSERVE_PROMPT_HASH_KEY"] = (work / "var" / "prompt-hash-key").read_text().strip()
    logs = {name: open(work / f"{name}.log", "wb") for name in ("web", "ingester", "worker")}  # noqa: SIM115
    web_env = {**env, "PROMETHEUS_MULTIPROC_DIR": str(work / "prom")}
    processes = [
        subprocess.Popen(
            [
                str(ROOT / ".venv/bin/gunicorn"),
                *WEB_SERVER_ARGS,
                "--bind",
                f"127.0.0.1:{port}",
                "--workers",
                "2",
            ],
            cwd=ROOT,
            env=web_env,
            stdout=logs["web"],
            stderr=subprocess.STDOUT,
        ),
        subprocess.Popen(
            [PY, "manage.py", "ingest_events"],
            cwd=ROOT,
            env=env,
            stdout=logs["ingester"],
            stderr=subprocess.STDOUT,
        ),
        subprocess.Popen(
            [
                str(ROOT / ".venv/bin/celery"),
                "-A",
                "mlxserve",
                "worker",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "--loglevel=WARNING",
            ],
            cwd=ROOT,
            env=env,
            stdout=logs["worker"],
            stderr=subprocess.STDOUT,
        ),
    ]
    try:
        key = subprocess.run(
            [PY, "manage.py", "create_api_key", "bench"],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                request = urllib.request.Request(
                    f"{base}/v1/models", headers={"Authorization": f"Bearer {key}"}
                )
                with urllib.request.urlopen(request, timeout=5) as answer:
                    if json.load(answer)["data"]:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (
                "the stack did not come up (see the logs in " + str(work) + ")"
            )
            time.sleep(0.5)
        env["BENCH_KEY"] = key
        yield base, env, [p.pid for p in processes]
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def web_pids(master: int) -> list[int]:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return [master, *map(int, children)]


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


def completed_events(ids: list[str]) -> dict[str, dict]:
    from events.models import Event

    found: dict[str, dict] = {}
    deadline = time.monotonic() + 120
    while len(found) < len(ids) and time.monotonic() < deadline:
        for event in Event.objects.filter(generation_id__in=ids, type="generationCompleted"):
            found[str(event.generation_id)] = {"timestamp": event.timestamp, **event.payload}
        time.sleep(0.5)
    return found


def ttft(client, count: int) -> None:
    client_ms, ids = [], []
    for _ in range(count):
        sent = time.perf_counter()
        stream = client.chat.completions.with_raw_response.create(
            model="demo", messages=CHAT, max_tokens=8, temperature=0, stream=True
        )
        ids.append(stream.headers["x-request-id"])
        chunks = stream.parse()
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                client_ms.append((time.perf_counter() - sent) * 1000)
                break
        chunks.close()
    engine_ms = [e["metadata"]["timeToFirstTokenMs"] for e in completed_events(ids).values()]
    c, e = statistics.median(client_ms), statistics.median(engine_ms)
    print(
        f"time to first token, {count} sequential requests: client median {c:.1f} ms "
        f"(p90 {pct(client_ms, 0.9):.1f}), worker engine median {e:.1f} ms: +{c - e:.1f} ms "
        f"(bar +25 ms: {met(c - e <= 25)})"
    )


def delivery(client, streams: int) -> None:
    from events.models import Event

    delays: list[float] = []
    for _ in range(streams):
        raw = client.chat.completions.with_raw_response.create(
            model="demo", messages=CHAT, max_tokens=256, stream=True
        )
        gid = raw.headers["x-request-id"]
        arrivals = [
            time.time() * 1000
            for chunk in raw.parse()
            if chunk.choices and chunk.choices[0].delta.content is not None
        ]
        arrivals = arrivals[1:]  # the first chunk is the role's
        completed_events([gid])
        stamps = list(
            Event.objects.filter(generation_id=gid, type="tokenGenerated")
            .order_by("seq")
            .values_list("timestamp", flat=True)
        )
        # A delta whose text is empty (a partial UTF-8 character) is not sent: pair the tokens that were.
        delays.extend(a - t for a, t in zip(arrivals, stamps[-len(arrivals) :], strict=False))
    print(
        f"token delivery, {len(delays)} tokens in {streams} streams: worker token time to client arrival "
        f"p50 {pct(delays, 0.5):.1f} ms, p99 {pct(delays, 0.99):.1f} ms, max {max(delays):.1f} ms "
        f"(bar p99 50 ms: {'met' if pct(delays, 0.99) <= 50 else 'NOT met'})"
    )


def concurrent(base: str, key: str, web: list[int], count: int, token: str, cookie: str) -> None:
    """``count`` requests held open at once: one generating, the others waiting in the queue for the
    one worker (their requests are answered when a worker takes them: each holds its connection
    and its subscription meanwhile)."""
    import httpx2
    import openai

    from events.models import Generation

    before = rss_bytes(web)
    known = Generation.objects.count()
    stop = threading.Event()
    peak = [before]

    async def one(client: openai.AsyncOpenAI) -> None:
        stream = await client.chat.completions.create(
            model="demo", messages=LONG, max_tokens=20000, temperature=0, stream=True
        )
        async for _ in stream:
            if stop.is_set():
                break
        await stream.close()

    async def many() -> None:
        limits = httpx2.Limits(max_connections=count + 10, max_keepalive_connections=count + 10)
        http = httpx2.AsyncClient(limits=limits, timeout=900)
        async with openai.AsyncOpenAI(
            base_url=f"{base}/v1", api_key=key, max_retries=0, http_client=http
        ) as client:
            tasks = [asyncio.create_task(one(client)) for _ in range(count)]
            while not stop.is_set():
                await asyncio.sleep(0.2)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    thread = threading.Thread(target=lambda: asyncio.run(many()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while Generation.objects.count() < known + count:
        assert time.monotonic() < deadline, "the requests were not all taken in"
        time.sleep(0.2)
    time.sleep(1)
    timings: dict[str, list[float]] = {"/api/events/?limit=50": [], "/admin/": []}
    for _ in range(200):
        for path, headers in (
            ("/api/events/?limit=50", {"Authorization": f"Token {token}"}),
            ("/admin/", {"Cookie": cookie}),
        ):
            started = time.perf_counter()
            with urllib.request.urlopen(
                urllib.request.Request(base + path, headers=headers), timeout=30
            ) as answer:
                answer.read()
                assert answer.status == 200 and answer.geturl() == base + path  # not sent to the login page
            timings[path].append((time.perf_counter() - started) * 1000)
        peak[0] = max(peak[0], rss_bytes(web))
    stop.set()
    thread.join(120)
    grown = (peak[0] - before) / 1e6
    print(
        f"{count} requests open at once (one generating, the rest queued): web processes "
        f"{before / 1e6:.0f} MB before, {peak[0] / 1e6:.0f} MB at peak: +{grown:.0f} MB "
        f"(bar +100 MB: {met(grown <= 100)})"
    )
    for path, values in timings.items():
        p99 = pct(values, 0.99)
        print(
            f"  meanwhile {path}: p50 {pct(values, 0.5):.1f} ms, p99 {p99:.1f} ms "
            f"(bar 200 ms: {met(p99 <= 200)})"
        )


def cancellation(client, rounds: int) -> None:
    from events.models import Event

    lags, steps = [], []
    for _ in range(rounds):
        raw = client.chat.completions.with_raw_response.create(
            model="demo", messages=LONG, max_tokens=20000, temperature=0, stream=True
        )
        gid = raw.headers["x-request-id"]
        stream = raw.parse()
        for index, _chunk in enumerate(stream):
            if index == 20:
                break
        closed_ms = time.time() * 1000
        stream.close()
        done = completed_events([gid])[gid]
        assert done["metadata"]["finishReason"] == "cancelled", done
        stamps = list(
            Event.objects.filter(generation_id=gid, type="tokenGenerated")
            .order_by("seq")
            .values_list("timestamp", flat=True)
        )
        step = statistics.median(b - a for a, b in itertools.pairwise(stamps)) if len(stamps) > 2 else 0.0
        lags.append(done["timestamp"] - closed_ms)
        steps.append(step)
    worst = max(lag - step for lag, step in zip(lags, steps, strict=True))
    print(
        f"cancellation, {rounds} streams closed mid-generation: worker done p50 {pct(lags, 0.5):.1f} ms, "
        f"max {max(lags):.1f} ms after the close; token step median {statistics.median(steps):.2f} ms; "
        f"worst lag minus step {worst:.1f} ms "
        f"(bar step + 100 ms: {'met' if worst <= 100 else 'NOT met'})"
    )


def main() -> None:
    import logging

    logging.getLogger("httpx2").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ttft-requests", type=int, default=200)
    parser.add_argument("--delivery-streams", type=int, default=20)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--cancellations", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, stack(Path(tmp), free_port()) as (base, env, pids):
        os.environ.update(
            {
                "DATABASE_URL": env["DATABASE_URL"],
                "REDIS_URL": REDIS_URL,
                "MLXSERVE_VAR_DIR": env["MLXSERVE_VAR_DIR"],
            }
        )
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mlxserve.settings")
        import django

        django.setup()
        import openai
        from django.contrib.auth.models import User
        from django.contrib.sessions.backends.db import SessionStore
        from rest_framework.authtoken.models import Token

        admin = User.objects.create_superuser("bench-admin", password="x")
        token = Token.objects.create(user=admin).key
        session = SessionStore()
        session.update(
            {
                "_auth_user_id": str(admin.pk),
                "_auth_user_backend": "django.contrib.auth.backends.ModelBackend",
                "_auth_user_hash": admin.get_session_auth_hash(),
            }
        )
        session.create()
        cookie = f"sessionid={session.session_key}"
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=env["BENCH_KEY"], max_retries=0, timeout=300)
        client.chat.completions.create(model="demo", messages=CHAT, max_tokens=4)  # the model loaded once
        print(
            f"stack up at {base} (gunicorn + 2 uvicorn workers, ingester, one Celery worker serving "
            "the demo model)"
        )
        ttft(client, args.ttft_requests)
        delivery(client, args.delivery_streams)
        cancellation(client, args.cancellations)
        concurrent(base, env["BENCH_KEY"], web_pids(pids[0]), args.streams, token, cookie)


if __name__ == "__main__":
    main()
