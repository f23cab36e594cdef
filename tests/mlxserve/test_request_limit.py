"""A body over the size limit, sent to the control plane as deployed (gunicorn)."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings as django_settings

from tests.factories import free_port


@pytest.fixture
def gunicorn_port(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}"}
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "gunicorn"),
            "mlxserve.wsgi:application",
            "--bind",
            f"127.0.0.1:{port}",
        ],
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
