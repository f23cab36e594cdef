from __future__ import annotations

import itertools
import json
import time
from datetime import UTC, datetime
from html import escape
from typing import Any
from urllib.parse import urlencode

from django.contrib import admin
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.functional import cached_property
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from events.charts import latency_chart_svg, sparkline_svg
from events.dead_letters import dead_letters_replay
from events.history import StoredEvent, event_values, stored_event
from events.models import (
    DeadLetter,
    Event,
    Generation,
    PromptPolicy,
    RegisteredModel,
    RetentionPolicy,
    Worker,
)
from events.partitions import DAY_MS
from events.privacy import HASH_PREFIX, prompt_policy_get
from events.responses import EventOut
from events.selectors import (
    WorkerActivity,
    generation_read,
    heartbeat_interval_ms,
    worker_is_stale,
    workers_activity,
)
from mlxserve.web.admin import ReadOnlyAdmin, SingletonAdmin


def _pretty(value: Any) -> str:
    # format_html escapes: a token "<script>" shows as text, never runs.
    return format_html("<pre>{}</pre>", json.dumps(value, indent=2, ensure_ascii=False))


class ExactInputFilter(admin.SimpleListFilter):
    """A text box matching one indexed column exactly.

    Django's field filters list the distinct values of the column, a scan of the
    whole table at 10 million events; this one asks for the value instead.
    """

    template = "admin/events/input_filter.html"
    field_name = ""

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("", "")]  # Django shows a filter only when it has lookups

    def has_output(self) -> bool:
        return True

    def choices(self, changelist: Any) -> Any:
        self.current = self.value()
        self.kept_params = [
            (k, v)
            for k, values in changelist.get_filters_params().items()
            if k != self.parameter_name
            for v in (values if isinstance(values, list) else [values])
        ]
        self.clear_url = changelist.get_query_string(remove=[self.parameter_name])
        return [{"selected": bool(self.current)}]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        return queryset.filter(**{self.field_name: value}) if value else queryset


class ModelFilter(ExactInputFilter):
    title = "model"
    parameter_name = field_name = "model"


class SourceFilter(ExactInputFilter):
    title = "source"
    parameter_name = field_name = "source"


class CappedCountPaginator(Paginator):
    """Counts at most ``CAP`` rows: ``COUNT(*)`` over 10 million events takes seconds, a
    count of the first 10,000 a few milliseconds. Past the cap the list shows 100 pages;
    the filters and the time order reach the rest.

    Any ``CAP`` rows count the same as the newest ``CAP``: counted in no order, PostgreSQL
    stops at the cap wherever it finds them, instead of merging every time partition's index
    in time order (with a model filter at 30 million events: 3 ms against 35-50)."""

    CAP = 10_000

    @cached_property
    def count(self) -> int:
        return int(self.object_list.order_by()[: self.CAP].count())  # type: ignore[attr-defined]


# An event's page shows the API's fields (EventOut), its time also as a date, and the model before
# the payload (pretty-printed).
_EVENT_SHOWN_AS = {"timestamp": ("occurred", "timestamp"), "payload": ("model", "payload_pretty")}


@admin.register(Event)
class EventAdmin(ReadOnlyAdmin):
    list_display = ["occurred", "type", "model", "source", "generation_id", "seq"]
    # type has fixed choices (no query); model and source are typed in (no DISTINCT scan).
    list_filter = ["type", ModelFilter, SourceFilter]
    # Only the time order has an index to walk; other columns would sort the whole table.
    sortable_by = ["occurred"]
    search_fields = ["=id", "=generation_id"]
    readonly_fields = [
        shown for name in EventOut.__struct_fields__ for shown in _EVENT_SHOWN_AS.get(name, (name,))
    ]
    exclude = ["payload", "token", "logprob"]  # token and logprob: the view's, shown in the payload
    list_per_page = 100
    # No "x of N" count and no full-table COUNT(*) on every page load.
    show_full_result_count = False
    paginator = CappedCountPaginator
    # Facet counts would COUNT the whole table once per filter choice.
    show_facets = admin.ShowFacets.NEVER

    def get_queryset(self, request: HttpRequest) -> QuerySet[Event]:
        return super().get_queryset(request).defer("payload")

    @admin.display(description="occurred (UTC)", ordering="timestamp")
    def occurred(self, obj: Event) -> str:
        return datetime.fromtimestamp(obj.timestamp / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]

    def get_object(self, request: HttpRequest, object_id: str, from_field: str | None = None) -> Event | None:
        # Not .get(): a producer that reused an id with another timestamp has two events of it.
        try:
            ident = Event._meta.pk.to_python(object_id)  # type: ignore[union-attr]
        except ValidationError:
            return None
        return self.get_queryset(request).filter(pk=ident).order_by("-timestamp").first()

    @admin.display(description="payload")
    def payload_pretty(self, obj: Event) -> str:
        # As the API writes it (a token event's from its columns), so both show the same numbers.
        row = event_values(Event.objects.filter(pk=obj.pk, timestamp=obj.timestamp)).first()
        return _pretty(json.loads(bytes(stored_event(row).out.payload))) if row else ""


