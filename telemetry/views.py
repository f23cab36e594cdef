from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import generics
from rest_framework.exceptions import NotFound
from rest_framework.pagination import PageNumberPagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from mlxserve.api import ReadOrStaffWrite
from mlxserve.contract.telemetry import TelemetryConfigSchema
from mlxserve.contract.validation import Issue, ValidationFailed
from mlxserve.openapi import ERROR_RESPONSES, WRITE_ERROR_RESPONSES, json_request, struct_schema
from telemetry.models import TelemetryConfigChange
from telemetry.serializers import TelemetryConfigChangeSerializer
from telemetry.services import (
    telemetry_config_get,
    telemetry_config_patch,
    telemetry_config_replace,
)

CONFIG_SCHEMA = struct_schema(TelemetryConfigSchema)


class HistoryPagination(PageNumberPagination):
    page_size = 50

    def paginate_queryset(self, queryset: Any, request: Request, view: Any = None) -> Any:
        # DRF answers a bad or past-the-end page with 404; it is a bad parameter: 400.
        try:
            return super().paginate_queryset(queryset, request, view)
        except NotFound as exc:
            raise ValidationFailed([Issue(["page"], str(exc.detail), "invalid_page")]) from None


class TelemetryConfigView(APIView):
    """The fleet's telemetry config . Staff change it; workers apply it live."""

    permission_classes = [ReadOrStaffWrite]

    @extend_schema(responses={200: CONFIG_SCHEMA, **ERROR_RESPONSES})
    def get(self, request: Request) -> Response:
        return Response(telemetry_config_get().to_schema().to_wire())

    @extend_schema(
        request=json_request(CONFIG_SCHEMA), responses={200: CONFIG_SCHEMA, **WRITE_ERROR_RESPONSES}
    )
    def put(self, request: Request) -> Response:
        saved = telemetry_config_replace(data=request.data, user=request.user, via="api")
        return Response(saved.config.to_schema().to_wire())

    @extend_schema(
        # PATCH: the same fields, none of them required.
        request=json_request({k: v for k, v in CONFIG_SCHEMA.items() if k != "required"}),
        responses={200: CONFIG_SCHEMA, **WRITE_ERROR_RESPONSES},
    )
    def patch(self, request: Request) -> Response:
        saved = telemetry_config_patch(data=request.data, user=request.user, via="api")
        return Response(saved.config.to_schema().to_wire())


@extend_schema(responses={200: TelemetryConfigChangeSerializer(many=True), **ERROR_RESPONSES})
class TelemetryConfigHistoryView(generics.ListAPIView[TelemetryConfigChange]):
    """Every change to the config, newest first: who, when, through what, old and new values."""

    serializer_class = TelemetryConfigChangeSerializer
    queryset = TelemetryConfigChange.objects.order_by("-version")
    filter_backends: list[type] = []
    pagination_class = HistoryPagination
