"""The web server as deployed (gunicorn, uvicorn's workers, ``mlxserve.asgi``): the API and the admin
on a pool of threads, so a request that waits holds one thread, not the process; the admin's static
files under both of Django's handlers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from django.conf import settings as django_settings
from django.contrib.auth.models import User
from django.test import Client
from rest_framework.authtoken.models import Token

from events.storage import events_store
from telemetry.services import telemetry_config_get
from tests.factories import (
    T0,
    TEST_REDIS_URL,
    database_url,
    free_port,
    make_envelope,
    web_server_command,
    writers_locked_out,
)

STATIC_FILE = "/static/admin/css/base.css"


def call(
    base: str, path: str, *, method: str = "GET", token: str = "", body: Any = None, timeout: float = 60
) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{base}{path}", data=data, method=method)
    if token:
        request.add_header("Authorization", f"Token {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


@pytest.fixture
def web_server(tmp_path: Path) -> Iterator[str]:
    """One web process (gunicorn, uvicorn's worker) on the test database, four threads (and on
    PostgreSQL a pool of five connections: one a thread and one for the event loop's work)."""
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url(),
        "REDIS_URL": TEST_REDIS_URL,
        "MLXSERVE_WEB_THREADS": "4",
        "MLXSERVE_DB_POOL_SIZE": "5",
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


def slow_reader(base: str, path: str, token: str) -> socket.socket:
    """A client that asks for ``path`` with a small receive window and reads nothing."""
    host, port = base.removeprefix("http://").split(":")
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.settimeout(60)
    client.connect((host, int(port)))
    client.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Token {token}\r\n\r\n".encode())
    return client


@pytest.mark.django_db(transaction=True)
def test_clients_reading_an_export_slowly_hold_no_thread_nor_database_connection(web_server: str) -> None:
    """Six exports of 50,000 events (about 20 MB each) to clients that read nothing, more than the
    server has threads and connections: the API is answered meanwhile, and an export read to its end
    holds every event once."""
    reader = User.objects.create_user("reader", password="reader-pass-123", is_staff=True)
    token = Token.objects.create(user=reader).key
    total = 50_000
    for start in range(0, total, 10_000):
        batch = [
            make_envelope("tokenGenerated", timestamp=T0 + i, seq=i) for i in range(start, start + 10**4)
        ]
        events_store([(f"{i}-0", msgspec.json.encode(e)) for i, e in enumerate(batch)])
    path = f"/api/events/export/?since={T0}"
    slow = [slow_reader(web_server, path, token) for _ in range(6)]
    try:
        time.sleep(3)  # every export is in the server, its client's window full
        started = time.monotonic()
        for path_read in ("/api/telemetry/config/", "/api/events/?limit=5"):
            status, body = call(web_server, path_read, token=token, timeout=20)
            assert status == 200, body
        assert time.monotonic() - started < 10
    finally:
        for client in slow:
            client.close()
    status, body = call(web_server, path, token=token)
    assert status == 200
    lines = body.splitlines()
    # A bad export is refused with the error object from the event loop's handler too.
    status, refused = call(web_server, "/api/events/export/", token=token)
    assert status == 400 and json.loads(refused)["code"] == "InvalidParams", refused
    assert len(lines) == total and len({json.loads(line)["id"] for line in lines}) == total


def slow_post(base: str, path: str, length: int) -> socket.socket:
    """A client that sends a POST's headers and one byte of its ``length``-byte body, then waits."""
    host, port = base.removeprefix("http://").split(":")
    client = socket.create_connection((host, int(port)), timeout=60)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        f"Cookie: csrftoken={'c' * 32}\r\nContent-Length: {length}\r\n\r\na"
    )
    client.sendall(head.encode())
    return client


@pytest.mark.django_db(transaction=True)
def test_clients_sending_their_bodies_slowly_hold_no_thread(web_server: str) -> None:
    """More slow posts than the server has threads (four), from clients with no account (the admin's
    login form reads its body for the CSRF check, once it has the cookie): the API is answered
    meanwhile, and each post is answered once its body is in."""
    reader = User.objects.create_user("reader", password="reader-pass-123", is_staff=True)
    token = Token.objects.create(user=reader).key
    length = 64
    slow = [slow_post(web_server, "/admin/login/", length) for _ in range(6)]
    try:
        time.sleep(1)  # every post is in the server, waiting on its body
        started = time.monotonic()
        status, body = call(web_server, "/api/telemetry/config/", token=token, timeout=20)
        assert status == 200, body
        assert time.monotonic() - started < 10
        for client in slow:
            client.sendall(b"b" * (length - 1))
        for client in slow:
            answer = client.recv(64)
            assert answer.startswith(b"HTTP/1.1 403"), answer  # CSRF: the form has no token
    finally:
        for client in slow:
            client.close()


@pytest.mark.django_db(transaction=True)
def test_each_web_process_freezes_the_loaded_application_before_its_first_request(
    web_server: str, tmp_path: Path
) -> None:
    """What a process loads at start is out of the collector's walk: no request pays for a full
    collection over Django and every view (the slowest requests' cost before)."""
    frozen = [
        int(line.split("Froze ", 1)[1].split()[0])
        for line in (tmp_path / "gunicorn.log").read_text().splitlines()
        if "Froze " in line
    ]
    assert len(frozen) == 1 and frozen[0] > 50_000, frozen
    assert call(web_server, "/api/events/")[0] in (401, 403)


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
