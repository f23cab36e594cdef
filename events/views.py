from __future__ import annotations

import base64
import builtins
import time
import uuid
from typing import Any
from urllib import parse

import msgspec
import redis
from django.conf import settings
from django.core.handlers.asgi import ASGIRequest
from django.db import connection, transaction
from django.db.models import QuerySet
from django.http import StreamingHttpResponse
from django_filters.utils import translate_validation
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from kombu.exceptions import OperationalError
from rest_framework import generics, renderers, serializers, status
from rest_framework.exceptions import NotFound
from rest_framework.pagination import CursorPagination
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from events.dead_letters import ReplayRefused, dead_letter_replay
from events.filters import EpochMsFilter, EventFilter
from events.generations import ModelNotServed, generation_queue
from events.history import event_get, event_row, events_export, history, rows_of
from events.intake import IntakeRefused, event_submit, event_submit_batch
from events.models import DeadLetter, EventRecord, Worker
from events.pagination import EventKeysetPagination
from events.responses import (
    Accepted,
    BatchOutcome,
    DeadLetterOut,
    EventOut,
    GenerationOut,
    GenerationQueued,
    StatsOut,
    UnloadSent,
    WorkerOut,
    dead_letter_out,
)
from events.selectors import (
    events_stats,
    generation_detail,
    workers_out,
)
from mlxserve.bus import control_command_publish
from mlxserve.contract.control import ControlCommand
from mlxserve.contract.events import Envelope
from mlxserve.contract.generations import GenerationOrder
from mlxserve.contract.validation import Issue, ValidationFailed, validate
from mlxserve.redis_conn import redis_client
from mlxserve.web.api import (
    CanOperate,
    CanPostEvents,
    CanRead,
    CanReplayDeadLetters,
    CanSeeDeadLetters,
    error_body,
)
from mlxserve.web.openapi import (
    ERROR_RESPONSES,
    ERROR_SCHEMA,
    WRITE_ERROR_RESPONSES,
    error,
    json_request,
    struct_schema,
    struct_serializer,
)
from mlxserve.web.streaming import chunks_from_the_loop

ENVELOPE_SCHEMA = struct_schema(Envelope)


class StrictCursorPagination(CursorPagination):
    """DRF's cursor pages, with every cursor checked: one this API did not write is a 400, never
    DRF's 404, a first page, or a position passed to the query unchecked. ``?limit=`` sets the
    page size."""

    page_size = 100
    page_size_query_param = "limit"
    max_page_size = 1000

    def position_ok(self, position: Any) -> bool:
        raise NotImplementedError

    def decode_cursor(self, request: Request) -> Any:
        encoded = request.query_params.get(self.cursor_query_param)
        if encoded is None or encoded == "":
            return None
        try:
            cursor = super().decode_cursor(request) if _is_our_cursor(encoded) else None
        except NotFound:
            cursor = None
        if cursor is None or (cursor.position is not None and not self.position_ok(cursor.position)):
            raise ValidationFailed([Issue(["cursor"], "Invalid cursor", "invalid_cursor")])
        return cursor


class IntegerCursorPagination(StrictCursorPagination):
    """Cursor pages over an integer column: a cursor is a position, not an offset, so pages
    stay stable while new rows arrive."""

    def position_ok(self, position: Any) -> bool:
        return _is_int64(position)


def _is_our_cursor(encoded: str) -> bool:
    """Strict base64 of an ASCII query string of DRF's keys (offset, reverse, position)."""
    try:
        text = base64.b64decode(encoded.encode("ascii"), validate=True).decode("ascii")
    except ValueError:
        return False
    keys = [key for key, _ in parse.parse_qsl(text, keep_blank_values=True)]
    return bool(keys) and set(keys) <= {"o", "r", "p"} and len(keys) == len(set(keys))


class DeadLetterCursorPagination(IntegerCursorPagination):
    ordering = ("-id",)  # newest first: ids grow as letters are received


