from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import generics
from rest_framework.exceptions import NotFound
from rest_framework.pagination import PageNumberPagination
from rest_framework.request import Request
from rest_framework.response import Response

from mlxserve.contract.validation import Issue, ValidationFailed
from mlxserve.web.api import ReadOrStaffWrite
from mlxserve.web.openapi import ERROR_RESPONSES, WRITE_ERROR_RESPONSES
from telemetry.models import TelemetryConfig, TelemetryConfigChange
from telemetry.serializers import TelemetryConfigChangeSerializer, TelemetryConfigSerializer
from telemetry.services import (
    ConfigSaved,
    telemetry_config_get,
    telemetry_config_patch,
    telemetry_config_replace,
)


class HistoryPagination(PageNumberPagination):
    page_size = 50

    def paginate_queryset(self, queryset: Any, request: Request, view: Any = None) -> Any:
        # DRF answers a bad or past-the-end page with 404; it is a bad parameter: 400.
        try:
            return super().paginate_queryset(queryset, request, view)
        except NotFound as exc:
            raise ValidationFailed([Issue(["page"], str(exc.detail), "invalid_page")]) from None


class TelemetryConfigView(generics.GenericAPIView):  # type: ignore[type-arg]
    """The fleet's telemetry config. Staff change it; workers apply it live."""

    permission_classes = [ReadOrStaffWrite]
    serializer_class = TelemetryConfigSerializer

    def get_object(self) -> TelemetryConfig:  # the one row (OPTIONS asks for it too)
        return telemetry_config_get()

    @extend_schema(responses={200: TelemetryConfigSerializer, **ERROR_RESPONSES})
    def get(self, request: Request) -> Response:
        return Response(TelemetryConfigSerializer(self.get_object()).data)

    @extend_schema(
        request=TelemetryConfigSerializer, responses={200: TelemetryConfigSerializer, **WRITE_ERROR_RESPONSES}
    )
    def put(self, request: Request) -> Response:
        return self._answer(telemetry_config_replace(data=request.data, user=request.user, via="api"))

    @extend_schema(
        # PATCH: the same fields, none of them required.
        request=TelemetryConfigSerializer(partial=True),
        responses={200: TelemetryConfigSerializer, **WRITE_ERROR_RESPONSES},
    )
    def patch(self, request: Request) -> Response:
        return self._answer(telemetry_config_patch(data=request.data, user=request.user, via="api"))

    @staticmethod
    def _answer(saved: ConfigSaved) -> Response:
        return Response(TelemetryConfigSerializer(saved.config).data)


@extend_schema(responses={200: TelemetryConfigChangeSerializer(many=True), **ERROR_RESPONSES})
class TelemetryConfigHistoryView(generics.ListAPIView[TelemetryConfigChange]):
    """Every change to the config, newest first: who, when, through what, old and new values."""

    serializer_class = TelemetryConfigChangeSerializer
    queryset = TelemetryConfigChange.objects.order_by("-version")
    filter_backends: list[type] = []
    pagination_class = HistoryPagination
