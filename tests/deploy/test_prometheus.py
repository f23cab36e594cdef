"""Prometheus and Grafana, proven against a real Prometheus (Debian's ``prometheus``).

A real Prometheus scrapes the running control plane and a real Celery worker while
demo generations run; every PromQL expression of the Grafana dashboard and of the
alert rules is then evaluated through Prometheus' HTTP API and must return data.
promtool checks the config and the rules and runs the alert unit tests. The control
plane's /metrics is also checked under gunicorn with several processes.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import redis
import yaml
from django.conf import settings as django_settings
from django.core.management import call_command
from django.db import connection
from prometheus_client.parser import text_string_to_metric_families
from rest_framework.test import APIClient

from events.ingest import EventIngester
from events.models import Event, RegisteredModel
from events.selectors import generation_detail
from telemetry.services import telemetry_config_patch
from tests.factories import CONFIG_KEY, CONTROL, STREAM, free_port, web_server_command

ROOT = Path(django_settings.BASE_DIR)
DEPLOY = ROOT / "deploy"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
# What Grafana puts in for its variables when it sends a query.
GRAFANA_VARIABLES = {"$__rate_interval": "2m", "$model": ".*"}
THRESHOLD = re.compile(r"\s*(>=|<=|==|!=|>|<)\s*[0-9.e+-]+\s*$")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert Path(PROMTOOL).exists(), "Debian's prometheus package is needed (.ci/run installs it)"
    return subprocess.run([PROMTOOL, *args], cwd=DEPLOY / "prometheus", capture_output=True, text=True)


def test_promtool_accepts_the_config_and_the_rules_and_the_alert_tests_pass() -> None:
    for args in (
        ("check", "config", "prometheus.yml"),
        ("check", "rules", "alerts.yml"),
        ("test", "rules", "alerts_test.yml"),
    ):
        result = promtool(*args)
        assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in promtool("test", "rules", "alerts_test.yml").stdout


def test_every_alert_has_a_firing_and_a_quiet_case_in_the_unit_tests() -> None:
    alerts = {r["alert"] for g in load(DEPLOY / "prometheus" / "alerts.yml")["groups"] for r in g["rules"]}
    cases: dict[str, list[bool]] = {}
    for test in load(DEPLOY / "prometheus" / "alerts_test.yml")["tests"]:
        for case in test["alert_rule_test"]:
            cases.setdefault(case["alertname"], []).append(bool(case["exp_alerts"]))
    assert {name: sorted(set(fired)) for name, fired in cases.items()} == {
        name: [False, True] for name in alerts
    }


def test_the_committed_dashboard_is_what_the_builder_writes() -> None:
    sys.path.insert(0, str(DEPLOY / "grafana"))
    try:
        import build_dashboard
    finally:
        sys.path.pop(0)
    committed = json.loads((DEPLOY / "grafana" / "dashboards" / "mlxserve.json").read_text())
    assert committed == build_dashboard.dashboard()
    datasource = load(DEPLOY / "grafana" / "provisioning" / "datasources" / "mlxserve.yml")
    assert datasource["datasources"][0]["uid"] == committed["panels"][1]["datasource"]["uid"]


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def dashboard_queries() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "mlxserve.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    variables = [v["query"] for v in dashboard["templating"]["list"]]
    queries += [
        (q["query"] if isinstance(q, dict) else q).removeprefix("label_values(").rsplit(",", 1)[0]
        for q in variables
    ]
    for name, value in GRAFANA_VARIABLES.items():
        queries = [q.replace(name, value) for q in queries]
    return queries


def alert_queries() -> list[str]:
    """Each alert's expression without its threshold: the value the alert compares must exist."""
    rules = [r for g in load(DEPLOY / "prometheus" / "alerts.yml")["groups"] for r in g["rules"]]
    return [THRESHOLD.sub("", " ".join(r["expr"].split())) for r in rules]


