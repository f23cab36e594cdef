"""Settings as an operator sets them: the README's production environment passes Django's deploy checks."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from django.conf import settings as django_settings

from tests.factories import TEST_REDIS_URL

ROOT = Path(django_settings.BASE_DIR)


def readme_production_environment() -> dict[str, str]:
    """The environment block under "Running it in production" in the README, as written there."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Running it in production", 1)[1]
    block = section.split("```", 2)[1]
    return dict(line.split("=", 1) for line in block.strip().splitlines())


def manage(
    *args: str, env: Mapping[str, str | None], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``manage.py args`` with ``env`` over this environment (a value of None removes a variable)."""
    merged = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=merged,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def deploy_check(env: Mapping[str, str | None]) -> subprocess.CompletedProcess[str]:
    return manage("check", "--deploy", "--fail-level", "WARNING", env=env)


def test_the_readme_production_settings_pass_the_deploy_checks() -> None:
    env = readme_production_environment()
    for key in ("SECRET_KEY", "MLXSERVE_PROMPT_HASH_KEY"):
        assert env[key].startswith("<")  # a placeholder the operator fills in
        env[key] = secrets.token_urlsafe(60)
    result = deploy_check(env)
    assert result.returncode == 0, result.stderr
    assert "System check identified no issues" in result.stdout


def test_without_them_the_deploy_checks_say_what_is_missing() -> None:
    result = deploy_check({"DEBUG": "0", "SECRET_KEY": secrets.token_urlsafe(60)})
    assert result.returncode != 0
    assert set(re.findall(r"security\.W\d+", result.stderr)) >= {
        "security.W004",
        "security.W012",
        "security.W016",
    }


def test_a_malformed_proxy_header_refuses_to_start() -> None:
    result = deploy_check({"MLXSERVE_PROXY_SSL_HEADER": "X-Forwarded-Proto"})
    assert result.returncode != 0
    assert "MLXSERVE_PROXY_SSL_HEADER must look like HTTP_X_FORWARDED_PROTO=https" in result.stderr


# -- keys: made per host for `make run`, refused in production -------------------------

NO_KEYS: dict[str, Any] = {"DEBUG": "0", "SECRET_KEY": None, "MLXSERVE_PROMPT_HASH_KEY": None}


def test_the_ingester_refuses_to_start_without_keys_saying_why(tmp_path: Path) -> None:
    result = manage("ingest_events", "--exit-when-idle", env={**NO_KEYS, "MLXSERVE_VAR_DIR": str(tmp_path)})
    assert result.returncode == 1
    assert (
        "The ingester will not start with DEBUG off and SECRET_KEY and MLXSERVE_PROMPT_HASH_KEY not set"
        in result.stderr
    )
    assert "would differ between hosts and change on redeploy" in result.stderr

    only_one = manage(
        "ingest_events",
        "--exit-when-idle",
        env={**NO_KEYS, "SECRET_KEY": secrets.token_urlsafe(50), "MLXSERVE_VAR_DIR": str(tmp_path)},
    )
    assert only_one.returncode == 1
    assert "DEBUG off and MLXSERVE_PROMPT_HASH_KEY not set: MLXSERVE_PROMPT_HASH_KEY keys the prompt" in (
        only_one.stderr
    )


def test_the_ingester_starts_with_both_keys_or_in_debug(tmp_path: Path) -> None:
    common = {
        "MLXSERVE_VAR_DIR": str(tmp_path),
        "REDIS_URL": TEST_REDIS_URL,
        "MLXSERVE_EVENTS_STREAM": f"keys-test-{secrets.token_hex(4)}",
        "DATABASE_URL": None,
    }
    manage("migrate", "-v0", env={**NO_KEYS, **common}).check_returncode()
    keys = {"SECRET_KEY": secrets.token_urlsafe(50), "MLXSERVE_PROMPT_HASH_KEY": secrets.token_urlsafe(50)}
    for env in ({**NO_KEYS, **keys}, {**NO_KEYS, "DEBUG": "1"}):
        result = manage("ingest_events", "--exit-when-idle", "--block-ms=10", env={**env, **common})
        assert result.returncode == 0, result.stderr
        assert "will not start" not in result.stderr


def test_the_web_server_refuses_to_start_without_keys(tmp_path: Path) -> None:
    env = {k: v for k, v in {**os.environ, **NO_KEYS, "MLXSERVE_VAR_DIR": str(tmp_path)}.items() if v}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "gunicorn"), "mlxserve.wsgi:application", "--bind", "127.0.0.1:0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "The web server will not start with DEBUG off and SECRET_KEY and MLXSERVE_PROMPT_HASH_KEY" in (
        result.stderr
    )


def test_the_deploy_check_names_a_key_this_host_made(tmp_path: Path) -> None:
    result = deploy_check(
        {
            **readme_production_environment(),
            "SECRET_KEY": secrets.token_urlsafe(60),
            "MLXSERVE_PROMPT_HASH_KEY": None,
            "MLXSERVE_VAR_DIR": str(tmp_path),
        }
    )
    assert result.returncode != 0
    assert "mlxserve.W001" in result.stderr
    assert "MLXSERVE_PROMPT_HASH_KEY is read from a file this host made" in result.stderr


def test_make_run_keys_are_private_to_their_owner(tmp_path: Path) -> None:
    manage("check", env={**NO_KEYS, "MLXSERVE_VAR_DIR": str(tmp_path)}).check_returncode()
    for name in ("secret-key", "prompt-hash-key"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600
        assert len((tmp_path / name).read_text()) >= 50


def test_a_metrics_port_offset_out_of_range_is_refused_at_start() -> None:
    result = manage("check", env={"MLXSERVE_METRICS_PORT_OFFSET": "2000"})
    assert result.returncode != 0
    assert "MLXSERVE_METRICS_PORT_OFFSET must be from 0 to 1000, got 2000" in result.stderr


def test_postgresql_connections_start_no_parallel_workers_and_a_bad_number_is_refused(db: Any) -> None:
    from django.db import connection

    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SHOW max_parallel_workers_per_gather")
            assert cursor.fetchone() == ("0",)
    env = {
        "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/postgres",
        "MLXSERVE_DB_PARALLEL_WORKERS": "100",
    }
    result = manage("check", env=env)
    assert result.returncode != 0
    assert "MLXSERVE_DB_PARALLEL_WORKERS must be 0 to 64, got 100" in result.stderr


def test_postgresql_connections_compile_no_query_with_jit(db: Any) -> None:
    """At 30 million events the admin's event list was estimated past JIT's thresholds and took a
    second to compile for a millisecond's work: the project's connections never JIT-compile."""
    from django.db import connection

    from events.models import Event

    if connection.vendor != "postgresql":
        return  # SQLite has no JIT
    sql, params = Event.objects.order_by("-timestamp", "-id")[:100].query.sql_with_params()
    with connection.cursor() as cursor:
        cursor.execute("SHOW jit")
        assert cursor.fetchone() == ("off",)
        # Every query's estimate past the thresholds, as the admin list's is on a big table.
        cursor.execute("SET LOCAL jit_above_cost = 0")
        cursor.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", params)
        assert "JIT" not in cursor.fetchone()[0][0]


def test_web_threads_out_of_range_or_more_than_the_pool_can_serve_are_refused_at_start() -> None:
    postgres = "postgres://postgres@127.0.0.1:5432/postgres"
    refusals = {
        "MLXSERVE_WEB_THREADS must be 1 to 256, got 0": {"MLXSERVE_WEB_THREADS": "0"},
        "MLXSERVE_WEB_THREADS must be 1 to 256, got 257": {"MLXSERVE_WEB_THREADS": "257"},
        "MLXSERVE_DB_POOL_SIZE must be 0 or more, got -1": {"MLXSERVE_DB_POOL_SIZE": "-1"},
        "MLXSERVE_DB_POOL_SIZE (8) must be more than MLXSERVE_WEB_THREADS (8)": {
            "DATABASE_URL": postgres,
            "MLXSERVE_DB_POOL_SIZE": "8",
        },
    }
    for message, env in refusals.items():
        result = manage("check", env=env)
        assert result.returncode != 0 and message in result.stderr, (env, result.stderr[-500:])
    # A pool one larger than the threads, or no pool at all, starts.
    for env in ({"MLXSERVE_DB_POOL_SIZE": "9"}, {"MLXSERVE_DB_POOL_SIZE": "0", "MLXSERVE_WEB_THREADS": "64"}):
        result = manage("check", env={"DATABASE_URL": postgres, **env})
        assert result.returncode == 0, (env, result.stderr[-500:])
