"""Cursor pages over the event list: a keyset on a unique order.

DRF's ``CursorPagination`` keeps a position on the first ordering field and an offset past the
rows that share it, and gives up on the offset past a cutoff: with 2,500 events of one
timestamp, following ``next`` at ``limit=1000`` repeated the second page for ever, and ties on
(timestamp, seq) could skip or repeat rows. Here the cursor is the whole key of the row it
starts after, ``(timestamp, seq, id)``, which no two events share, so following ``next`` visits
every event exactly once, in order, whatever the ties and whatever arrives meanwhile.
"""

from __future__ import annotations

import base64
import re
import time
import uuid
from collections.abc import Sequence
from typing import Any
from urllib import parse

from django.db.models import QuerySet
from rest_framework.pagination import CursorPagination
from rest_framework.request import Request
from rest_framework.utils.urls import replace_query_param
from rest_framework.views import APIView

from events.history import after, row_key, rows_merged
from mlxserve.contract.validation import Issue, ValidationFailed

INT64 = range(-(2**63), 2**63)
_POSITION = re.compile(r"(-?[0-9]{1,19})_(-?[0-9]{1,19})_([0-9a-f]{32})")


class EventKeysetPagination(CursorPagination):
    """Newest first by ``(timestamp, seq, id)``; ``?limit=`` sets the page size (at most 1000).

    A cursor is base64 of ``p=<timestamp>_<seq>_<id hex>`` (``&r=1`` for a previous page): a
    position, never an offset. Anything else is 400 ``invalid_cursor``.
    """

    page_size = 100
    page_size_query_param = "limit"
    max_page_size = 1000
    ordering = ("-timestamp", "-seq", "-id")
    # The filters' ``since`` and ``until`` (epoch ms, either None), set by the view: where a page
    # can start.
    window: tuple[int | None, int | None] = (None, None)

    def paginate_queryset(
        self, queryset: QuerySet[Any] | Sequence[QuerySet[Any]], request: Request, view: APIView | None = None
    ) -> list[Any] | None:
        """One page of a queryset of ``event_values`` rows, or of several together (the event
        tables, ``events.history``)."""
        self.request = request
        self.base_url = request.build_absolute_uri()
        self.page_size = self.get_page_size(request) or self.page_size
        key, self.reverse = self._cursor(request)
        querysets = [queryset] if isinstance(queryset, QuerySet) else list(queryset)
        if key is not None:
            querysets = [q.filter(after(key, newer=self.reverse)) for q in querysets]
        # Where the page starts: its cursor's time, or now (the first page, newest first); no
        # later than ``until`` (newest first) nor earlier than ``since`` (oldest first), as no row
        # the filters select is past them.
        near = key[0] if key is not None else time.time_ns() // 1_000_000
        since, until = self.window
        if not self.reverse and until is not None:
            near = min(near, until)
        elif self.reverse and since is not None:
            near = max(near, since)
        rows = rows_merged(querysets, self.page_size + 1, newest_first=not self.reverse, near=near)
        more = len(rows) > self.page_size
        rows = rows[: self.page_size]
        if self.reverse:
            rows.reverse()
        # Forward: a next page if there is more; a previous one if this page was reached from a cursor.
        # Backward: the other way round.
        self.has_next = more if not self.reverse else key is not None
        self.has_previous = key is not None if not self.reverse else more
        self.first_key = row_key(rows[0]) if rows else key
        self.last_key = row_key(rows[-1]) if rows else key
        self.page = rows
        return rows

    def get_next_link(self) -> str | None:
        if not self.has_next or self.last_key is None:
            return None
        return self._link(self.last_key, reverse=False)

    def get_previous_link(self) -> str | None:
        if not self.has_previous or self.first_key is None:
            return None
        return self._link(self.first_key, reverse=True)

    def _link(self, key: tuple[int, int, uuid.UUID], *, reverse: bool) -> str:
        tokens = {"p": f"{key[0]}_{key[1]}_{key[2].hex}"}
        if reverse:
            tokens["r"] = "1"
        encoded = base64.b64encode(parse.urlencode(tokens).encode("ascii")).decode("ascii")
        return str(replace_query_param(str(self.base_url), self.cursor_query_param, encoded))

    def _cursor(self, request: Request) -> tuple[tuple[int, int, uuid.UUID] | None, bool]:
        encoded = request.query_params.get(self.cursor_query_param)
        if not encoded:
            return None, False
        parsed = _decoded(encoded)
        if parsed is None:
            raise ValidationFailed([Issue(["cursor"], "Invalid cursor", "invalid_cursor")])
        return parsed


def _decoded(encoded: str) -> tuple[tuple[int, int, uuid.UUID], bool] | None:
    """A cursor this API wrote, or None: strict base64 of ASCII ``p=...`` and maybe ``r=1``."""
    try:
        text = base64.b64decode(encoded.encode("ascii"), validate=True).decode("ascii")
    except ValueError:
        return None
    pairs = parse.parse_qsl(text, keep_blank_values=True, strict_parsing=False)
    tokens = dict(pairs)
    if len(tokens) != len(pairs) or not set(tokens) <= {"p", "r"} or tokens.get("r", "1") != "1":
        return None
    match = _POSITION.fullmatch(tokens.get("p", ""))
    if match is None:
        return None
    timestamp, seq = int(match[1]), int(match[2])
    if timestamp not in INT64 or seq not in INT64:
        return None
    return (timestamp, seq, uuid.UUID(hex=match[3])), "r" in tokens