@admin.register(DeadLetter)
class DeadLetterAdmin(ReadOnlyAdmin):
    list_display = ["received_at", "stream_id", "error_message", "replayed_at"]
    list_filter = [("replayed_at", admin.EmptyFieldListFilter)]
    readonly_fields = ["stream_id", "received_at", "replayed_at", "body", "error_pretty"]
    exclude = ["error"]
    actions = ["replay"]

    def has_replay_permission(self, request: HttpRequest) -> bool:
        # Operators and admins (the change permission); viewers only look.
        return bool(request.user.has_perm("events.change_deadletter"))

    @admin.action(description="Replay: validate again and store the ones valid now", permissions=["replay"])
    def replay(self, request: HttpRequest, queryset: QuerySet[DeadLetter]) -> None:
        stored, invalid = dead_letters_replay(queryset)
        self.message_user(request, f"{stored} stored as events, {invalid} still invalid.")

    @admin.display(description="error")
    def error_message(self, obj: DeadLetter) -> str:
        return str(obj.error.get("message", ""))

    @admin.display(description="error")
    def error_pretty(self, obj: DeadLetter) -> str:
        return _pretty(obj.error)


@admin.register(RegisteredModel)
class RegisteredModelAdmin(admin.ModelAdmin):
    list_display = ["name", "path", "description", "created_at"]
    search_fields = ["name", "path"]


