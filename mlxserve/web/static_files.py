"""The admin's static files, served by ServeStatic under both of Django's handlers.

ServeStatic's own middleware is async only: under the sync handler (the API and the admin, see
``mlxserve.asgi``; ``mlxserve.wsgi``; the test client) Django would adapt it with ``async_to_sync``
on every request, and in the async handler (``/v1/``) a sync-only static middleware would run the
rest of the request from a thread, held for as long as each stream lasts. This one runs in
either mode: async, it is ServeStatic's middleware; sync, it looks the file up in the same table
(the apps' files through the finders, no collectstatic) and answers with ServeStatic's response.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponseBase
from servestatic.middleware import AsyncServeStaticFileResponse, ServeStaticMiddleware


async def _unused(request: HttpRequest) -> HttpResponseBase:  # pragma: no cover - never called
    raise AssertionError("only the sync handler's table is read")


class StaticFilesMiddleware:
    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        # ServeStatic's middleware reads the SERVESTATIC_* settings and builds the file table.
        self.served = ServeStaticMiddleware(get_response if self.is_async else _unused)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> HttpResponseBase | Awaitable[HttpResponseBase]:
        if self.is_async:
            return self.served(request)
        served = self.served
        path = request.path_info
        static_file = served.find_file(path) if served.autorefresh else served.files.get(path)
        if static_file is None:
            response: HttpResponseBase = self.get_response(request)
            return response
        answer = static_file.get_response(request.method or "GET", request.META)
        # ServeStatic's response class: its headers only (no FileResponse guesses), a sync file.
        http_response = AsyncServeStaticFileResponse(answer.file or (), status=int(answer.status))
        del http_response["Content-Type"]
        for key, value in answer.headers:
            if value is not None:
                http_response[key] = value
        return http_response
