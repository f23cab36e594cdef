"""The admin in a real browser: headless Chromium (Debian's) driven by Playwright.

Screenshots of each step are kept under ``test-artifacts/browser/``.
"""

from __future__ import annotations

import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest
from django.conf import settings as django_settings
from django.contrib.auth.models import User
from playwright.sync_api import Dialog, Page, expect, sync_playwright

from events.models import Generation
from events.storage import events_store
from telemetry.models import TelemetryConfig
from tests.factories import make_envelope

pytestmark = pytest.mark.django_db(transaction=True)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(django_settings.BASE_DIR) / "test-artifacts" / "browser"
# Chromium on a closed network: no background calls home, no sandbox (root in CI).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def on_dialog(seen: list[str], dialog: Dialog) -> None:
    seen.append(dialog.message)
    dialog.dismiss()


def shot(page: Page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_an_admin_edits_the_config_and_browses_history_in_chromium(live_server: Any) -> None:
    assert Path(CHROMIUM).exists(), "Debian's chromium is needed: apt-get install chromium (.ci/run does)"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    User.objects.create_user("ada", password="ada-pass-123", is_staff=True, is_superuser=True)
    gid = uuid.uuid4()
    Generation.objects.create(id=gid, model="demo", prompt="hi", max_tokens=3)
    events = [
        make_envelope("generationStarted", generationId=str(gid), seq=0, timestamp=1_764_115_200_000),
        make_envelope(
            "tokenGenerated",
            generationId=str(gid),
            seq=1,
            timestamp=1_764_115_200_050,
            payload={"model": "demo", "token": "<script>alert(1)</script>"},
        ),
        make_envelope("generationCompleted", generationId=str(gid), seq=2, timestamp=1_764_115_200_090),
    ]
    events_store([(f"{i}-0", msgspec.json.encode(e)) for i, e in enumerate(events)])

    dialogs: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.on("dialog", lambda dialog: on_dialog(dialogs, dialog))

        page.goto(f"{live_server.url}/admin/login/")
        page.fill("#id_username", "ada")
        page.fill("#id_password", "ada-pass-123")
        page.click("input[type=submit]")
        expect(page.locator("#site-name")).to_be_visible()
        shot(page, "01-logged-in")

        page.goto(f"{live_server.url}/admin/telemetry/telemetryconfig/")  # leads to the one config
        page.fill("#id_prometheus_port", "80")
        page.click("input[name=_save]")
        expect(page.locator(".errorlist")).to_contain_text("Port must be at least 1024 (non-privileged)")
        shot(page, "02-port-80-refused")

        page.fill("#id_prometheus_port", "9500")
        page.fill("#id_service_name", "fleet-from-chromium")
        page.click("input[name=_save]")
        expect(page.locator(".messagelist")).to_contain_text("Telemetry config saved")
        # Each field says what it does and its range; the rollout of the new version follows.
        expect(page.locator(".field-prometheus_port .help")).to_contain_text("From 1024 to 65535")
        expect(page.locator(".field-export_interval_ms .help")).to_contain_text("a worker silent for three")
        expect(page.locator("#config-rollout")).to_contain_text("Rollout of version")
        shot(page, "03-config-saved")

        page.goto(f"{live_server.url}/admin/events/event/")
        expect(page.locator("#result_list tbody tr")).to_have_count(3)
        page.fill("input[name=source]", events[0]["source"])
        page.press("input[name=source]", "Enter")
        expect(page.locator("#result_list tbody tr")).to_have_count(3)
        shot(page, "04-event-list")

        page.goto(f"{live_server.url}/admin/events/generation/{gid}/change/")
        expect(page.locator(".mlx-summary")).to_contain_text("completed")
        expect(page.locator(".mlx-text")).to_contain_text("<script>alert(1)</script>")  # shown as text
        shot(page, "05-generation-page")
        browser.close()

    assert dialogs == [], "a token's <script> must never run"
    config = TelemetryConfig.objects.get(pk=1)
    assert (config.prometheus_port, config.service_name) == (9500, "fleet-from-chromium")


def test_a_person_reads_the_fleet_and_a_generation_without_json_in_chromium(live_server: Any) -> None:
    """Is the fleet healthy; what did this generation do, and where was the model unsure."""
    import time

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    User.objects.create_user("ada", password="ada-pass-123", is_staff=True, is_superuser=True)
    now = time.time_ns() // 1_000_000
    minute = now - now % 60_000
    gid = uuid.uuid4()
    Generation.objects.create(id=gid, model="demo", prompt="hmac-sha256:" + "ab" * 32, max_tokens=5)
    source = "mac-studio-2/worker-1"
    logprobs = [-0.01, -0.2, -4.5, -0.05, -1.0]
    gaps = [0, 20, 22, 180, 21]  # token 4 stalled
    events = [
        make_envelope(
            "generationStarted",
            source=source,
            generationId=str(gid),
            seq=0,
            timestamp=minute - 60_000,
            payload={"model": "demo", "prompt": "hmac-sha256:" + "ab" * 32},
        )
    ]
    t = minute - 60_000 + 40
    for i, (logprob, gap) in enumerate(zip(logprobs, gaps, strict=True)):
        t += gap
        events.append(
            make_envelope(
                "tokenGenerated",
                source=source,
                generationId=str(gid),
                seq=i + 1,
                timestamp=t,
                payload={
                    "model": "demo",
                    "token": [" The", " cat", " sat", " on", " mats"][i],
                    "logprob": logprob,
                },
            )
        )
    events.append(
        make_envelope(
            "generationCompleted",
            source=source,
            generationId=str(gid),
            seq=6,
            timestamp=t + 5,
            payload={"model": "demo", "tokensGenerated": 5, "durationMs": 300.0, "throughput": 16.5},
        )
    )
    events.append(
        make_envelope(
            "runtimeStatus", source="mac-mini-9/worker-1", timestamp=now - 7_200_000, generationId=None
        )
    )
    events_store([(f"{i}-0", msgspec.json.encode(e)) for i, e in enumerate(events)])

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"{live_server.url}/admin/login/")
        page.fill("#id_username", "ada")
        page.fill("#id_password", "ada-pass-123")
        page.click("input[type=submit]")

        # The index: the fleet first.
        panel = page.locator("#fleet-overview")
        expect(panel).to_contain_text("2 workers: 1 no status yet, 1 ready")
        expect(panel).to_contain_text("1 stale")
        expect(panel).to_contain_text("mac-mini-9/worker-1")
        expect(page.locator("#site-name")).to_contain_text("mlxserve · ")
        shot(page, "10-fleet-index")

        # Workers: the stale one warned of, the healthy one not; a sparkline each.
        page.goto(f"{live_server.url}/admin/events/worker/")
        stale_row = page.locator("#result_list tr", has_text="mac-mini-9/worker-1")
        healthy_row = page.locator("#result_list tr", has_text=source)
        expect(stale_row.locator(".mlx-warn")).to_have_text("⚠ stale")
        expect(healthy_row.locator(".mlx-warn")).to_have_count(0)
        expect(healthy_row.locator("svg.mlx-spark rect")).to_have_count(1)  # its one busy minute
        expect(healthy_row.locator("svg.mlx-spark title")).to_contain_text("5 tokens in the last hour")
        shot(page, "11-workers")

        # The generation: figures, the shaded text, the stall, the prompt policy, raw events folded.
        page.goto(f"{live_server.url}/admin/events/generation/{gid}/change/")
        summary = page.locator(".mlx-summary")
        expect(summary).to_contain_text("completed")
        expect(summary).to_contain_text("16.5")
        expect(page.locator(".mlx-text")).to_have_text(" The cat sat on mats")
        unsure = page.locator(".mlx-tok", has_text="sat")
        expect(unsure).to_have_attribute("title", re.compile(r"logprob -4\.500 · seq 3"))
        sure_bg = page.locator(".mlx-tok", has_text="The").evaluate(
            "e => getComputedStyle(e).backgroundColor"
        )
        unsure_bg = unsure.evaluate("e => getComputedStyle(e).backgroundColor")
        assert alpha(unsure_bg) > alpha(sure_bg) + 0.5  # the unsure token stands out
        expect(page.locator("svg.mlx-latency circle.mlx-worst title")).to_have_text(
            "slowest: token 4, 180.0 ms"
        )
        expect(page.locator("body")).to_contain_text("Not kept: the prompt policy stores a keyed hash")
        raw = page.locator("details", has_text="events, as stored")
        expect(raw.locator("table")).not_to_be_visible()  # folded
        shot(page, "12-generation")
        raw.locator("summary").click()
        expect(raw.locator("table")).to_be_visible()
        shot(page, "13-generation-raw-events")
        browser.close()


def alpha(css_color: str) -> float:
    """The alpha of a computed ``rgb(...)``/``rgba(...)`` colour (0 for transparent)."""
    parts = css_color.removeprefix("rgba(").removeprefix("rgb(").rstrip(")").split(",")
    return float(parts[3]) if len(parts) == 4 else (0.0 if css_color == "rgba(0, 0, 0, 0)" else 1.0)
