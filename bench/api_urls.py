"""The project's URLs plus the baselines bench/api.py measures the API against:
``/bench/offset-events/``, the event list with offset pagination, and ``/bench/scan-stats/``,
the stats endpoint reading every event in its window instead of the hourly rollups."""

from typing import Any

from django.db.models import QuerySet
from django.urls import path
from drf_spectacular.utils import extend_schema
from rest_framework import generics
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.request import Request
from rest_framework.response import Response

from events.filters import EventFilter
from events.history import event_row, event_values
from events.models import Event
from events.responses import EventOut
from events.selectors import events_stats
from events.views import StatsQuery, StatsView
from mlxserve.urls import urlpatterns as project_urlpatterns
from mlxserve.web.api import CanRead
from mlxserve.web.openapi import struct_serializer


class ViewFilter(EventFilter):
    class Meta(EventFilter.Meta):
        model = Event  # type: ignore[assignment]


class OffsetEventList(generics.ListAPIView[Event]):
    """The event list as it would be with offset pages, over the view of both event tables."""

    permission_classes = [CanRead]
    serializer_class = struct_serializer(EventOut)
    pagination_class = LimitOffsetPagination
    filterset_class = ViewFilter

    def get_queryset(self) -> QuerySet[Event]:
        return Event.objects.all()

    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        rows = event_values(self.filter_queryset(self.get_queryset())).order_by("-timestamp", "-seq", "-id")
        page = self.paginate_queryset(rows) or []
        return self.get_paginated_response([event_row(e) for e in page])


@extend_schema(exclude=True)
class ScanStats(StatsView):
    def get(self, request: Request) -> Response:
        query = StatsQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        return Response(events_stats(**query.validated_data, use_rollups=False))


urlpatterns = [
    *project_urlpatterns,
    path("bench/offset-events/", OffsetEventList.as_view()),
    path("bench/scan-stats/", ScanStats.as_view()),
]
handler404 = "mlxserve.web.api.not_found"