@admin.register(Generation)
class GenerationAdmin(ReadOnlyAdmin):
    """A generation as a person reads it: the figures first, the text with each token shaded
    by how unsure the model was of it, where it stalled (inter-token latency), and the raw
    events folded away below."""

    list_display = ["id", "created_at", "model", "max_tokens", "requested_by"]
    search_fields = ["=id", "model"]
    readonly_fields = [
        "summary",
        "prompt_shown",
        "text_shaded",
        "latency",
        "raw_events",
        "id",
        "model_path",
        "max_tokens",
        "options",
        "requested_by",
        "created_at",
    ]
    exclude = ["prompt"]

    class Media:
        css = {"all": ["events/admin.css"]}

    def _read(self, obj: Generation) -> Any:
        cache = getattr(obj, "_page", None)
        if cache is None:
            cache = obj._page = generation_read(generation_id=obj.id)  # type: ignore[attr-defined]
        return cache

    def _tokens(self, obj: Generation) -> list[Any]:
        read = self._read(obj)
        return read[1][-1].tokens if read and read[1] else []

    @admin.display(description="summary")
    def summary(self, obj: Generation) -> str:
        read = self._read(obj)
        if read is None:
            return "Queued: no worker has reported on it yet."
        detail = read[0]

        def figure(value: float | None, unit: str) -> str:
            return "-" if value is None else f"{value:,.1f} {unit}"

        rows = [
            ("state", detail.state),
            ("attempt", f"{detail.attempt} of {len(detail.attempts)}"),
            ("worker", detail.source or "-"),
            ("model", detail.model or "-"),
            ("tokens", f"{detail.tokens:,}"),
            ("time to first token", figure(detail.time_to_first_token_ms, "ms")),
            ("tokens/s", figure(detail.tokens_per_second, "")),
            ("duration", figure(detail.duration_ms, "ms")),
        ]
        if detail.error is not None:
            rows.append(("error", f"{detail.error.code or ''} {detail.error.message}".strip()))
        return format_html(
            '<table class="mlx-summary">{}</table>',
            format_html_join("", "<tr><th>{}</th><td>{}</td></tr>", rows),
        )

    @admin.display(description="prompt")
    def prompt_shown(self, obj: Generation) -> str:
        prompt = obj.prompt
        if isinstance(prompt, str) and prompt.startswith(HASH_PREFIX):
            return format_html(
                "<p><em>Not kept: the prompt policy stores a keyed hash of it</em> "
                "(equal prompts have equal hashes): <code>{}</code></p>",
                prompt,
            )
        if prompt == "":
            return mark_safe("<p><em>Not kept: the prompt policy drops prompts.</em></p>")
        return _pretty(prompt)

    @admin.display(description="text (each token shaded by how unsure the model was: hover for details)")
    def text_shaded(self, obj: Generation) -> str:
        tokens = self._tokens(obj)
        if not tokens:
            return "-"
        return format_html(
            '<div class="mlx-text">{}</div><p><small>Darker: a lower log-probability (the model was less '
            "sure of that token). Tokens without a log-probability are not shaded.</small></p>",
            mark_safe("".join(map(_token_span, tokens))),
        )

    @admin.display(description="inter-token latency")
    def latency(self, obj: Generation) -> str:
        tokens = self._tokens(obj)
        gaps = [float(b.out.timestamp - a.out.timestamp) for a, b in itertools.pairwise(tokens)]
        summary = ""
        if gaps:
            ordered = sorted(gaps)
            summary = (
                f"median {ordered[len(ordered) // 2]:.1f} ms, slowest {ordered[-1]:.1f} ms "
                f"(token {gaps.index(ordered[-1]) + 2})"
            )
        return format_html(
            "{}<p><small>{}</small></p>",
            latency_chart_svg(gaps, label=f"Inter-token latency, ms: {summary or 'none'}"),
            summary,
        )

    @admin.display(description="raw events")
    def raw_events(self, obj: Generation) -> str:
        read = self._read(obj)
        if read is None:
            return "-"
        events = [e for attempt in read[1] for e in attempt.events]
        # Written out (escaped with the standard library's html.escape, as Django's escape is):
        # format_html a cell took most of a 514-event page's time.
        rows = mark_safe(
            "".join(
                f"<tr><td>{_time_of_day(e.out.timestamp)}</td><td>{escape(e.out.type)}</td><td>{e.out.seq}</td>"
                f"<td>{escape(e.out.source)}</td><td><code>{escape(bytes(e.out.payload).decode()[:300])}</code></td></tr>"
                for e in events
            )
        )
        return format_html(
            "<details><summary>{} events, as stored</summary>"
            "<table><tr><th>time (UTC)</th><th>type</th><th>seq</th><th>source</th><th>payload</th></tr>{}"
            "</table></details>",
            len(events),
            rows,
        )


def _time_of_day(timestamp: int) -> str:
    """A timestamp's time of day in UTC, to the millisecond (``HH:MM:SS.mmm``)."""
    seconds, ms = divmod(timestamp % DAY_MS, 1000)
    minutes, second = divmod(seconds, 60)
    return f"{minutes // 60:02d}:{minutes % 60:02d}:{second:02d}.{ms:03d}"


def _token_span(event: StoredEvent) -> str:
    """One token, shaded by its log-probability (0: sure; -5 and below: darkest); its HTML,
    every value escaped."""
    logprob = event.payload.get("logprob")
    when = _time_of_day(event.out.timestamp)
    token, seq = event.payload.get("token"), event.out.seq
    if isinstance(logprob, int | float):
        alpha = min(max(-float(logprob), 0.0) / 5.0, 1.0) * 0.75
        title = f"token {token!r} · logprob {float(logprob):.3f} · seq {seq} · {when}"
        style = f"background: rgba(186, 33, 33, {alpha:.2f})"
    else:
        title, style = f"token {token!r} · seq {seq} · {when}", ""
    shown = "" if logprob is None else escape(str(logprob))
    return (
        f'<span class="mlx-tok" style="{style}" title="{escape(title)}" data-logprob="{shown}">'
        f"{escape(str(event.payload.get('token', '')))}</span>"
    )


