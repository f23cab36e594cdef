"""What ``python -m mlxserve.service`` writes: where a host's worker services live, and each
worker's launchd agent or systemd unit and the shared environment file. Plain Python, no I/O
but reading the environment file: the commands that install, load and remove them are in
``mlxserve.service``."""

from __future__ import annotations

import os
import plistlib
import sys
from dataclasses import dataclass
from pathlib import Path

LABEL = "com.mlxserve.worker"  # launchd labels: com.mlxserve.worker.<n>
UNIT = "mlxserve-worker"  # systemd units: mlxserve-worker-<n>.service
# How long the service manager waits for a generation to finish on stop before it kills the
# worker (Celery gives the task back to the queue then: late acknowledgement).
STOP_TIMEOUT_S = 300
# ``celery -A mlxserve worker`` as the README runs it: one process, no fork (mlx and Metal); its
# pool and concurrency come from MLXSERVE_WORKER_CONCURRENCY (settings).
CELERY_WORKER_ARGS = (
    "-m",
    "celery",
    "-A",
    "mlxserve",
    "worker",
    "--loglevel=INFO",
)
# The web server as docs/operations.md and ``make run`` run it: gunicorn managing uvicorn's workers
# on ``mlxserve.asgi`` (followed by ``--bind`` and ``--workers``).
WEB_SERVER_ARGS = ("mlxserve.asgi:application", "-c", "python:mlxserve.gunicorn_conf")
# What a worker's environment may carry from ``--env`` or this process's environment.
PASSED_ON = (
    "REDIS_URL",
    "CELERY_BROKER_URL",
    "HF_HUB_CACHE",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "MLXSERVE_EVENTS_STREAM",
    "MLXSERVE_TASK_VERIFY_KEY",
    "MLXSERVE_WORKER_MODELS",
    "MLXSERVE_WORKER_CONCURRENCY",
    "MLXSERVE_WORKER_KV_BYTES",
)


@dataclass(frozen=True)
class Layout:
    """Where one host's worker services live."""

    manager: str  # "launchd" or "systemd"
    home: Path
    system: bool = False  # systemd only: a system unit (root) rather than a user unit

    @classmethod
    def here(cls, *, system: bool = False) -> Layout:
        manager = "launchd" if sys.platform == "darwin" else "systemd"
        return cls(manager=manager, home=Path(os.environ.get("HOME") or Path.home()), system=system)

    def _xdg(self, variable: str, default: str) -> Path:
        value = os.environ.get(variable)
        return Path(value) if value else self.home / default

    @property
    def config_dir(self) -> Path:
        if self.manager == "launchd":
            return self.home / "Library" / "Application Support" / "mlxserve"
        return Path("/etc/mlxserve") if self.system else self._xdg("XDG_CONFIG_HOME", ".config") / "mlxserve"

    @property
    def data_dir(self) -> Path:
        if self.manager == "launchd":
            return self.home / "Library" / "Application Support" / "mlxserve"
        return (
            Path("/var/lib/mlxserve")
            if self.system
            else self._xdg("XDG_DATA_HOME", ".local/share") / "mlxserve"
        )

    @property
    def log_dir(self) -> Path:
        if self.manager == "launchd":
            return self.home / "Library" / "Logs" / "mlxserve"
        return Path("/var/log/mlxserve") if self.system else self.data_dir / "logs"

    @property
    def service_dir(self) -> Path:
        if self.manager == "launchd":
            return self.home / "Library" / "LaunchAgents"
        if self.system:
            return Path("/etc/systemd/system")
        return self._xdg("XDG_CONFIG_HOME", ".config") / "systemd" / "user"

    @property
    def env_file(self) -> Path:
        return self.config_dir / "worker.env"

    def service_file(self, n: int) -> Path:
        if self.manager == "launchd":
            return self.service_dir / f"{LABEL}.{n}.plist"
        return self.service_dir / f"{UNIT}-{n}.service"

    def installed(self) -> list[int]:
        pattern = f"{LABEL}.*.plist" if self.manager == "launchd" else f"{UNIT}-*.service"
        numbers = []
        for path in self.service_dir.glob(pattern):
            stem = path.name.removesuffix(".plist").removesuffix(".service")
            tail = stem.rsplit(".", 1)[-1] if self.manager == "launchd" else stem.rsplit("-", 1)[-1]
            if tail.isdigit():
                numbers.append(int(tail))
        return sorted(numbers)


