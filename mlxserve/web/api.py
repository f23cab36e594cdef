"""What every API endpoint shares: parsing, errors, access and the size limit.

Every error leaves as one JSON object with a ``code`` and a ``message``;
validation failures carry their ``details`` as well.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import msgspec
import redis
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest, JsonResponse
from django.utils.deprecation import MiddlewareMixin
from django.utils.functional import Promise
from rest_framework import exceptions, status
from rest_framework.parsers import BaseParser
from rest_framework.permissions import BasePermission
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.throttling import UserRateThrottle

from mlxserve.contract.validation import Issue, ValidationFailed, json_parse
from mlxserve.web.roles import OPERATOR_GROUP, PRODUCER_GROUP

if TYPE_CHECKING:
    # Not at run time: DRF imports this module (its settings name our parser and
    # permissions) while rest_framework.views is itself being imported.
    from rest_framework.views import APIView

logger = logging.getLogger(__name__)

NON_FIELD_ERRORS: str = api_settings.NON_FIELD_ERRORS_KEY


_CODE_BY_STATUS = {
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    406: "NotAcceptable",
    411: "LengthRequired",
    413: "PayloadTooLarge",
    415: "UnsupportedMediaType",
    429: "Throttled",
    503: "Unavailable",
}


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"code": code, "message": message}


# -- parsing ---------------------------------------------------------------------


class StrictJSONParser(BaseParser):
    """JSON that is JSON: ``NaN`` and ``Infinity`` are refused, not turned into floats.

    Python's ``json`` (and so DRF's parser) accepts them; msgspec does not,
    and parses faster.
    """

    media_type = "application/json"

    def parse(
        self,
        stream: Any,
        media_type: str | None = None,
        parser_context: Mapping[str, Any] | None = None,
    ) -> Any:
        body = stream.read() if stream is not None else b""
        # A UTF-8 byte order mark may precede JSON text (RFC 8259 lets a parser ignore it).
        return json_parse(body.removeprefix(b"\xef\xbb\xbf"))


class FastJSONRenderer(JSONRenderer):
    """DRF's JSON renderer, encoding with msgspec: several times faster on lists of
    events, and it writes a payload read as raw JSON text (``msgspec.Raw``) as it is."""

    def render(
        self, data: Any, accepted_media_type: str | None = None, renderer_context: Any = None
    ) -> bytes:
        if data is None:
            return b""
        return msgspec.json.encode(data, enc_hook=_encode_other)


def _encode_other(value: Any) -> Any:
    if isinstance(value, Promise | Decimal):  # lazy translations (DRF messages), decimals
        return str(value)
    raise NotImplementedError(f"Cannot encode {type(value).__name__}")


# -- errors ----------------------------------------------------------------------


def _drf_issues(detail: Any, path: list[str | int]) -> list[Issue]:
    if isinstance(detail, dict):
        return [
            i
            for key, value in detail.items()
            # DRF's key for errors of the whole object is the contract's empty path ("root").
            for i in _drf_issues(value, [*path, key] if path or key != NON_FIELD_ERRORS else [])
        ]
    if isinstance(detail, list):
        if all(isinstance(d, str) for d in detail):
            return [Issue(path, str(d), getattr(d, "code", "invalid")) for d in detail]
        return [i for index, value in enumerate(detail) for i in _drf_issues(value, [*path, index])]
    return [Issue(path, str(detail), getattr(detail, "code", "invalid"))]


def drf_validation_error(failure: ValidationFailed) -> exceptions.ValidationError:
    """The contract's refusal as DRF's ``ValidationError``, so a serializer built on the contract
    keeps DRF's own contract (``is_valid()`` is False with ``.errors``; ``raise_exception=True``
    raises DRF's exception) and the exception handler turns it back into the same error object:
    each issue under its path, with its message and code, the first one first."""
    detail: dict[Any, Any] = {}
    for issue in failure.issues:
        path: list[Any] = list(issue.path) or [NON_FIELD_ERRORS]
        node = detail
        for depth, item in enumerate(path[:-1]):
            child = node.setdefault(item, {})
            if not isinstance(child, dict):  # an issue on an object and one inside it
                path = [".".join(str(p) for p in path[depth:])]
                break
            node = child
        node.setdefault(path[-1], []).append(exceptions.ErrorDetail(issue.message, code=issue.code))
    return exceptions.ValidationError(detail)


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, ValidationFailed):
        return Response(exc.as_error(), status=status.HTTP_400_BAD_REQUEST)
    if isinstance(exc, RequestDataTooBig):
        return Response(_too_large_body(), status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE)
    if isinstance(exc, redis.RedisError):
        logger.error("Redis unavailable: %s", exc)
        return Response(
            error_body(
                "Unavailable", "The event stream (Redis) is unavailable; nothing was stored, retry later"
            ),
            status=status.HTTP_503_SERVICE_UNAVAILABLE,
            headers={"Retry-After": "5"},
        )
    if isinstance(exc, exceptions.ValidationError):
        issues = _drf_issues(exc.detail, []) or [Issue([], "Invalid input", "invalid")]
        return Response(ValidationFailed(issues).as_error(), status=status.HTTP_400_BAD_REQUEST)
    from rest_framework.views import exception_handler as drf_exception_handler

    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    detail = getattr(exc, "detail", None)
    message = str(detail) if detail is not None else response.reason_phrase
    code = _CODE_BY_STATUS.get(response.status_code, "Error")
    response.data = error_body(code, message)
    return response


def _too_large_body() -> dict[str, Any]:
    return error_body(
        "PayloadTooLarge",
        f"Request body exceeds the limit of {settings.MAX_REQUEST_BYTES} bytes",
    )


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """404 for a URL nothing matches: the error object under /api/, Django's page elsewhere."""
    if request.path.startswith("/api/"):
        return JsonResponse(error_body("NotFound", "No such endpoint or object"), status=404)
    from django.views.defaults import page_not_found

    return page_not_found(request, exception or Exception("Not found"))


