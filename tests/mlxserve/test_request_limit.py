"""A body over the size limit, sent to the control plane as deployed (gunicorn)."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings as django_settings

from tests.factories import free_port, web_server_command


@pytest.fixture
def gunicorn_port(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}"}
    server = subprocess.Popen(
        web_server_command(port),
        cwd=django_settings.BASE_DIR,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                http.client.HTTPConnection("127.0.0.1", port, timeout=5).connect()
                break
            except OSError:
                assert time.monotonic() < deadline, "gunicorn did not start"
                time.sleep(0.2)
        yield port
    finally:
        server.terminate()
        server.wait(timeout=30)


def post(port: int, size: int) -> tuple[int, dict[str, str]]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(
            "POST",
            "/api/events/",
            body=b"[" + b" " * (size - 2) + b"]",
            headers={"Content-Type": "application/json"},
        )
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_a_body_over_the_limit_always_gets_its_413_answer_never_a_reset(gunicorn_port: int) -> None:
    answers = [post(gunicorn_port, 2 * 1024 * 1024) for _ in range(20)]
    assert {status for status, _ in answers} == {413}
    assert answers[0][1] == {
        "code": "PayloadTooLarge",
        "message": f"Request body exceeds the limit of {django_settings.MAX_REQUEST_BYTES} bytes",
    }


def send_chunked(port: int, method: str, path: str, body: bytes) -> tuple[int, dict[str, str], str | None]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(
            method,
            path,
            body=iter([body[: len(body) // 2], body[len(body) // 2 :]]),
            headers={"Content-Type": "application/json"},
            encode_chunked=True,
        )
        response = connection.getresponse()
        return response.status, json.loads(response.read()), response.getheader("Connection")
    finally:
        connection.close()


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PATCH", "/api/telemetry/config/", b'{"enabled": true}'),
        ("POST", "/api/events/", b'[{"type": "tokenGenerated"}]'),
        ("PUT", "/api/telemetry/config/", b'{"enabled": true, "prometheusPort": 9999}'),
    ],
)
def test_a_chunked_body_is_refused_with_411_never_read_as_empty(
    gunicorn_port: int, method: str, path: str, body: bytes
) -> None:
    # Django reads a body by Content-Length; chunked it would be read as empty (a PATCH
    # answered 200 with nothing changed). Refused before authentication, parsing or storage.
    code, answer, connection = send_chunked(gunicorn_port, method, path, body)
    assert code == 411
    assert answer == {
        "code": "LengthRequired",
        "message": "A request body must be sent with Content-Length, not chunked",
    }
    assert connection == "close"
