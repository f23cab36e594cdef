"""The project's URLs plus ``/bench/offset-events/``: the event list with offset pagination,
the baseline bench/api.py measures the cursor-paginated list against."""

from django.urls import path
from rest_framework.pagination import LimitOffsetPagination

from events.views import EventListCreateView
from mlxserve.urls import urlpatterns as project_urlpatterns


class OffsetEventList(EventListCreateView):
    pagination_class = LimitOffsetPagination  # type: ignore[assignment]
    http_method_names = ["get"]


urlpatterns = [*project_urlpatterns, path("bench/offset-events/", OffsetEventList.as_view())]
handler404 = "mlxserve.api.not_found"
