from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html

from events.models import DeadLetter, Event


def _pretty(value: Any) -> str:
    # format_html escapes: a token "<script>" shows as text, never runs.
    return format_html("<pre>{}</pre>", json.dumps(value, indent=2, ensure_ascii=False))


class ReadOnlyAdmin(admin.ModelAdmin):
    """Stored history is evidence: nobody edits or adds it by hand."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Event)
class EventAdmin(ReadOnlyAdmin):
    list_display = ["occurred", "type", "model", "source", "generation_id", "seq"]
    list_filter = ["type", "model", "source"]
    search_fields = ["=id", "=generation_id"]
    readonly_fields = [
        "id",
        "type",
        "occurred",
        "timestamp",
        "source",
        "generation_id",
        "seq",
        "model",
        "payload_pretty",
        "ingested_at",
    ]
    exclude = ["payload"]
    list_per_page = 100
    # No "x of N" count and no full-table COUNT(*) on every page load.
    show_full_result_count = False

    def get_queryset(self, request: HttpRequest) -> QuerySet[Event]:
        return super().get_queryset(request).defer("payload")

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="occurred (UTC)", ordering="timestamp")
    def occurred(self, obj: Event) -> str:
        return datetime.fromtimestamp(obj.timestamp / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]

    @admin.display(description="payload")
    def payload_pretty(self, obj: Event) -> str:
        return _pretty(Event.objects.values_list("payload", flat=True).get(pk=obj.pk))


@admin.register(DeadLetter)
class DeadLetterAdmin(ReadOnlyAdmin):
    list_display = ["received_at", "stream_id", "error_message"]
    readonly_fields = ["stream_id", "received_at", "body", "error_pretty"]
    exclude = ["error"]

    @admin.display(description="error")
    def error_message(self, obj: DeadLetter) -> str:
        return str(obj.error.get("message", ""))

    @admin.display(description="error")
    def error_pretty(self, obj: DeadLetter) -> str:
        return _pretty(obj.error)