class RequestSizeLimitMiddleware(MiddlewareMixin):
    """413 for a body over ``MAX_REQUEST_BYTES``, decided from Content-Length; nothing is parsed.
    411 for a chunked body (no Content-Length), which Django would read as empty.

    The body is still read (and thrown away) up to ``REQUEST_DRAIN_BYTES`` before the
    answer goes out: a server that closes a connection with unread data on it makes the
    kernel send a reset, and the client sees "connection reset" instead of the 413 (what
    nginx's lingering close is for). Past that bound the connection is closed unread.
    """

    def process_request(self, request: HttpRequest) -> HttpResponse | None:
        if request.META.get("HTTP_TRANSFER_ENCODING", "").strip():
            # Django reads a body by its Content-Length: a chunked body (no length) would be
            # read as empty, and a PATCH of it answered 200 with nothing changed. 411, as
            # RFC 9110 lets a server that wants the length say; the connection closes, since
            # the chunks are still on it.
            response = JsonResponse(
                error_body("LengthRequired", "A request body must be sent with Content-Length, not chunked"),
                status=411,
            )
            response["Connection"] = "close"
            return response
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = -1
        if length < 0:
            return JsonResponse(error_body("BadRequest", "Invalid Content-Length header"), status=400)
        if length > settings.MAX_REQUEST_BYTES:
            response = JsonResponse(_too_large_body(), status=413)
            if not _body_drained(request, length):
                response["Connection"] = "close"
            return response
        return None


class NulParameterMiddleware(MiddlewareMixin):
    """400 for a query parameter holding a NUL character, on every page (the admin's filters included).

    No stored value can hold one (PostgreSQL refuses NUL in text), so such a parameter can only
    be a probe; passed on, it would make the database driver raise instead of finding nothing.
    """

    def process_request(self, request: HttpRequest) -> HttpResponse | None:
        for key, values in request.GET.lists():
            if "\x00" in key or any("\x00" in value for value in values):
                issue = Issue(
                    [key.replace("\x00", "\ufffd")], "Cannot contain NUL characters", "invalid_string"
                )
                if request.path.startswith("/api/"):
                    return JsonResponse(ValidationFailed([issue]).as_error(), status=400)
                return HttpResponseBadRequest("Query parameters cannot contain NUL characters")
        return None


