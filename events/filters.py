from __future__ import annotations

from typing import Any

import django_filters
from django import forms
from django.db.models import QuerySet

from events.models import MODEL_COLUMN_LENGTH, EventRecord
from mlxserve.contract.events import EVENT_TYPES
from mlxserve.contract.validation import INT64_MAX


class EpochMsFilter(django_filters.NumberFilter):
    field_class = forms.IntegerField

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Out of the column's range is a bad parameter (400), never a query that fails.
        kwargs.setdefault("min_value", 0)
        kwargs.setdefault("max_value", INT64_MAX)
        super().__init__(*args, **kwargs)


class EventFilter(django_filters.FilterSet):
    """The event filters; each runs on an indexed column and they combine."""

    type = django_filters.ChoiceFilter(choices=[(t, t) for t in EVENT_TYPES])
    model = django_filters.CharFilter(method="filter_model")
    source = django_filters.CharFilter()
    generationId = django_filters.UUIDFilter(field_name="generation_id")
    since = EpochMsFilter(field_name="timestamp", lookup_expr="gte", help_text="epoch ms, inclusive")
    until = EpochMsFilter(field_name="timestamp", lookup_expr="lte", help_text="epoch ms, inclusive")

    class Meta:
        model = EventRecord
        fields = ["type", "model", "source", "generationId", "since", "until"]

    def filter_model(self, queryset: QuerySet[EventRecord], name: str, value: str) -> QuerySet[EventRecord]:
        # The column holds the first 200 characters of the name (see Event.model).
        return queryset.filter(model=value[:MODEL_COLUMN_LENGTH])
