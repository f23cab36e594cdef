"""The web server's application (``gunicorn mlxserve.asgi:application -c python:mlxserve.gunicorn_conf``,
uvicorn's workers).

Two of Django's handlers, routed by path:

- ``/v1/`` (the OpenAI-compatible endpoints, async views that stream) and the event export (a
  stream as long as the range asked for, see ``mlxserve.web.streaming``): Django's ASGI handler.
- everything else (the API, the admin, ``/metrics``, static files: sync views): Django's WSGI
  handler on a pool of ``MLXSERVE_WEB_THREADS`` threads (a2wsgi). Under the ASGI handler each
  half of each sync middleware and the view is a hop between the event loop and a thread (about
  20 a request; measured on a 2-core host, a request that took 5 ms under WSGI took 16); here a
  request is one hop onto a thread of the pool, its middleware and view run there in one go.
  A request's body is read whole here, on the event loop, before the request takes a thread: a
  client that sends its body slowly (anyone can, to ``/admin/login/``) holds a connection, never
  one of the pool's threads.

Django reads a request's whole body before any middleware runs: the size limit is applied here,
from the headers, so an oversized or chunked body is answered (413, 411) unread, as
``RequestSizeLimitMiddleware`` does under WSGI.
"""

import json
import os

from a2wsgi import WSGIMiddleware
from django.core.asgi import get_asgi_application
from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mlxserve.settings")

django_application = get_asgi_application()

from django.conf import settings  # noqa: E402  (after the settings are loaded)
from django.urls import reverse  # noqa: E402

from mlxserve.web.production import production_keys_require  # noqa: E402

production_keys_require("web server")

sync_application = WSGIMiddleware(get_wsgi_application(), workers=settings.WEB_THREADS)  # type: ignore[arg-type]
ASYNC_PREFIX = "/v1/"
EXPORT_PATH = reverse("event-export")  # streamed from the event loop (mlxserve.web.streaming)


def _refusal(path: str, status: int, code: str, message: str) -> bytes:
    if path.startswith("/v1/"):
        kind = "invalid_request_error"
        return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    return json.dumps({"code": code, "message": message}).encode()


async def _drained(receive):  # type: ignore[no-untyped-def]
    """Read the body and throw it away: a server that closes a connection with unread data on it
    makes the kernel send a reset, and the client sees that instead of the 413."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


async def _body_read(receive):  # type: ignore[no-untyped-def]
    """The whole body (at most ``MAX_REQUEST_BYTES``: the headers were checked), or None if the
    client went away first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replayed(body: bytes, receive):  # type: ignore[no-untyped-def]
    """``receive`` for a request whose body was read: the body once, then the client's messages
    (a disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay():  # type: ignore[no-untyped-def]
        return pending.pop() if pending else await receive()

    return replay


async def application(scope, receive, send):  # type: ignore[no-untyped-def] # the ASGI signature
    if scope["type"] == "http":
        headers = dict(scope["headers"])
        refusal = None
        if headers.get(b"transfer-encoding", b"").strip():
            refusal = (411, "LengthRequired", "A request body must be sent with Content-Length, not chunked")
        else:
            try:
                length = int(headers.get(b"content-length") or 0)
            except ValueError:
                length = -1
            if length < 0:
                refusal = (400, "BadRequest", "Invalid Content-Length header")
            elif length > settings.MAX_REQUEST_BYTES:
                message = f"Request body exceeds the limit of {settings.MAX_REQUEST_BYTES} bytes"
                refusal = (413, "PayloadTooLarge", message)
                if length <= settings.REQUEST_DRAIN_BYTES:
                    await _drained(receive)
        if refusal is not None:
            status, code, message = refusal
            body = _refusal(scope["path"], status, code, message)
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        if not scope["path"].startswith(ASYNC_PREFIX) and scope["path"] != EXPORT_PATH:
            body = await _body_read(receive)
            if body is not None:
                await sync_application(scope, _replayed(body, receive), send)
            return
    await django_application(scope, receive, send)
