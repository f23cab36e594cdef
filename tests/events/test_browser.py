"""The admin in a real browser: headless Chromium (Debian's) driven by Playwright.

Screenshots of each step are kept under ``test-artifacts/browser/``.
"""

from __future__ import annotations

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
        shot(page, "03-config-saved")

        page.goto(f"{live_server.url}/admin/events/event/")
        expect(page.locator("#result_list tbody tr")).to_have_count(3)
        page.fill("input[name=source]", events[0]["source"])
        page.press("input[name=source]", "Enter")
        expect(page.locator("#result_list tbody tr")).to_have_count(3)
        shot(page, "04-event-list")

        page.goto(f"{live_server.url}/admin/events/generation/{gid}/change/")
        expect(page.locator("body")).to_contain_text("State: completed")
        expect(page.locator("body")).to_contain_text("<script>alert(1)</script>")  # shown as text
        shot(page, "05-generation-page")
        browser.close()

    assert dialogs == [], "a token's <script> must never run"
    config = TelemetryConfig.objects.get(pk=1)
    assert (config.prometheus_port, config.service_name) == (9500, "fleet-from-chromium")
