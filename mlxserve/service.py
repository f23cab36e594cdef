"""Workers as services: a launchd agent per worker on macOS, a systemd unit per worker on Linux.

    python -m mlxserve.service install [--workers N] [--source-prefix NAME] [--system] [--no-start]
    python -m mlxserve.service status
    python -m mlxserve.service uninstall

Plain Python, no Django and no database: it runs on a Mac that has only the worker install.
``install`` refuses unless ``REDIS_URL`` (from the environment, or ``--redis-url``) answers.
It writes the environment to a file of mode 0600 (the Redis URL may hold a password),
then one service per worker, each with its own source (``<prefix>/worker-<n>``), spool
directory, log file and metrics port (``prometheusPort + n - 1``), and loads them. Each is
restarted when it crashes and started at login (launchd) or boot (systemd). A stop is a
SIGTERM: Celery finishes the generation under way (or it is given back to the queue once
the manager's patience runs out), models unload with ``shutdown`` and buffered events are
sent, or kept in the spool for the next start. ``uninstall`` stops them and removes
everything ``install`` wrote but the spool (events not yet sent) and the logs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from mlxserve.host.service_files import (
    LABEL,
    PASSED_ON,
    SERVICE_USER,
    UNIT,
    Layout,
    Worker,
    env_file_read,
    env_file_text,
    launchd_plist,
    systemd_unit,
)


def _service_user_ensure(layout: Layout) -> None:
    """System units run as ``mlxserve``, made here if missing (a system user, no login shell),
    owning the spool and the logs and nothing else."""
    import pwd

    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--home-dir",
                str(layout.data_dir),
                "--shell",
                "/usr/sbin/nologin",
                SERVICE_USER,
            ],
            check=True,
        )
        print(f"Made the system user {SERVICE_USER}: the workers run as it")
    for directory in (layout.data_dir, layout.data_dir / "spool", layout.log_dir):
        shutil.chown(directory, SERVICE_USER, SERVICE_USER)


def redis_answers(url: str) -> str | None:
    """None when a Redis answers at ``url``; otherwise why not."""
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3).ping()
    except (redis.RedisError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _run(command: list[str], *, check: bool = False) -> subprocess.CompletedProcess[str]:
    print("  $", " ".join(command))
    return subprocess.run(command, capture_output=True, text=True, check=check)


def _manager_usable(layout: Layout) -> bool:
    if layout.manager == "launchd":
        return shutil.which("launchctl") is not None
    if shutil.which("systemctl") is None or not Path("/run/systemd/system").exists():
        return False
    return _run([*_systemctl(layout), "show-environment"]).returncode == 0


def _systemctl(layout: Layout) -> list[str]:
    return ["systemctl"] if layout.system else ["systemctl", "--user"]


def install(
    *,
    layout: Layout,
    workers: int,
    source_prefix: str,
    redis_url: str,
    extra_env: dict[str, str],
    start: bool,
    checkout: Path,
    python: Path,
) -> int:
    if not redis_url:
        print("REDIS_URL is not set: give it in the environment or with --redis-url.", file=sys.stderr)
        return 2
    if (why := redis_answers(redis_url)) is not None:
        print(f"Redis does not answer at {_redacted(redis_url)} ({why}): nothing installed.", file=sys.stderr)
        return 2
    for directory in (layout.config_dir, layout.data_dir, layout.log_dir, layout.service_dir):
        directory.mkdir(parents=True, exist_ok=True)
    (layout.data_dir / "spool").mkdir(mode=0o700, exist_ok=True)
    if layout.system and layout.manager == "systemd":
        _service_user_ensure(layout)
    env = {
        "REDIS_URL": redis_url,
        **{k: os.environ[k] for k in PASSED_ON[1:] if os.environ.get(k)},
        **extra_env,
    }
    fd = os.open(layout.env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(env_file_text(env))
    os.chmod(layout.env_file, 0o600)  # an existing file keeps its mode through O_CREAT
    print(f"Wrote {layout.env_file} (mode 0600): {', '.join(sorted(env))}")
    for old in layout.installed():
        if old > workers:
            _remove(layout, old, manager_usable=start and _manager_usable(layout))
    usable = start and _manager_usable(layout)
    for n in range(1, workers + 1):
        worker = Worker(n=n, source=f"{source_prefix}/worker-{n}", checkout=checkout, python=python)
        path = layout.service_file(n)
        if layout.manager == "launchd":
            path.write_bytes(launchd_plist(worker, layout))
        else:
            path.write_text(systemd_unit(worker, layout))
        print(f"Wrote {path}: worker {n}, source {worker.source}, log {layout.log_dir / f'worker-{n}.log'}")
    if not start:
        print("Not started (--no-start).")
        return 0
    if not usable:
        print(
            f"The service manager ({layout.manager}) is not usable here: files written, nothing started. "
            "Start them with it where it runs, or run the ExecStart line of a unit by hand.",
            file=sys.stderr,
        )
        return 1
    for n in range(1, workers + 1):
        if layout.manager == "launchd":
            domain = f"gui/{os.getuid()}"
            _run(["launchctl", "bootout", f"{domain}/{LABEL}.{n}"])  # a previous version, if loaded
            _run(["launchctl", "bootstrap", domain, str(layout.service_file(n))], check=True)
        else:
            _run([*_systemctl(layout), "daemon-reload"], check=True)
            _run([*_systemctl(layout), "enable", "--now", f"{UNIT}-{n}.service"], check=True)
            _run([*_systemctl(layout), "restart", f"{UNIT}-{n}.service"], check=True)  # a new version
    print(f"Started {workers} worker(s). Check: python -m mlxserve.service status; GET /api/workers/")
    return 0


def _remove(layout: Layout, n: int, *, manager_usable: bool) -> None:
    if manager_usable:
        if layout.manager == "launchd":
            _run(["launchctl", "bootout", f"gui/{os.getuid()}/{LABEL}.{n}"])
        else:
            _run([*_systemctl(layout), "disable", "--now", f"{UNIT}-{n}.service"])
    layout.service_file(n).unlink(missing_ok=True)
    print(f"Removed {layout.service_file(n)}")


def uninstall(*, layout: Layout) -> int:
    usable = _manager_usable(layout)
    for n in layout.installed():
        _remove(layout, n, manager_usable=usable)
    if usable and layout.manager == "systemd":
        _run([*_systemctl(layout), "daemon-reload"])
    if layout.env_file.exists():
        layout.env_file.unlink()
        print(f"Removed {layout.env_file}")
    spool = layout.data_dir / "spool"
    left = [p for p in spool.rglob("*") if p.is_file()] if spool.exists() else []
    if left:
        print(
            f"Kept {spool}: {len(left)} spool file(s) of events not yet sent"
            " (the next install delivers them)."
        )
    # The directories install made go too, unless something is left in them (logs, a spool).
    for directory in (spool, layout.log_dir, layout.data_dir, layout.config_dir):
        _remove_empty_tree(directory)
    if layout.log_dir.exists():
        print(f"Kept the logs in {layout.log_dir}.")
    return 0


def _remove_empty_tree(directory: Path) -> None:
    if not directory.is_dir():
        return
    for path in sorted(directory.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    if not any(directory.iterdir()):
        directory.rmdir()


def status(*, layout: Layout) -> int:
    numbers = layout.installed()
    if not numbers:
        print(f"No mlxserve workers installed in {layout.service_dir}.")
        return 3
    usable = _manager_usable(layout)
    for n in numbers:
        if not usable:
            state = f"installed ({layout.manager} not usable here)"
        elif layout.manager == "launchd":
            state = (
                "loaded"
                if _run(["launchctl", "print", f"gui/{os.getuid()}/{LABEL}.{n}"]).returncode == 0
                else "not loaded"
            )
        else:
            state = (
                _run([*_systemctl(layout), "is-active", f"{UNIT}-{n}.service"]).stdout.strip() or "unknown"
            )
        print(f"worker {n}: {state}; {layout.service_file(n)}; log {layout.log_dir / f'worker-{n}.log'}")
    return 0


def run(env_file: Path, command: Sequence[str]) -> None:
    """Replace this process with ``command``, its environment read from ``env_file`` (launchd)."""
    os.environ.update(env_file_read(env_file))
    os.execv(sys.executable, [sys.executable, *command])


def _redacted(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlxserve.service",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="action", required=True)
    add = sub.add_parser("install", help="write and load the worker services")
    add.add_argument("--workers", type=int, default=1, help="how many on this host (default 1)")
    add.add_argument(
        "--source-prefix",
        default=socket.gethostname().split(".")[0],
        help="sources are PREFIX/worker-N (default: this host's short name; a producer account of that name)",
    )
    add.add_argument("--redis-url", default=os.environ.get("REDIS_URL", ""), help="default: $REDIS_URL")
    add.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="more worker environment"
    )
    add.add_argument(
        "--system", action="store_true", help="systemd: a system unit (as root) rather than a user one"
    )
    add.add_argument(
        "--models",
        nargs="+",
        default=[],
        metavar="NAME",
        help="the registered models these workers serve (MLXSERVE_WORKER_MODELS; default: every model)",
    )
    add.add_argument("--no-start", action="store_true", help="write the files only")
    for name, help_text in (("status", "what is installed and running"), ("uninstall", "stop and remove")):
        one = sub.add_parser(name, help=help_text)
        one.add_argument("--system", action="store_true")
    runner = sub.add_parser("run", help="(used by the launchd agents) run a command with an env file")
    runner.add_argument("--env-file", type=Path, required=True)
    runner.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)

    if args.action == "run":
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        run(args.env_file, command)
        return 0  # not reached
    layout = Layout.here(system=args.system)
    if args.action == "status":
        return status(layout=layout)
    if args.action == "uninstall":
        return uninstall(layout=layout)
    if not 1 <= args.workers <= 64:
        parser.error("--workers must be from 1 to 64")
    extra = dict(item.split("=", 1) for item in args.env if "=" in item)
    if args.models:
        if any(not name or "," in name or len(name) > 200 or not name.isprintable() for name in args.models):
            parser.error("--models takes registered model names (1 to 200 printable characters, no commas)")
        extra["MLXSERVE_WORKER_MODELS"] = ",".join(args.models)
    return install(
        layout=layout,
        workers=args.workers,
        source_prefix=args.source_prefix,
        redis_url=args.redis_url,
        extra_env=extra,
        start=not args.no_start,
        checkout=Path(__file__).resolve().parent.parent,
        python=Path(sys.executable),
    )


if __name__ == "__main__":
    sys.exit(main())
