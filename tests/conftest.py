"""Shared fixtures: a real Redis (database 15 of the local server) and API clients per role."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from django.conf import settings as django_settings
from django.contrib.auth.models import Group, User
from rest_framework.test import APIClient

from mlxserve.engine.demo_model import create_demo_model
from mlxserve.engine.reply import ServingClaim
from mlxserve.redis_conn import redis_for_url
from mlxserve.web.roles import OPERATOR_GROUP, PRODUCER_GROUP, VIEWER_GROUP
from tests.factories import (
    TEST_REDIS_URL,
    RedisServer,
    celery_worker_running,
    make_envelope,
    role_user,
    token_client,
)

# With DEBUG off, web server and ingester refuse keys their host made: those the tests
# start get this process's keys from the environment (so prompt hashes match).
os.environ.setdefault("SECRET_KEY", django_settings.SECRET_KEY)
os.environ.setdefault("MLXSERVE_PROMPT_HASH_KEY", django_settings.PROMPT_HASH_KEY)


# Modules that start real servers, workers or processes (Celery workers generating with mlx-lm,
# gunicorn, Prometheus, Chromium, a TLS Redis, a private Redis, the ingester as a process, `make
# run`, `manage.py check` under other settings) or load tables in bulk: `slow`. `make test-quick`
# (pytest -m "not slow") leaves them out for the edit-test loop; `make test` runs everything.
SLOW_MODULES = frozenset(
    {
        "tests/deploy/test_prometheus.py",
        "tests/deploy/test_redis_security.py",
        "tests/events/test_browser.py",
        "tests/events/test_bounded_growth.py",
        "tests/events/test_generations.py",
        "tests/events/test_ingest_crash.py",
        "tests/events/test_ingest_process.py",
        "tests/events/test_list_plans.py",
        "tests/events/test_plan_everywhere.py",
        "tests/events/test_poison_tasks.py",
        "tests/events/test_signed_tasks.py",
        "tests/events/test_rollup_upkeep.py",
        "tests/events/test_stats_rollups.py",
        "tests/mlxserve/test_api_fuzz.py",
        "tests/mlxserve/test_devredis.py",
        "tests/mlxserve/test_make_run.py",
        "tests/mlxserve/test_request_limit.py",
        "tests/mlxserve/test_service.py",
        "tests/mlxserve/test_settings.py",
        "tests/mlxserve/test_web_server.py",
        "tests/serving/test_openai.py",
        "tests/serving/test_openai_failures.py",
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(str(config.rootpath))
    for item in items:
        if str(Path(str(item.path)).relative_to(root)) in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True, scope="session")
def _celery_on_the_test_redis() -> None:
    """Queue tasks where the tests' workers listen (settings were read before the fixtures ran)."""
    from mlxserve.celery import app

    app.conf.broker_url = TEST_REDIS_URL


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings: Any) -> None:
    # Test accounts only: PBKDF2's deliberate slowness would dominate the role tests.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def redis_client(settings: Any) -> Iterator[redis.Redis]:
    """Every test gets an empty Redis database of its own, and the app points at it."""
    settings.REDIS_URL = TEST_REDIS_URL
    settings.CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": TEST_REDIS_URL}
    }
    settings.EVENTS_STREAM = "test:events"
    settings.EVENTS_CONSUMER_GROUP = "test-ingest"
    settings.TELEMETRY_CONFIG_KEY = "test:telemetry:config"
    client = redis_for_url(TEST_REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture
def any_model_served(redis_client: redis.Redis) -> Iterator[ServingClaim]:
    """The claim a live worker with no MLXSERVE_WORKER_MODELS keeps (it serves every model), with no
    worker behind it: generations are accepted and their tasks wait in the default queue."""
    claim = ServingClaim(redis_client, "test-host/idle-worker", None)
    claim.renew()
    yield claim
    claim.stop()


@pytest.fixture
def envelope_factory() -> Any:
    return make_envelope


@pytest.fixture
def staff_user(db: Any) -> User:
    return User.objects.create_user("staff", password="staff-pass-123", is_staff=True, is_superuser=True)


@pytest.fixture
def staff_client(staff_user: User) -> APIClient:
    return token_client(staff_user)


@pytest.fixture
def reader_client(db: Any) -> APIClient:
    return token_client(User.objects.create_user("reader", password="reader-pass-123"))


@pytest.fixture
def producer_client(db: Any) -> APIClient:
    # Named after the host its events come from: make_envelope's source is mac-studio-3/worker-1.
    user = User.objects.create_user("mac-studio-3")
    user.groups.add(Group.objects.get_or_create(name=PRODUCER_GROUP)[0])
    return token_client(user)


@pytest.fixture
def viewer_client(db: Any) -> APIClient:
    return token_client(role_user("viewer", VIEWER_GROUP))


@pytest.fixture
def operator_client(db: Any) -> APIClient:
    return token_client(role_user("operator", OPERATOR_GROUP))


@pytest.fixture
def anon_client() -> APIClient:
    return APIClient()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


# -- a real worker (celery, as many generations at once as the machine allows) on the test Redis ---


@pytest.fixture(scope="module")
def module_demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_demo_model(tmp_path_factory.mktemp("models") / "demo")


@pytest.fixture(scope="module")
def celery_worker_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen[bytes]]:
    with celery_worker_running(tmp_path_factory.mktemp("worker"), "test-host/celery-worker") as process:
        yield process


@pytest.fixture
def celery_worker(
    celery_worker_process: subprocess.Popen[bytes], redis_client: redis.Redis
) -> subprocess.Popen[bytes]:
    """The module's worker (every model, the default queue), its claim to serve renewed now: each
    test starts on an emptied Redis, and the worker renews its claim only every few seconds."""
    ServingClaim(redis_client, "test-host/celery-worker", None).renew()
    return celery_worker_process


# -- the ingester, on the test stream --------------------------------------------
