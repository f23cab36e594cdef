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


def readme_openai_session_works(port: int, env: dict[str, str]) -> None:
    """The README's first session with the openai client, as written there, against this `make run`."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## A first session with the `openai` client") :]
    shell = section[section.index("```sh\n") + 6 : section.index("```\n")]
    python = section[section.index("```python\n") + 10 :]
    python = python[: python.index("```\n")]
    base = f"http://127.0.0.1:{port}"
    streamed = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + shell.replace("http://127.0.0.1:8000", base)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert streamed.returncode == 0, streamed.stderr
    events = [line for line in streamed.stdout.splitlines() if line.startswith("data: ")]
    assert events[0].startswith('data: {"id":"chatcmpl-') and '"role":"assistant"' in events[0]
    # The demo model samples at temperature 1 here: it may meet its end-of-sequence token before 16 tokens.
    assert re.search(r'"finish_reason":"(length|stop)"', events[-2]) and events[-1] == "data: [DONE]"
    key = subprocess.run(
        [".venv/bin/python", "manage.py", "create_api_key", "readme-python"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    program = python.replace("http://127.0.0.1:8000", base).replace("<the key>", key)
    run = subprocess.run(
        [".venv/bin/python", "-c", program], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert re.search(r"CompletionUsage\(completion_tokens=\d+, prompt_tokens=\d+", run.stdout), run.stdout


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
        readme_openai_session_works(port, {**env, "REDIS_URL": redis_url})
    finally:
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=60)
        output.append(rest or "")
    assert "==> Stopping" in "".join(output)
    assert not answers(redis_url)
    assert not (tmp_path / "var" / "redis" / "redis.pid").exists()
