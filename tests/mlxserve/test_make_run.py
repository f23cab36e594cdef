"""``make run`` as a new user runs it, on a machine where no Redis answers: it starts its own,
everything works on it, and Ctrl-C (TERM, as a terminal's job control sends to a script whose
children ignore INT) stops all of it, the private Redis included."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from django.conf import settings as django_settings

from mlxserve.devredis import answers
from tests.factories import free_port

ROOT = Path(django_settings.BASE_DIR)


def test_make_run_starts_a_private_redis_where_none_runs(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "DATABASE_URL", "CELERY_BROKER_URL"}}
    env |= {
        "MLXSERVE_VAR_DIR": str(tmp_path / "var"),
        "MLXSERVE_PORT": str(port),
        "MLXSERVE_WEB_WORKERS": "1",
        "MLXSERVE_RUN_REDIS_PROBE_URL": f"redis://127.0.0.1:{free_port()}/0",  # nothing runs there
    }
    process = subprocess.Popen(
        ["bin/run"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output: list[str] = []
    assert process.stdout is not None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            ready, _, _ = select.select([process.stdout], [], [], 1.0)
            if not ready:
                continue
            line = process.stdout.readline()
            if not line:
                break
            output.append(line)
            if "Press Ctrl-C to stop." in line:
                break
        text = "".join(output)
        assert "Press Ctrl-C to stop." in text, text
        started = re.search(r"started a private one for this session at (redis://127\.0\.0\.1:\d+/0)", text)
        assert started, text
        redis_url = started.group(1)
        assert answers(redis_url)
        assert (tmp_path / "var" / "redis" / "redis.pid").exists()
        # The demo generation went through the private Redis (queue, events, ingester).
        assert re.search(r"completed: 48 tokens", text), text
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/schema/", timeout=10) as response:
            assert response.status == 200
    finally:
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=60)
        output.append(rest or "")
    assert "==> Stopping" in "".join(output)
    assert not answers(redis_url)
    assert not (tmp_path / "var" / "redis" / "redis.pid").exists()