@dataclass(frozen=True)
class Worker:
    """One worker service: its number, source, and what it runs."""

    n: int
    source: str
    checkout: Path  # where the mlxserve package is (the working directory)
    python: Path

    def celery_args(self, *, node_host: str) -> list[str]:
        """``celery -A mlxserve worker`` as the README runs it, one process, no fork."""
        return [
            str(self.python),
            *CELERY_WORKER_ARGS,
            "-n",
            f"worker-{self.n}@{node_host}",
        ]

    def environment(self, layout: Layout) -> dict[str, str]:
        """What differs between the workers of one host (the shared part is in the env file)."""
        return {
            "MLXSERVE_WORKER_SOURCE": self.source,
            "MLXSERVE_SPOOL_DIR": str(layout.data_dir / "spool" / f"worker-{self.n}"),
            "MLXSERVE_METRICS_PORT_OFFSET": str(self.n - 1),
            "PYTHONUNBUFFERED": "1",
        }


def launchd_plist(worker: Worker, layout: Layout) -> bytes:
    """A launchd agent: started at login, restarted when it exits, logs in ~/Library/Logs.

    launchd reads no environment file, so the agent runs ``python -m mlxserve.service run``,
    which reads the 0600 file and replaces itself with the worker (the Redis URL stays out of
    the plist)."""
    log = layout.log_dir / f"worker-{worker.n}.log"
    return plistlib.dumps(
        {
            "Label": f"{LABEL}.{worker.n}",
            "ProgramArguments": [
                str(worker.python),
                "-m",
                "mlxserve.service",
                "run",
                "--env-file",
                str(layout.env_file),
                "--",
                # launchd does no %-expansion: Celery expands %h to the host name itself.
                *worker.celery_args(node_host="%h")[1:],
            ],
            "EnvironmentVariables": worker.environment(layout),
            "WorkingDirectory": str(worker.checkout),
            "RunAtLoad": True,
            "KeepAlive": True,
            "ThrottleInterval": 10,
            "ExitTimeOut": STOP_TIMEOUT_S,
            "ProcessType": "Interactive",  # Metal and full CPU priority, as a foreground app
            "StandardOutPath": str(log),
            "StandardErrorPath": str(log),
        }
    )


def systemd_unit(worker: Worker, layout: Layout) -> str:
    """A systemd unit: restarted when it fails, started at boot (or login), logs appended to a
    file of its own; the environment from the 0600 file."""
    log = layout.log_dir / f"worker-{worker.n}.log"
    # In a unit, "%h" is the user's home: "%%h" gives Celery the "%h" it expands to the host name.
    command = " ".join(_quoted(a) for a in worker.celery_args(node_host="%%h"))
    environment = "\n".join(
        f"Environment={_quoted(f'{k}={v}')}" for k, v in worker.environment(layout).items()
    )
    return f"""[Unit]
Description=mlxserve worker {worker.n} ({worker.source})
Documentation=file://{worker.checkout}/docs/workers.md
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
WorkingDirectory={worker.checkout}
EnvironmentFile={layout.env_file}
{environment}
ExecStart={command}
Restart=always
RestartSec=10
# SIGTERM to the worker alone: Celery finishes the generation under way, unloads, sends or spools.
KillMode=mixed
KillSignal=SIGTERM
TimeoutStopSec={STOP_TIMEOUT_S}
StandardOutput=append:{log}
StandardError=append:{log}
{_hardening(layout) if layout.system else ""}
[Install]
WantedBy={"multi-user.target" if layout.system else "default.target"}
"""


SERVICE_USER = "mlxserve"


def _hardening(layout: Layout) -> str:
    """A system unit runs as its own unprivileged user, confined (``systemd-analyze security``):
    it may write its spool and logs and nothing else, gain no privilege, see no other's files
    under /home or /tmp, and load no kernel module. Nothing here stops mlx: no write-execute
    memory rule (mlx compiles kernels at run time), /proc readable."""
    return f"""User={SERVICE_USER}
Group={SERVICE_USER}
UMask=0077
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
ProtectSystem=strict
ReadWritePaths={layout.data_dir} {layout.log_dir}
ProtectHome=read-only
PrivateTmp=yes
PrivateDevices=yes
PrivateUsers=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictSUIDSGID=yes
RestrictRealtime=yes
RestrictNamespaces=yes
LockPersonality=yes
RemoveIPC=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
SystemCallArchitectures=native
SystemCallFilter=@system-service
"""


def _quoted(arg: str) -> str:
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"' if any(c in arg for c in ' "\\') else arg


def env_file_text(values: dict[str, str]) -> str:
    lines = ["# mlxserve worker environment (python -m mlxserve.service). Mode 0600: it may hold secrets."]
    for key, value in sorted(values.items()):
        if "\n" in value or "\r" in value:
            raise ValueError(f"{key} holds a line break")
        lines.append(f"{key}={value}")
    return "\n".join(lines) + "\n"


def env_file_read(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            values[key.strip()] = value
    return values