class Prometheus:
    def __init__(self, tmp: Path, control_plane: str, worker: str) -> None:
        assert Path(PROMETHEUS).exists(), "Debian's prometheus package is needed (.ci/run installs it)"
        config = load(DEPLOY / "prometheus" / "prometheus.yml")
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        jobs = {job["job_name"]: job for job in config["scrape_configs"]}
        jobs["mlxserve-control-plane"]["static_configs"] = [{"targets": [control_plane]}]
        (tmp / "workers.yml").write_text(yaml.safe_dump([{"targets": [worker]}]))
        shutil.copy(DEPLOY / "prometheus" / "alerts.yml", tmp / "alerts.yml")
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.log = tmp / "prometheus.log"
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={tmp / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def api(self, path: str, **query: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def targets_up(self) -> dict[str, str]:
        try:
            targets = self.api("targets")["activeTargets"]
        except OSError:  # still starting
            return {}
        return {t["labels"]["job"]: t["health"] for t in targets}

    def values(self, expr: str) -> list[float]:
        return [float(r["value"][1]) for r in self.api("query", query=expr)["result"]]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


@pytest.fixture
def ingester_thread(redis_client: redis.Redis) -> Iterator[None]:
    """The ingester, running as it does in production (here in a thread of the test)."""
    stop = threading.Event()

    def run() -> None:
        ingester = EventIngester(
            client=redis_client, stream=STREAM, group="test-ingest", consumer="t", block_ms=100
        )
        try:
            while not stop.is_set():
                ingester.step()
        finally:
            connection.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(10)


@pytest.mark.django_db(transaction=True)
def test_a_real_prometheus_gets_data_for_every_dashboard_and_alert_query(
    live_server: Any,
    celery_worker: Any,
    module_demo_model: Path,
    operator_client: APIClient,
    ingester_thread: None,
    settings: Any,
    tmp_path: Path,
) -> None:
    settings.EVENTS_STREAM, settings.TELEMETRY_CONFIG_KEY = STREAM, CONFIG_KEY
    settings.WORKER_CONTROL_CHANNEL = CONTROL
    worker_port = free_port()
    # Workers take the exporter port and the heartbeat interval from the pushed config.
    telemetry_config_patch(
        data={"enabled": True, "prometheusPort": worker_port, "exportIntervalMs": 1000}, user=None, via="api"
    )
    control_plane = live_server.url.removeprefix("http://")
    prometheus = Prometheus(tmp_path, control_plane, f"127.0.0.1:{worker_port}")
    try:
        wait_for(
            lambda: prometheus.targets_up() == {"mlxserve-control-plane": "up", "mlxserve-workers": "up"},
            60,
            lambda: f"targets: {prometheus.targets_up()}\n{prometheus.log.read_text()[-2000:]}",
        )

        RegisteredModel.objects.create(name="demo", path=str(module_demo_model))
        RegisteredModel.objects.create(name="no-such-model", path=str(module_demo_model) + "-gone")
        key = io.StringIO()
        call_command("create_api_key", "prometheus-test", stdout=key, stderr=io.StringIO())
        serving = openai.OpenAI(
            base_url=f"{live_server.url}/v1", api_key=key.getvalue().strip(), max_retries=0
        )
        queries = dashboard_queries() + alert_queries()
        missing: list[str] = queries

        def all_have_data() -> bool:
            nonlocal missing
            missing = [q for q in queries if not any(math.isfinite(v) for v in prometheus.values(q))]
            return not missing

        # Work goes on while Prometheus watches: rates and quantiles need counts that grow
        # between scrapes (a series first seen at its final value has no rate). Every other
        # round unloads the model first, so loads are seen to grow too; one request fails.
        deadline, round_, served_tokens = time.monotonic() + 180, 0, 0
        while not all_have_data():
            assert time.monotonic() < deadline, "no data for:\n" + "\n".join(missing)
            if round_ % 2:
                unload = operator_client.post("/api/workers/unload/", {"model": "demo"}, format="json")
                assert unload.status_code == 202 and unload.json() == {"listeners": 1}
            model = "no-such-model" if round_ == 1 else "demo"
            order = {"model": model, "prompt": f"Tell me about {round_}", "maxTokens": 48}
            response = operator_client.post("/api/generations/", order, format="json")
            assert response.status_code == 202
            wait_for(generation_done(response.json()["generationId"]), 60, lambda: "generation stuck")
            # And one through the OpenAI-compatible endpoint, for the serving panels.
            served = serving.completions.create(model="demo", prompt="Hi", max_tokens=2)
            assert served.usage is not None
            served_tokens += served.usage.completion_tokens
            round_ += 1
            time.sleep(1.5)

        # The figures are the fleet's, not just present: what Prometheus reads is what was stored.
        expected_tokens = 48 * (round_ - 1) + served_tokens
        wait_for(
            lambda: Event.objects.filter(type="tokenGenerated").count() == expected_tokens,
            30,
            lambda: f"{Event.objects.filter(type='tokenGenerated').count()} tokens, not {expected_tokens}",
        )
        stored_tokens = expected_tokens
        wait_for(
            lambda: (
                prometheus.values('sum(mlxserve_fleet_tokens_total{model="demo"})') == [stored_tokens]
                and prometheus.values('sum(kr_serve_tokens_generated_total{model="demo"})') == [stored_tokens]
            ),
            10,
            lambda: "token counts differ",
        )
        assert prometheus.values('sum(mlxserve_fleet_errors_total{code="ModelNotFound"})') == [1.0]
        assert prometheus.values("sum(mlxserve_fleet_workers)") == [1.0]
    finally:
        prometheus.stop()


def generation_done(generation_id: str) -> Any:
    def done() -> bool:
        detail = generation_detail(generation_id=uuid.UUID(generation_id))
        return detail is not None and detail.state in ("completed", "failed")

    return done


def wait_for(condition: Any, timeout: float, describe: Any) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, describe()
        time.sleep(1)


def _database_url() -> str:
    params = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{params['NAME']}"
    host, port = params.get("HOST") or "127.0.0.1", params.get("PORT") or 5432
    return f"postgres://{params.get('USER') or 'postgres'}@{host}:{port}/{params['NAME']}"


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def gunicorn_pids(master: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


@pytest.mark.django_db(transaction=True)
def test_metrics_add_up_across_gunicorn_processes_and_leave_no_stale_series(tmp_path: Path) -> None:
    port, multiproc = free_port(), tmp_path / "multiproc"
    env = {
        **os.environ,
        "DATABASE_URL": _database_url(),
        "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
        "REDIS_URL": "redis://127.0.0.1:6379/15",
    }
    log = tmp_path / "gunicorn.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            web_server_command(port, workers=3),
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: len(gunicorn_pids(server.pid)) == 3 and reachable(base), 60, log.read_text)
        key = ("django_http_responses_total_by_status_total", (("status", "401"),))
        before = scrape(f"{base}/metrics").get(key, 0.0)
        for _ in range(60):
            request(f"{base}/api/events/")  # anonymous: 401, counted by whichever process answers
        counts = {scrape(f"{base}/metrics").get(key) for _ in range(6)}
        assert counts == {before + 60}, "every scrape, whichever process answers it, sees all of them"

        # A worker dies (as under the OOM killer); gunicorn starts another. Its counts stay.
        victim = gunicorn_pids(server.pid)[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(
            lambda: victim not in gunicorn_pids(server.pid) and len(gunicorn_pids(server.pid)) == 3,
            30,
            log.read_text,
        )
        samples = scrape(f"{base}/metrics")
        assert samples.get(key) == before + 60
        assert not any("pid" in dict(labels) for _, labels in samples), "no per-process series"
        assert ("mlxserve_ingest_lag_seconds", ()) in samples
        assert any(name == "mlxserve_fleet_workers" for name, _ in samples)
        assert any(name == "django_db_execute_total" for name, _ in samples)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)


def reachable(base: str) -> bool:
    try:
        request(f"{base}/api/events/")
    except OSError:
        return False
    return True


def request(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
