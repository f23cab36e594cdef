"""The admin at scale and by role: the event list, the fleet overview, the prompt policy."""

from __future__ import annotations

import html
import json
import re
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from events.models import PromptPolicy, Worker
from events.storage import events_store
from mlxserve.web.roles import ADMIN_GROUP
from tests.factories import T0, make_envelope, role_user

pytestmark = pytest.mark.django_db

EVENTS_URL = "/admin/events/event/"


def browser(username: str, group: str) -> Client:
    role_user(username, group, is_staff=True)
    client = Client()
    assert client.login(username=username, password=f"{username}-pass-123")
    return client


def store(envelopes: list[dict[str, Any]]) -> None:
    events_store([(f"{i}-0", msgspec.json.encode(e)) for i, e in enumerate(envelopes)])


def action_names(client: Client, url: str) -> list[str]:
    form = client.get(url).context["action_form"]
    return [] if form is None else [name for name, _ in form.fields["action"].choices]


def test_the_event_list_filters_on_indexed_columns_without_scanning_for_choices() -> None:
    store(
        [make_envelope("tokenGenerated", source=f"host-{i % 3}", timestamp=T0 + 1_000 + i) for i in range(30)]
        + [make_envelope("error", source="host-9", timestamp=T0 + 5_000)]
    )
    client = browser("boss", ADMIN_GROUP)
    with CaptureQueriesContext(connection) as queries:
        page = client.get(EVENTS_URL, {"source": "host-1", "type__exact": "tokenGenerated"})
    assert page.status_code == 200
    assert len(page.context["cl"].result_list) == 10
    sql = " ".join(q["sql"] for q in queries.captured_queries).upper()
    assert "DISTINCT" not in sql
    assert '"PAYLOAD"' not in sql, "the payload is deferred in the list"
    text = page.content.decode()
    assert 'name="source" value="host-1"' in text
    assert "host-9" not in text


def test_each_row_of_the_event_list_links_to_its_events_page_keeping_the_filters() -> None:
    events = [make_envelope("tokenGenerated", source="host/w", timestamp=T0 + 1_000 + i) for i in range(3)]
    store(events)
    client = browser("boss", ADMIN_GROUP)
    page = client.get(EVENTS_URL, {"source": "host/w"}).content.decode()
    links = re.findall(r'<th class="field-occurred"><a href="([^"]+)"', page)
    assert links == [
        f"{EVENTS_URL}{e['id']}/change/?_changelist_filters=source%3Dhost%252Fw" for e in reversed(events)
    ]
    shown = client.get(html.unescape(links[0]))
    assert shown.status_code == 200 and events[-1]["id"] in shown.content.decode()


def test_the_event_list_never_counts_past_the_cap(settings: Any) -> None:
    from events.admin import CappedCountPaginator

    store([make_envelope("tokenGenerated", timestamp=T0 + 1_000 + i) for i in range(120)])
    CappedCountPaginator.CAP, cap = 105, CappedCountPaginator.CAP
    try:
        with CaptureQueriesContext(connection) as queries:
            page = browser("boss", ADMIN_GROUP).get(EVENTS_URL, {"model": "llama-3-8b"})
    finally:
        CappedCountPaginator.CAP = cap
    assert page.context["cl"].result_count == 105
    assert page.context["cl"].full_result_count is None
    assert len(page.context["cl"].result_list) == 100
    [count] = [q["sql"] for q in queries.captured_queries if "COUNT(" in q["sql"].upper()]
    assert "ORDER BY" not in count.upper(), "the capped count is taken in no order"


def test_the_event_list_sorts_only_by_time() -> None:
    page = browser("boss", ADMIN_GROUP).get(EVENTS_URL)
    assert page.context["cl"].sortable_by == ["occurred"]


