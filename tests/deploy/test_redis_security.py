"""Redis over TLS with the shipped ACL users (deploy/redis/users.acl): a real TLS redis-server on a
loopback port, a certificate authority made by the test, a real Celery worker as the `worker` user."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from django.conf import settings as django_settings

from events.ingest import EventIngester
from events.models import Event
from tests.factories import celery_worker_running, free_port, generation_queue_on

pytestmark = pytest.mark.django_db(transaction=True)

ACL = Path(django_settings.BASE_DIR) / "deploy" / "redis" / "users.acl"
PASSWORDS = {
    "CHANGE-ME-WEB": "web-secret",
    "CHANGE-ME-INGESTER": "ingester-secret",
    "CHANGE-ME-WORKER": "worker-secret",
}


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[dict[str, str]]:
    """URLs of each user of the shipped ACL on a TLS-only Redis (and ``admin`` for the test)."""
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "1",
        "-subj",
        "/CN=mlxserve test CA",
        cwd=tmp_path,
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
        cwd=tmp_path,
    )
    (tmp_path / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
        cwd=tmp_path,
    )
    acl = ACL.read_text()
    for placeholder, password in PASSWORDS.items():
        acl = acl.replace(placeholder, password)
    (tmp_path / "users.acl").write_text(acl + "user admin on >admin-secret ~* &* +@all\n")
    port = free_port()
    server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            "server.crt",
            "--tls-key-file",
            "server.key",
            "--tls-ca-cert-file",
            "ca.crt",
            "--tls-auth-clients",
            "no",
            "--aclfile",
            str(tmp_path / "users.acl"),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    query = f"ssl_cert_reqs=required&ssl_ca_certs={tmp_path / 'ca.crt'}"
    users = {
        "web": "web-secret",
        "ingester": "ingester-secret",
        "worker": "worker-secret",
        "admin": "admin-secret",
    }
    urls = {
        user: f"rediss://{user}:{password}@localhost:{port}/0?{query}" for user, password in users.items()
    }
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(urls["admin"]).ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "the TLS redis-server did not start"
                time.sleep(0.1)
        yield urls
    finally:
        server.terminate()
        server.wait(10)


def test_plain_text_and_anonymous_connections_are_refused(tls_redis: dict[str, str]) -> None:
    port = tls_redis["admin"].split("@localhost:")[1].split("/")[0]
    with pytest.raises(redis.ConnectionError):
        redis.Redis(host="127.0.0.1", port=int(port), socket_timeout=2).ping()
    anonymous = tls_redis["admin"].replace("admin:admin-secret@", "")
    with pytest.raises((redis.AuthenticationError, redis.ResponseError)):
        redis.Redis.from_url(anonymous).set("x", "1")


def test_the_worker_user_may_do_what_a_worker_does_and_nothing_more(tls_redis: dict[str, str]) -> None:
    worker = redis.Redis.from_url(tls_redis["worker"])
    assert worker.xadd("mlxserve:events", {"e": b"{}"})
    assert worker.xlen("mlxserve:events") == 1
    assert worker.get("mlxserve:telemetry:config") is None
    for refused in (
        lambda: worker.flushdb(),
        lambda: worker.delete("mlxserve:events"),
        lambda: worker.xtrim("mlxserve:events", maxlen=0),
        lambda: worker.set("mlxserve:telemetry:config", "{}"),
        lambda: worker.xreadgroup("g", "c", {"mlxserve:events": ">"}),
        lambda: worker.config_get("*"),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            refused()
    assert redis.Redis.from_url(tls_redis["admin"]).xlen("mlxserve:events") == 1


def test_a_generation_runs_end_to_end_over_tls_with_each_component_as_its_own_user(
    tls_redis: dict[str, str], module_demo_model: Path, tmp_path: Path, settings: Any
) -> None:
    worker_url = tls_redis["worker"]
    env = {
        "REDIS_URL": worker_url,
        "CELERY_BROKER_URL": worker_url,
        "MLXSERVE_EVENTS_STREAM": "mlxserve:events",
    }
    with celery_worker_running(tmp_path, "tls-host/w1", **env):
        generation_id = generation_queue_on(
            tls_redis["web"], module_demo_model
        )  # the control plane queues it
        ingester = EventIngester(
            client=redis.Redis.from_url(tls_redis["ingester"]),
            stream="mlxserve:events",
            group="mlxserve-ingest",
            consumer="i1",
            block_ms=100,
        )
        deadline = time.monotonic() + 90
        while not Event.objects.filter(generation_id=generation_id, type="generationCompleted").exists():
            assert time.monotonic() < deadline, "no generationCompleted arrived"
            ingester.step()
        assert ingester.trim() >= 0  # the ingester user may trim what it has stored
    assert Event.objects.filter(generation_id=generation_id, type="tokenGenerated").count() == 4
    assert Event.objects.filter(source="tls-host/w1", type="runtimeStatus").exists()


def test_the_api_posts_events_over_tls_as_the_web_user(
    tls_redis: dict[str, str], settings: Any, producer_client: Any
) -> None:
    from tests.factories import make_envelope

    settings.REDIS_URL = tls_redis["web"]
    settings.EVENTS_STREAM = "mlxserve:events"
    envelope = make_envelope()
    response = producer_client.post("/api/events/", envelope, format="json")
    assert response.status_code == 202, response.content
    assert redis.Redis.from_url(tls_redis["admin"]).xlen("mlxserve:events") == 1


def test_a_worker_host_cannot_set_another_workers_config_or_send_it_commands(
    tls_redis: dict[str, str],
) -> None:
    import queue

    from mlxserve.bus import control_command_publish, telemetry_config_publish
    from mlxserve.contract.control import ControlCommand, control_log_key
    from mlxserve.contract.telemetry import TelemetryConfigSchema
    from mlxserve.engine.config_watcher import TelemetryConfigWatcher
    from mlxserve.engine.runtime import ControlLog

    key, channel = "mlxserve:telemetry:config", "mlxserve:control"
    web, worker = redis.Redis.from_url(tls_redis["web"]), redis.Redis.from_url(tls_redis["worker"])
    telemetry_config_publish(client=web, key=key, config=TelemetryConfigSchema(enabled=True), version=2)
    heard: queue.Queue[tuple[bool, int]] = queue.Queue()
    watcher = TelemetryConfigWatcher(
        client=redis.Redis.from_url(tls_redis["worker"]),
        key=key,
        on_change=lambda c, v: heard.put((c.enabled, v)),
    ).start()
    commands: list[ControlCommand] = []
    log = ControlLog(
        client=redis.Redis.from_url(tls_redis["worker"]), key=control_log_key(channel), handle=commands.append
    )
    log.read()  # a worker starting: from now on
    try:
        assert heard.get(timeout=3.0) == (True, 2)
        # The worker user may publish on the channels it listens on, but what it says is not applied:
        forged = b'{"version": 9223372036854775807, "config": {"enabled": false}}'
        assert worker.publish(f"{key}:changes", forged) >= 1
        unload = b'{"command": "unload", "model": "demo"}'
        worker.publish(channel, unload)
        log.read()
        with pytest.raises(queue.Empty):
            heard.get(timeout=1.0)
        assert watcher.version == 2 and commands == []
        # ...and it may write neither the config nor the command log.
        for refused in (
            lambda: worker.set(key, forged),
            lambda: worker.xadd(control_log_key(channel), {"c": unload}),
            lambda: worker.delete(control_log_key(channel)),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                refused()
        # What the control plane sends arrives, once.
        control_command_publish(
            client=web, channel=channel, command=ControlCommand(command="unload", model="m")
        )
        telemetry_config_publish(client=web, key=key, config=TelemetryConfigSchema(enabled=False), version=3)
        log.read()
        log.read()
        assert commands == [ControlCommand(command="unload", model="m")]
        assert heard.get(timeout=3.0) == (False, 3)
    finally:
        watcher.stop()


def test_a_worker_host_with_a_stream_of_its_own_can_lose_or_forge_only_its_own_events(
    tls_redis: dict[str, str], settings: Any
) -> None:
    import io

    from django.core.management import call_command

    from events.ingest import EventIngester
    from events.models import DeadLetter
    from tests.factories import make_envelope

    settings.EVENTS_STREAM = "mlxserve:events"
    shown = io.StringIO()
    for host, password in (("mac-a", "a-secret"), ("mac-b", "b-secret")):
        call_command(
            "create_worker_host", host, password=password, redis_admin_url=tls_redis["admin"], stdout=shown
        )
    assert "MLXSERVE_EVENTS_STREAM=mlxserve:events:mac-a" in shown.getvalue()
    assert shown.getvalue().splitlines()[0].startswith("user worker-mac-a on >a-secret ~celery*")
    as_host = {
        host: redis.Redis.from_url(
            tls_redis["worker"].replace("worker:worker-secret@", f"worker-{host}:{host[-1]}-secret@")
        )
        for host in ("mac-a", "mac-b")
    }
    a, b = as_host["mac-a"], as_host["mac-b"]
    web = redis.Redis.from_url(tls_redis["web"])

    def event(source: str) -> dict[str, Any]:
        return make_envelope(
            "runtimeStatus",
            source=source,
            timestamp=int(time.time() * 1000),
            generationId=None,
            payload={"status": "ready", "modelsLoaded": 0},
        )

    def xadd(client: redis.Redis, stream: str, envelope: dict[str, Any]) -> None:
        client.xadd(stream, {"e": json.dumps(envelope)})

    ingester = EventIngester(
        client=redis.Redis.from_url(tls_redis["ingester"]),
        stream="mlxserve:events",
        group="mlxserve-ingest",
        consumer="i1",
        block_ms=50,
        hosts=("mac-a", "mac-b"),
    )
    mine, forged = event("mac-a/w1"), event("mac-b/w1")
    xadd(a, "mlxserve:events:mac-a", mine)
    xadd(a, "mlxserve:events:mac-a", forged)  # speaking for another host: kept as a dead letter
    for _ in range(3):
        ingester.step()
    assert Event.objects.filter(pk=mine["id"]).exists() and not Event.objects.filter(pk=forged["id"]).exists()
    assert DeadLetter.objects.get().error["details"]["issues"][0]["code"] == "foreign_source"
    # Host a's credentials reach neither the shared stream nor b's...
    for refused in (
        lambda: xadd(a, "mlxserve:events", event("mac-a/w1")),
        lambda: xadd(a, "mlxserve:events:mac-b", event("mac-a/w1")),
        lambda: a.xtrim("mlxserve:events:mac-b", maxlen=0),
        lambda: a.delete("mlxserve:events:mac-a"),
        lambda: a.incrby("mlxserve:generation:g1:attempts:mac-b", 100),  # another host's retry bound
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            refused()
    assert a.incrby("mlxserve:generation:g1:attempts", 1) == 1  # the fleet's count: numbers only
    assert a.incrby("mlxserve:generation:g1:attempts:mac-a", 1) == 1
    # ...and what they can do to their own stream (empty it, block it at the top of the id space)
    # costs that host alone: b's events and the API's are stored as before.
    a.execute_command("XADD", "mlxserve:events:mac-a", "MAXLEN", "0", "*", "e", "x")
    a.execute_command("XADD", "mlxserve:events:mac-a", "18446744073709551615-18446744073709551615", "e", "x")
    with pytest.raises(redis.ResponseError):
        xadd(a, "mlxserve:events:mac-a", event("mac-a/w1"))
    theirs, posted = event("mac-b/w1"), event("api-host/x")
    xadd(b, "mlxserve:events:mac-b", theirs)
    xadd(web, "mlxserve:events", posted)
    for _ in range(3):
        ingester.step()
    assert Event.objects.filter(pk__in=[theirs["id"], posted["id"]]).count() == 2
    assert ingester.trim() >= 0


def test_the_shipped_worker_user_has_the_rules_create_worker_host_narrows(settings: Any) -> None:
    from events.management.commands.create_worker_host import acl_rules

    settings.EVENTS_STREAM, settings.TELEMETRY_CONFIG_KEY = "mlxserve:events", "mlxserve:telemetry:config"
    settings.WORKER_CONTROL_CHANNEL = "mlxserve:control"

    [line] = [line for line in ACL.read_text().splitlines() if line.startswith("user worker ")]
    assert line == f"user worker on >CHANGE-ME-WORKER {acl_rules(None)}"
