"""``make run`` on a machine with no Redis: a private one for the session, never in place of a
configured ``REDIS_URL``."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from mlxserve import devredis
from tests.factories import TEST_REDIS_URL, free_port


def nowhere() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


def test_where_no_redis_answers_a_private_one_starts_and_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    url = devredis.start(tmp_path, probe_url=nowhere())
    assert url is not None
    try:
        client = redis.Redis.from_url(url)
        # What the product needs of it: streams, consumer groups, XAUTOCLAIM (Redis 6.2).
        client.xgroup_create("s", "g", id="0", mkstream=True)
        client.xadd("s", {"e": b"{}"})
        assert client.xreadgroup("g", "c1", {"s": ">"})
        claimed = client.xautoclaim("s", "g", "c2", min_idle_time=0)
        assert len(claimed[1]) == 1
        assert (tmp_path / "redis" / "redis.pid").exists()
        assert client.config_get("bind")["bind"] == "127.0.0.1"  # loopback only
    finally:
        assert devredis.stop(tmp_path)
    assert not devredis.answers(url)
    assert not (tmp_path / "redis" / "redis.pid").exists()
    assert not devredis.stop(tmp_path)  # nothing left to stop


def test_a_redis_that_answers_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert devredis.start(tmp_path, probe_url=TEST_REDIS_URL) is None
    assert not (tmp_path / "redis").exists()


def test_a_configured_redis_url_is_never_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    unreachable = nowhere()
    monkeypatch.setenv("REDIS_URL", unreachable)
    monkeypatch.setenv("MLXSERVE_RUN_REDIS_PROBE_URL", nowhere())
    assert devredis.start(tmp_path) is None
    assert devredis.main(["start", str(tmp_path)]) == 1
    assert f"Redis is not reachable at {unreachable} (REDIS_URL)" in capsys.readouterr().err
    assert not (tmp_path / "redis").exists()
    monkeypatch.setenv("REDIS_URL", TEST_REDIS_URL)
    assert devredis.main(["start", str(tmp_path)]) == 0
    assert capsys.readouterr().out == ""  # nothing to export: the configured one is used


def test_the_command_prints_the_url_to_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("MLXSERVE_RUN_REDIS_PROBE_URL", nowhere())
    try:
        assert devredis.main(["start", str(tmp_path)]) == 0
        line = capsys.readouterr().out.strip()
        assert line.startswith("REDIS_URL=redis://127.0.0.1:")
        assert devredis.answers(line.split("=", 1)[1])
    finally:
        assert devredis.main(["stop", str(tmp_path)]) == 0
    assert devredis.main(["bogus"]) == 2