def _body_drained(request: HttpRequest, length: int) -> bool:
    if length > settings.REQUEST_DRAIN_BYTES:
        return False
    stream = request.META.get("wsgi.input")
    if stream is None:
        return False
    left = length
    try:
        while left > 0:
            chunk = stream.read(min(left, 65536))
            if not chunk:
                break
            left -= len(chunk)
    except OSError:  # the client went away: nothing to answer
        return False
    return True


# -- access ----------------------------------------------------------------------


def user_is_producer_only(user: AbstractBaseUser | AnonymousUser) -> bool:
    """A producer account may post events and do nothing else."""
    return (
        not getattr(user, "is_staff", False) and user.groups.filter(name=PRODUCER_GROUP).exists()  # type: ignore[union-attr]
    )


class CanRead(BasePermission):
    """Any signed-in account but a producer-only one may read."""

    message = "Producer accounts can only post events"

    def has_permission(self, request: Request, view: APIView) -> bool:
        user = request.user
        return bool(user and user.is_authenticated) and not user_is_producer_only(user)


def _staff_or_member(request: Request, group: str) -> bool:
    user = request.user
    if not (user and user.is_authenticated):
        return False
    return bool(user.is_staff) or user.groups.filter(name=group).exists()


class CanPostEvents(BasePermission):
    message = "Posting events needs a producer account or a staff user"

    def has_permission(self, request: Request, view: APIView) -> bool:
        return _staff_or_member(request, PRODUCER_GROUP)


class ReadOrStaffWrite(BasePermission):
    """Readers read; staff change the telemetry config."""

    message = "Changing the telemetry config needs a staff user"

    def has_permission(self, request: Request, view: APIView) -> bool:
        if not CanRead().has_permission(request, view):
            self.message = CanRead.message
            return False
        if request.method in ("GET", "HEAD", "OPTIONS"):
            return True
        return bool(request.user.is_staff)


class CanOperate(BasePermission):
    """Queueing generations and unloading models: operators and staff."""

    message = "This needs an operator account or a staff user"

    def has_permission(self, request: Request, view: APIView) -> bool:
        return _staff_or_member(request, OPERATOR_GROUP)


class CanSeeDeadLetters(BasePermission):
    """Dead letters: operators, and anyone who may see them in the admin (admins)."""

    message = "Dead letters need an operator account or an admin"

    def has_permission(self, request: Request, view: APIView) -> bool:
        user = request.user
        if not (user and user.is_authenticated):
            return False
        return (
            bool(user.has_perm("events.view_deadletter")) or user.groups.filter(name=OPERATOR_GROUP).exists()
        )


class CanReplayDeadLetters(BasePermission):
    """The admin's Replay action needs the change permission on dead letters: so does this."""

    message = "Replaying dead letters needs the permission to change them (admins)"

    def has_permission(self, request: Request, view: APIView) -> bool:
        user = request.user
        return bool(user and user.is_authenticated and user.has_perm("events.change_deadletter"))


class PostRateThrottle(UserRateThrottle):
    """Writes per account (events, generations, config): ``API_POST_RATE``, e.g. ``"600/min"``.

    Counted in Redis (the ``default`` cache), so every web process shares one
    count. Reads are never throttled. The rate is read at each request, so a
    changed setting applies without a restart of the class.
    """

    scope = "posts"

    def get_rate(self) -> str | None:
        return settings.API_POST_RATE or None

    def allow_request(self, request: Request, view: APIView) -> bool:
        if request.method in ("GET", "HEAD", "OPTIONS"):
            return True
        return super().allow_request(request, view)