@admin.register(RetentionPolicy)
class RetentionPolicyAdmin(admin.ModelAdmin):
    list_display = ["event_type", "keep_days"]


@admin.register(Worker)
class WorkerAdmin(ReadOnlyAdmin):
    """The fleet, a worker a row: status, a warning when it has gone quiet, its pace over the
    last hour (a bar a minute), its errors and its last one, and a link to its events."""

    list_display = [
        "source",
        "status",
        "stale_warning",
        "last_heard",
        "tokens_per_second",
        "last_hour",
        "errors_last_hour",
        "last_error_shown",
        "events_link",
    ]
    list_filter = ["status"]
    search_fields = ["source"]
    list_per_page = 50

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # A retired Mac can be forgotten by hand (it comes back if it is heard from again).
        return bool(request.user.has_perm("events.delete_worker"))

    class Media:
        css = {"all": ["events/admin.css"]}

    def get_changelist_instance(self, request: HttpRequest) -> Any:
        changelist = super().get_changelist_instance(request)
        workers = list(changelist.result_list)
        activity = workers_activity([w.source for w in workers])  # one read for the page
        interval_ms, now_ms = heartbeat_interval_ms(), time.time_ns() // 1_000_000
        for worker in workers:
            worker.activity = activity[worker.source]
            worker.stale = worker_is_stale(worker, interval_ms=interval_ms, now_ms=now_ms)
        return changelist

    @admin.display(description="last heard (UTC)", ordering="last_heard_at")
    def last_heard(self, obj: Worker) -> str:
        if not obj.last_heard_at:
            return "-"
        return datetime.fromtimestamp(obj.last_heard_at / 1000, tz=UTC).strftime("%m-%d %H:%M:%S")

    @admin.display(description="stale")
    def stale_warning(self, obj: Worker) -> str:
        stale = getattr(obj, "stale", None)
        if stale is None:
            stale = worker_is_stale(obj)
        if not stale:
            return ""
        return format_html('<span class="mlx-warn" title="{}">&#9888; stale</span>', _silent_for(obj))

    @admin.display(description="tokens/s")
    def tokens_per_second(self, obj: Worker) -> str:
        return f"{_activity(obj).tokens_per_second_last_minute:.1f}"

    @admin.display(description="last hour")
    def last_hour(self, obj: Worker) -> str:
        activity = _activity(obj)
        label = (
            f"{obj.source}: {sum(activity.per_minute):,} tokens in the last hour "
            f"({activity.tokens_per_second_last_hour:.1f}/s), busiest minute {max(activity.per_minute):,}"
        )
        return sparkline_svg(activity.per_minute, label=label, width=90)

    @admin.display(description="errors (hour)")
    def errors_last_hour(self, obj: Worker) -> int:
        return _activity(obj).errors_last_hour

    @admin.display(description="last error")
    def last_error_shown(self, obj: Worker) -> str:
        if not obj.last_error_at:
            return ""
        when = datetime.fromtimestamp(obj.last_error_at / 1000, tz=UTC).strftime("%m-%d %H:%M")
        return format_html(
            '<span title="{}">{}</span> <small>{}</small>', obj.last_error, obj.last_error[:80], when
        )

    @admin.display(description="events")
    def events_link(self, obj: Worker) -> str:
        url = reverse("admin:events_event_changelist") + "?" + urlencode({"source": obj.source})
        return format_html('<a href="{}">events</a>', url)


def _activity(worker: Worker) -> WorkerActivity:
    activity = getattr(worker, "activity", None)
    if activity is None:  # shown outside the list (the change page)
        activity = workers_activity([worker.source])[worker.source]
        worker.activity = activity  # type: ignore[attr-defined]
    return activity


def _silent_for(worker: Worker) -> str:
    seconds = max(time.time_ns() // 1_000_000 - worker.last_heard_at, 0) // 1000
    if not worker.last_heard_at:
        return "never heard from"
    return f"silent for {seconds // 3600}h {seconds % 3600 // 60}m {seconds % 60}s"


@admin.register(PromptPolicy)
class PromptPolicyAdmin(SingletonAdmin):
    """One policy (how prompts are kept at rest); applied by the ingester from its next batch."""

    def singleton(self) -> PromptPolicy:
        return prompt_policy_get()