@pytest.mark.parametrize("event_type", ["generationStarted", "tokenGenerated"])
def test_an_events_page_shows_every_field_the_api_shows_with_the_same_values(
    event_type: str, reader_client: Any
) -> None:
    envelope = make_envelope(event_type)
    store([envelope])
    shown = reader_client.get(f"/api/events/{envelope['id']}/").json()
    page = browser("boss", ADMIN_GROUP).get(f"{EVENTS_URL}{envelope['id']}/change/")
    fields = {
        field.field["name"]: str(field.contents())
        for fieldset in page.context["adminform"]
        for line in fieldset
        for field in line
    }
    for name, value in shown.items():
        snake = re.sub(r"[A-Z]", lambda m: f"_{m.group().lower()}", name)
        if name == "payload":
            assert json.loads(html.unescape(re.sub(r"</?pre>", "", fields["payload_pretty"]))) == value
        elif name == "ingestedAt":
            assert fields[snake]  # the admin's own date format
        else:
            assert fields[snake] == str(value), name


def test_a_payload_is_shown_pretty_and_escaped() -> None:
    nasty = make_envelope("tokenGenerated", payload={"model": "m", "token": "<script>alert(1)</script>"})
    store([nasty])
    page = browser("boss", ADMIN_GROUP).get(f"{EVENTS_URL}{nasty['id']}/change/").content.decode()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script>alert(1)</script>" not in page
    assert "<pre>{\n  &quot;model&quot;: &quot;m&quot;," in page


def test_the_fleet_overview_shows_status_staleness_and_pace() -> None:
    now = time.time_ns() // 1_000_000
    Worker.objects.create(source="mac-1/w1", status="busy", last_heard_at=now)
    Worker.objects.create(source="mac-2/w1", status="ready", last_heard_at=now - 3_600_000)
    store(
        [make_envelope("tokenGenerated", source="mac-1/w1", timestamp=now - 1000, seq=i) for i in range(120)]
    )
    page = browser("boss", ADMIN_GROUP).get("/admin/events/worker/")
    rows = {row.source: row for row in page.context["cl"].result_list}
    admin_ = page.context["cl"].model_admin
    assert admin_.tokens_per_second(rows["mac-1/w1"]) == "2.0"  # 120 tokens in the last minute
    assert admin_.stale_warning(rows["mac-1/w1"]) == ""
    assert "stale" in admin_.stale_warning(rows["mac-2/w1"])
    text = page.content.decode()
    assert "tokens/s" in text.lower() and "mac-2/w1" in text


def test_admins_may_replay_dead_letters_and_other_staff_may_not() -> None:
    assert "replay" in action_names(browser("boss", ADMIN_GROUP), "/admin/events/deadletter/")
    User.objects.create_user("helper", password="helper-pass-123", is_staff=True)
    helper = Client()
    assert helper.login(username="helper", password="helper-pass-123")
    assert helper.get("/admin/events/deadletter/").status_code == 403  # staff without permissions


def test_the_prompt_policy_is_one_row_an_admin_edits() -> None:
    admin_browser = browser("chief", ADMIN_GROUP)
    listing = admin_browser.get("/admin/events/promptpolicy/")
    assert listing.status_code == 302 and listing["Location"].endswith("/promptpolicy/1/change/")
    response = admin_browser.post(
        "/admin/events/promptpolicy/1/change/", {"mode": "truncate", "truncate_chars": "40"}
    )
    assert response.status_code == 302
    assert PromptPolicy.objects.get(pk=1).mode == "truncate"
    User.objects.create_user("helper", password="helper-pass-123", is_staff=True)
    helper = Client()
    assert helper.login(username="helper", password="helper-pass-123")
    refused = helper.post("/admin/events/promptpolicy/1/change/", {"mode": "keep", "truncate_chars": "40"})
    assert refused.status_code == 403  # staff without the admin group's permissions
    assert PromptPolicy.objects.get(pk=1).mode == "truncate"


ADMIN_LISTS = [
    "/admin/events/event/",
    "/admin/events/deadletter/",
    "/admin/events/generation/",
    "/admin/events/worker/",
    "/admin/telemetry/telemetryconfigchange/",
]