def _is_int64(text: Any) -> bool:
    """A cursor position: the timestamp of the row it starts after (as DRF encodes it)."""
    if text is None:
        return True
    if not (text.isascii() and text.lstrip("-").isdigit() and len(text) <= 20):
        return False
    return -(2**63) <= int(text) < 2**63


def filtered_history(view: generics.GenericAPIView[EventRecord]) -> list[QuerySet[Any]]:
    """The rows of both event tables the request's filters select (validated as DRF's filter
    backend does: a bad value is a 400)."""
    return _filtered(view)[0]


def _filtered(view: generics.GenericAPIView[EventRecord]) -> tuple[list[QuerySet[Any]], dict[str, Any]]:
    filterset = view.filterset_class(  # type: ignore[attr-defined]
        view.request.query_params, queryset=view.get_queryset(), request=view.request
    )
    if not filterset.is_valid():
        raise translate_validation(filterset.errors)
    filters = filterset.form.cleaned_data
    return history(filterset.qs, filters), filters


class EventListCreateView(generics.ListAPIView[EventRecord]):
    """``GET`` the stored events (newest first, filtered); ``POST`` one envelope or an array."""

    serializer_class = struct_serializer(EventOut)
    pagination_class = EventKeysetPagination
    filterset_class = EventFilter

    def get_queryset(self) -> QuerySet[EventRecord]:
        return rows_of(EventRecord)  # type: ignore[return-value]  # rows, not instances (events.history)

    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        # Rows straight to JSON: the payload as the database's text (never parsed and
        # re-encoded), no serializer fields per row.
        paginator = self.paginator
        assert isinstance(paginator, EventKeysetPagination)
        querysets, filters = _filtered(self)
        paginator.window = (filters.get("since"), filters.get("until"))
        page: builtins.list[Any] = paginator.paginate_queryset(querysets, request, view=self) or []
        return self.get_paginated_response([event_row(e) for e in page])

    def get_permissions(self) -> builtins.list[BasePermission]:
        if self.request.method == "POST":
            return [CanPostEvents()]
        return [CanRead()]

    @extend_schema(
        request=json_request({"oneOf": [ENVELOPE_SCHEMA, {"type": "array", "items": ENVELOPE_SCHEMA}]}),
        responses={
            202: OpenApiResponse(
                response=struct_schema(Accepted),
                description="One envelope, accepted: it is on the Redis stream.",
            ),
            207: OpenApiResponse(
                response=struct_schema(BatchOutcome),
                description="An array: the valid envelopes are accepted whatever the others hold.",
            ),
            **WRITE_ERROR_RESPONSES,
            403: error("Not allowed to post events, or (one envelope) a source not the producer's own"),
            429: error("Too many writes, or the account's event budget used up; see Retry-After"),
            503: OpenApiResponse(
                response=ERROR_SCHEMA,
                description="Redis unreachable, or the stream's backlog past its limit; nothing stored",
            ),
        },
    )
    def post(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        data = request.data
        client, stream = redis_client(), settings.EVENTS_STREAM
        user = request.user
        account = user.get_username()
        # A producer account posts as its own name; staff may post any source.
        producer = None if user.is_staff else account
        try:
            if isinstance(data, list):
                outcome = event_submit_batch(
                    client=client, stream=stream, items=data, account=account, producer=producer
                )
                return Response(outcome, status=status.HTTP_207_MULTI_STATUS)
            if not isinstance(data, dict):
                raise ValidationFailed(
                    [Issue([], "Must be an envelope object or an array of them", "invalid_type")]
                )
            event_id = event_submit(
                client=client, stream=stream, data=data, account=account, producer=producer
            )
        except IntakeRefused as refused:
            headers = {"Retry-After": str(refused.retry_after)} if refused.retry_after else None
            return Response(refused.as_error(), status=refused.status, headers=headers)
        return Response(Accepted(id=str(event_id)), status=status.HTTP_202_ACCEPTED)


class EventDetailView(APIView):
    """One stored event; 404 until the ingester has stored it."""

    permission_classes = [CanRead]

    @extend_schema(responses={200: struct_schema(EventOut), **ERROR_RESPONSES, 404: error("No such event")})
    def get(self, request: Request, pk: uuid.UUID) -> Response:
        row = event_get(pk)
        if row is None:
            raise NotFound("No such event")
        return Response(event_row(row))


class GenerationCreateView(APIView):
    """Queue a generation on the workers (operators and staff)."""

    permission_classes = [CanOperate]

    @extend_schema(
        request=json_request(struct_schema(GenerationOrder)),
        responses={
            202: OpenApiResponse(response=struct_schema(GenerationQueued), description="Queued"),
            **WRITE_ERROR_RESPONSES,
            503: OpenApiResponse(
                response=ERROR_SCHEMA, description="No live worker serves the model, or Redis is unreachable"
            ),
        },
    )
    def post(self, request: Request) -> Response:
        try:
            generation = generation_queue(data=request.data, user=request.user)
        except ModelNotServed as exc:
            return Response(
                error_body("ModelNotServed", str(exc)), status=status.HTTP_503_SERVICE_UNAVAILABLE
            )
        except (OperationalError, OSError) as exc:
            raise redis.ConnectionError(str(exc)) from exc
        return Response(GenerationQueued(generation_id=str(generation.id)), status=status.HTTP_202_ACCEPTED)


class GenerationDetailView(APIView):
    """A generation's state, text so far, time to first token, tokens/s, every attempt and its events."""

    @extend_schema(
        responses={200: struct_schema(GenerationOut), **ERROR_RESPONSES, 404: error("No such generation")}
    )
    def get(self, request: Request, generation_id: uuid.UUID) -> Response:
        detail = generation_detail(generation_id=generation_id)
        if detail is None:
            raise NotFound("No such generation")
        return Response(detail)


class WorkerCursorPagination(StrictCursorPagination):
    """Workers by source (unique), a page at a time."""

    ordering = ("source",)

    def position_ok(self, position: Any) -> bool:
        return len(position) <= 200 and "\x00" not in position


class WorkerListView(generics.ListAPIView[Worker]):
    """Each worker heard from (and not yet forgotten), by source, cursor-paginated."""

    permission_classes = [CanRead]
    serializer_class = struct_serializer(WorkerOut)
    pagination_class = WorkerCursorPagination

    def get_queryset(self) -> QuerySet[Worker]:
        return Worker.objects.all()

    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        page = self.paginate_queryset(self.get_queryset()) or []
        return self.get_paginated_response(workers_out(page))


class WorkerUnloadView(APIView):
    """Tell the workers (all, or one ``source``) to unload a model; they emit ``modelUnloaded`` (manual)."""

    permission_classes = [CanOperate]

    @extend_schema(
        request=json_request(struct_schema(ControlCommand)),
        responses={
            202: struct_schema(UnloadSent),
            **WRITE_ERROR_RESPONSES,
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
        return Response(UnloadSent(listeners=listeners), status=status.HTTP_202_ACCEPTED)


HOUR_MS = 3_600_000


class StatsQuery(serializers.Serializer[Any]):
    since = serializers.IntegerField(
        required=False, min_value=0, max_value=2**63 - 1, help_text="epoch ms; default: an hour before until"
    )
    until = serializers.IntegerField(
        required=False, min_value=0, max_value=2**63 - 1, help_text="epoch ms; default: now"
    )
    model = serializers.CharField(required=False, help_text="only this model's events")

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        until = attrs.get("until", time.time_ns() // 1_000_000)
        since = attrs.get("since", max(until - HOUR_MS, 0))
        if since > until:
            raise serializers.ValidationError({"since": "Must not be after until"})
        return {**attrs, "since": since, "until": until}


class StatsView(APIView):
    """Counts by type and model, fleet tokens/s, and per-generation tokens/s and time to
    first token percentiles (p50, p95, p99) over a window (default: the last hour)."""

    @extend_schema(parameters=[StatsQuery], responses={200: struct_schema(StatsOut), **ERROR_RESPONSES})
    def get(self, request: Request) -> Response:
        query = StatsQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        return Response(events_stats(**query.validated_data))


class NDJSONRenderer(renderers.BaseRenderer):
    media_type = "application/x-ndjson"
    format = "ndjson"

    def render(
        self, data: Any, accepted_media_type: str | None = None, renderer_context: Any = None
    ) -> bytes:
        return msgspec.json.encode(data) + b"\n"


class EventExportFilter(EventFilter):
    since = EpochMsFilter(field_name="timestamp", lookup_expr="gte", required=True, help_text="epoch ms")


class EventExportView(generics.GenericAPIView[EventRecord]):
    """Every event in a time range as NDJSON (one JSON object a line, oldest first), streamed.

    ``since`` is required; ``until`` and the other filters of the event list are optional.
    """

    renderer_classes = [renderers.JSONRenderer, NDJSONRenderer]
    filterset_class = EventExportFilter
    pagination_class = None

    def get_queryset(self) -> QuerySet[EventRecord]:
        return rows_of(EventRecord)  # type: ignore[return-value]  # rows, not instances (events.history)

    @extend_schema(
        responses={
            (200, "application/x-ndjson"): OpenApiResponse(
                response=OpenApiTypes.STR, description="One event a line, as in the event list"
            ),
            **{(code, "application/json"): value for code, value in ERROR_RESPONSES.items()},
        },
    )
    def get(self, request: Request) -> StreamingHttpResponse:
        chunks = events_export(filtered_history(self))
        ndjson = NDJSONRenderer.media_type
        if isinstance(request._request, ASGIRequest):
            # The deployed server (mlxserve.asgi): sent from the event loop, the request's thread and
            # its database connection given back now rather than after the last byte.
            connection.close()
            response = StreamingHttpResponse(chunks_from_the_loop(chunks), content_type=ndjson)
        else:
            response = StreamingHttpResponse(chunks, content_type=ndjson)
        response["Content-Disposition"] = 'attachment; filename="events.ndjson"'
        return response


class DeadLetterListView(generics.ListAPIView[DeadLetter]):
    """What the ingester could not store, newest first (operators and admins)."""

    serializer_class = struct_serializer(DeadLetterOut)
    pagination_class = DeadLetterCursorPagination
    permission_classes = [CanSeeDeadLetters]
    filter_backends: list[type] = []

    def get_queryset(self) -> QuerySet[DeadLetter]:
        return DeadLetter.objects.defer("body")

    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        page = self.paginate_queryset(self.get_queryset()) or []
        return self.get_paginated_response([dead_letter_out(letter) for letter in page])


class DeadLetterReplayView(APIView):
    """Validate a dead letter again and store it as an event (the admin's Replay permission)."""

    permission_classes = [CanReplayDeadLetters]

    @extend_schema(
        request=None,
        responses={
            200: struct_schema(DeadLetterOut),
            400: OpenApiResponse(response=ERROR_SCHEMA, description="Still not storable: why (kept on it)"),
            404: error("No such dead letter"),
            409: error("Already replayed"),
            **{code: r for code, r in WRITE_ERROR_RESPONSES.items() if code not in (400, 404)},
        },
    )
    def post(self, request: Request, pk: int) -> Response:
        with transaction.atomic():
            letter = DeadLetter.objects.select_for_update().filter(pk=pk).first()
            if letter is None:
                raise NotFound("No such dead letter")
            if letter.replayed_at is not None:
                return Response(
                    error_body("Conflict", f"Already replayed at {letter.replayed_at.isoformat()}"),
                    status=status.HTTP_409_CONFLICT,
                )
            try:
                dead_letter_replay(letter)
            except ReplayRefused as refused:
                return Response(refused.error, status=status.HTTP_400_BAD_REQUEST)
        return Response(dead_letter_out(letter))
