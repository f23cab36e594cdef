"""The web server as deployed (gunicorn, uvicorn's workers, ``mlxserve.asgi``): the API and the admin
on a pool of threads, so a request that waits holds one thread, not the process; the admin's static
files under both of Django's handlers."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.contrib.auth.models import User
from django.test import Client
from rest_framework.authtoken.models import Token

from telemetry.services import telemetry_config_get
from tests.factories import TEST_REDIS_URL, database_url, free_port, web_server_command, writers_locked_out

STATIC_FILE = "/static/admin/css/base.css"


def call(
    base: str, path: str, *, method: str = "GET", token: str = "", body: Any = None
) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{base}{path}", data=data, method=method)
    if token:
        request.add_header("Authorization", f"Token {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


@pytest.fixture
def web_server(tmp_path: Path) -> Iterator[str]:
    """One web process (gunicorn, uvicorn's worker) on the test database, four threads."""
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url(),
        "REDIS_URL": TEST_REDIS_URL,
        "MLXSERVE_WEB_THREADS": "4",
    }
    log = tmp_path / "gunicorn.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            web_server_command(port),
            cwd=django_settings.BASE_DIR,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                call(base, "/api/events/")
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)


def requests_received(base: str, method: str) -> float:
    """The server's own count of ``method`` requests received (django-prometheus, on /metrics)."""
    _, body = call(base, "/metrics")
    for line in body.decode().splitlines():
        if line.startswith(f'django_http_requests_total_by_method_total{{method="{method}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.django_db(transaction=True)
def test_a_request_waiting_on_the_database_holds_one_thread_and_the_others_are_answered(
    web_server: str,
) -> None:
    staff = User.objects.create_user("staff", password="staff-pass-123", is_staff=True)
    token = Token.objects.create(user=staff).key
    telemetry_config_get()  # the row exists: the PATCH waits on the lock, not on making it
    answers: list[tuple[int, bytes]] = []
    with writers_locked_out("telemetry_telemetryconfig"):
        change = threading.Thread(
            target=lambda: answers.append(
                call(web_server, "/api/telemetry/config/", method="PATCH", token=token, body={})
            )
        )
        change.start()
        # The PATCH is in the server (and waits there on the lock) once the server counts it.
        deadline = time.monotonic() + 30
        while requests_received(web_server, "PATCH") < 1:
            assert time.monotonic() < deadline, "the PATCH never reached the server"
            time.sleep(0.05)
        others = ("/api/workers/", "/api/events/", "/api/telemetry/config/", "/api/telemetry/config/history/")
        for path in others:
            status, body = call(web_server, path, token=token)
            assert status == 200, body
        assert change.is_alive() and not answers, "the PATCH was still waiting on the lock"
    change.join(timeout=60)
    assert answers and answers[0][0] == 200, answers


@pytest.mark.django_db(transaction=True)
def test_the_admins_static_files_are_served_under_the_deployed_server(web_server: str) -> None:
    status, body = call(web_server, STATIC_FILE)
    assert status == 200 and b"body" in body
    with urllib.request.urlopen(f"{web_server}{STATIC_FILE}", timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/css")
        assert "max-age" in response.headers["Cache-Control"]
    assert call(web_server, "/static/admin/css/no-such-file.css")[0] == 404


def test_the_admins_static_files_are_served_under_the_sync_handler_too(db: Any) -> None:
    """``mlxserve.wsgi`` and the test client: the same files, the same headers."""
    response = Client().get(STATIC_FILE)
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/css") and "max-age" in response["Cache-Control"]
    assert b"body" in b"".join(response.streaming_content)  # type: ignore[attr-defined]
    ranged = Client().get(STATIC_FILE, headers={"Range": "bytes=0-9"})
    assert ranged.status_code == 206 and len(b"".join(ranged.streaming_content)) == 10  # type: ignore[attr-defined]
    assert Client().get("/static/admin/css/no-such-file.css").status_code == 404
