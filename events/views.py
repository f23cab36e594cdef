from __future__ import annotations

import uuid
from typing import Any

import redis
from django.conf import settings
from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiResponse, extend_schema
from kombu.exceptions import OperationalError
from rest_framework import generics, status
from rest_framework.exceptions import NotFound
from rest_framework.pagination import CursorPagination
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from events.filters import EventFilter
from events.models import Event
from events.schemas import Envelope, GenerationOrder
from events.selectors import generation_detail, workers_list
from events.serializers import EventSerializer
from events.services import event_submit, event_submit_batch, generation_queue
from mlxserve.api import CanOperate, CanPostEvents, CanRead
from mlxserve.engine.runtime import ControlCommand, control_command_publish
from mlxserve.openapi import ERROR_RESPONSES, ERROR_SCHEMA, error, json_request, struct_schema
from mlxserve.redis_conn import redis_client
from mlxserve.validation import Issue, ValidationFailed, validate

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
        request=json_request({"oneOf": [ENVELOPE_SCHEMA, {"type": "array", "items": ENVELOPE_SCHEMA}]}),
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


GENERATION_SCHEMA = {
    "type": "object",
    "properties": {
        "generationId": {"type": "string", "format": "uuid"},
        "model": {"type": "string", "nullable": True},
        "state": {"type": "string", "enum": ["queued", "running", "completed", "failed"]},
        "text": {"type": "string"},
        "tokens": {"type": "integer"},
        "timeToFirstTokenMs": {"type": "number", "nullable": True},
        "tokensPerSecond": {"type": "number", "nullable": True},
        "durationMs": {"type": "number", "nullable": True},
        "error": {"type": "object", "nullable": True},
        "attempt": {"type": "integer"},
        "attempts": {"type": "array", "items": {"type": "object"}},
        "events": {"type": "array", "items": {"type": "object"}},
    },
}


class GenerationCreateView(APIView):
    """Queue a generation on the workers (operators and staff)."""

    permission_classes = [CanOperate]

    @extend_schema(
        request=json_request(struct_schema(GenerationOrder)),
        responses={
            202: OpenApiResponse(
                response={
                    "type": "object",
                    "properties": {"generationId": {"type": "string", "format": "uuid"}},
                },
                description="Queued",
            ),
            **ERROR_RESPONSES,
            503: OpenApiResponse(response=ERROR_SCHEMA, description="The broker (Redis) is unreachable"),
        },
    )
    def post(self, request: Request) -> Response:
        try:
            generation = generation_queue(data=request.data, user=request.user)
        except (OperationalError, OSError) as exc:
            raise redis.ConnectionError(str(exc)) from exc
        return Response({"generationId": str(generation.id)}, status=status.HTTP_202_ACCEPTED)


class GenerationDetailView(APIView):
    """A generation's state, text so far, time to first token, tokens/s, every attempt and its events."""

    @extend_schema(responses={200: GENERATION_SCHEMA, **ERROR_RESPONSES, 404: error("No such generation")})
    def get(self, request: Request, generation_id: uuid.UUID) -> Response:
        detail = generation_detail(generation_id=generation_id)
        if detail is None:
            raise NotFound("No such generation")
        detail["events"] = EventSerializer(detail["events"], many=True).data
        return Response(detail)


class WorkerListView(APIView):
    """Every worker seen: last runtimeStatus, when last heard from, stale after three missed heartbeats."""

    @extend_schema(responses={200: {"type": "array", "items": {"type": "object"}}, **ERROR_RESPONSES})
    def get(self, request: Request) -> Response:
        return Response(workers_list())


class WorkerUnloadView(APIView):
    """Tell the workers (all, or one ``source``) to unload a model; they emit ``modelUnloaded`` (manual)."""

    permission_classes = [CanOperate]

    @extend_schema(
        request=json_request(struct_schema(ControlCommand)),
        responses={
            202: {"type": "object", "properties": {"listeners": {"type": "integer"}}},
            **ERROR_RESPONSES,
        },
    )
    def post(self, request: Request) -> Response:
        data = request.data
        if isinstance(data, dict):
            data = {"command": "unload", **data}
        command = validate(data, ControlCommand)
        listeners = control_command_publish(
            client=redis_client(), channel=settings.WORKER_CONTROL_CHANNEL, command=command
        )
        return Response({"listeners": listeners}, status=status.HTTP_202_ACCEPTED)
