"""The project's URLs plus the baselines bench/api.py measures the API against:
``/bench/offset-events/``, the event list with offset pagination, and ``/bench/scan-stats/``,
the stats endpoint reading every event in its window instead of the hourly rollups."""

from django.urls import path
from drf_spectacular.utils import extend_schema
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.request import Request
from rest_framework.response import Response

from events.selectors import events_stats
from events.views import EventListCreateView, StatsQuery, StatsView
from mlxserve.urls import urlpatterns as project_urlpatterns


class OffsetEventList(EventListCreateView):
    pagination_class = LimitOffsetPagination  # type: ignore[assignment]
    http_method_names = ["get"]


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
handler404 = "mlxserve.api.not_found"
