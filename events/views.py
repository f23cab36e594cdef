from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import generics, status
from rest_framework.pagination import CursorPagination
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.response import Response

from events.filters import EventFilter
from events.models import Event
from events.schemas import Envelope
from events.serializers import EventSerializer
from events.services import event_submit, event_submit_batch
from mlxserve.api import CanPostEvents, CanRead
from mlxserve.openapi import ERROR_RESPONSES, ERROR_SCHEMA, struct_schema
from mlxserve.redis_conn import redis_client
from mlxserve.validation import Issue, ValidationFailed

ENVELOPE_SCHEMA = struct_schema(Envelope)


class EventCursorPagination(CursorPagination):
    # Newest first. A cursor is a position, not an offset: pages stay stable
    # while new events arrive.
    ordering = ("-timestamp", "-seq")
    page_size = 100
    page_size_query_param = "limit"
    max_page_size = 1000


class EventListCreateView(generics.ListAPIView[Event]):
    """``GET`` the stored events (newest first, filtered); ``POST`` one envelope or an array."""

    serializer_class = EventSerializer
    pagination_class = EventCursorPagination
    filterset_class = EventFilter

    def get_queryset(self) -> QuerySet[Event]:
        return Event.objects.all()

    def get_permissions(self) -> list[BasePermission]:
        if self.request.method == "POST":
            return [CanPostEvents()]
        return [CanRead()]

    @extend_schema(
        request={"oneOf": [ENVELOPE_SCHEMA, {"type": "array", "items": ENVELOPE_SCHEMA}]},
        responses={
            202: OpenApiResponse(
                response={"type": "object", "properties": {"id": {"type": "string", "format": "uuid"}}},
                description="One envelope, accepted: it is on the Redis stream.",
            ),
            207: OpenApiResponse(
                response={
                    "type": "object",
                    "properties": {
                        "accepted": {"type": "array", "items": {"type": "string", "format": "uuid"}},
                        "rejected": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {"index": {"type": "integer"}, "error": ERROR_SCHEMA},
                            },
                        },
                    },
                },
                description="An array: the valid envelopes are accepted whatever the others hold.",
            ),
            **ERROR_RESPONSES,
            503: OpenApiResponse(response=ERROR_SCHEMA, description="Redis unreachable; nothing stored"),
        },
    )
    def post(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        data = request.data
        client, stream = redis_client(), settings.EVENTS_STREAM
        if isinstance(data, list):
            outcome = event_submit_batch(client=client, stream=stream, items=data)
            return Response(
                {"accepted": outcome.accepted, "rejected": outcome.rejected},
                status=status.HTTP_207_MULTI_STATUS,
            )
        if not isinstance(data, dict):
            raise ValidationFailed(
                [Issue([], "Must be an envelope object or an array of them", "invalid_type")]
            )
        event_id = event_submit(client=client, stream=stream, data=data)
        return Response({"id": event_id}, status=status.HTTP_202_ACCEPTED)


class EventDetailView(generics.RetrieveAPIView[Event]):
    """One stored event; 404 until the ingester has stored it."""

    serializer_class = EventSerializer
    queryset = Event.objects.all()
    filter_backends: list[type] = []