@pytest.mark.parametrize("path", ADMIN_LISTS)
@pytest.mark.parametrize(
    "query",
    [
        {"q": "a\x00b"},
        {"q": "not-a-uuid " + "x" * 3000},
        {"source": "a\x00b"},
        {"model": "\x00"},
        {"type__exact": "nope"},
        {"p": "9" * 30},
        {"o": "99"},
        {"timestamp__gte": "abc"},
        {"replayed_at__isempty": "maybe"},
        {"status__exact": "\x00"},
    ],
    ids=lambda q: next(iter(q)),
)
def test_hostile_admin_list_parameters_never_500(path: str, query: dict[str, str]) -> None:
    client = browser("boss", ADMIN_GROUP)
    response = client.get(path, query)
    assert response.status_code < 500


def test_stored_history_leaves_only_by_retention_even_for_a_superuser() -> None:
    from events.models import Event, Generation

    store([make_envelope("tokenGenerated", timestamp=T0 + 1_000)])
    event = Event.objects.get()
    generation = Generation.objects.create(id=uuid.uuid4(), model="m", prompt="p", max_tokens=4)
    User.objects.create_superuser("root", password="root-pass-123")
    client = Client()
    assert client.login(username="root", password="root-pass-123")
    for url, pk in [(EVENTS_URL, event.pk), ("/admin/events/generation/", generation.pk)]:
        assert "delete_selected" not in action_names(client, url)
        assert client.get(f"{url}{pk}/delete/").status_code == 403
        assert client.post(f"{url}{pk}/delete/", {"post": "yes"}).status_code == 403
        assert "deletelink" not in client.get(f"{url}{pk}/change/").content.decode()
    assert Event.objects.count() == 1
    assert Generation.objects.count() == 1


def test_a_generations_page_writes_every_token_and_raw_event_escaped_at_its_utc_time() -> None:
    from events.models import Generation

    gid = str(uuid.uuid4())
    Generation.objects.create(id=gid, model="m", prompt="p", max_tokens=2)
    started_at = T0 // 86_400_000 * 86_400_000 - 1  # the day's last millisecond, before the tokens' day
    tokens = ['<b a="x">&\'', "plain"]
    store(
        [
            make_envelope("generationStarted", generationId=gid, seq=0, timestamp=started_at),
            *(
                make_envelope(
                    "tokenGenerated",
                    generationId=gid,
                    seq=seq,
                    timestamp=T0 + seq * 1_234,
                    payload={"model": "m", "token": token, **({"logprob": -0.5} if seq == 1 else {})},
                )
                for seq, token in enumerate(tokens, start=1)
            ),
        ]
    )
    page = browser("boss", ADMIN_GROUP).get(f"/admin/events/generation/{gid}/change/").content.decode()

    def at(ms: int) -> str:
        return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%H:%M:%S.%f")[:-3]

    first_title = html.escape(f"token {tokens[0]!r} · logprob -0.500 · seq 1 · {at(T0 + 1_234)}")
    assert (
        f'<span class="mlx-tok" style="background: rgba(186, 33, 33, 0.08)" title="{first_title}" '
        f'data-logprob="-0.5">{html.escape(tokens[0])}</span>'
    ) in page
    assert (
        f'<span class="mlx-tok" style="" title="token &#x27;plain&#x27; · seq 2 · {at(T0 + 2_468)}" '
        'data-logprob="">plain</span>'
    ) in page
    assert at(started_at) == "23:59:59.999"
    assert f"<tr><td>{at(started_at)}</td><td>generationStarted</td><td>0</td>" in page
    assert f"<tr><td>{at(T0 + 1_234)}</td><td>tokenGenerated</td><td>1</td>" in page
    assert html.escape(json.dumps(tokens[0])) in page  # in the raw event's payload
    assert "<b a=" not in page
