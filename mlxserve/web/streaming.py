"""A long response (the event export) streamed from the event loop: while a client reads, slowly
or not at all, it holds a connection and one chunk, never a thread of the web server's pool nor a
database connection.

``mlxserve.asgi`` sends the export's path to Django's ASGI handler; the view hands its chunks to
:func:`chunks_from_the_loop`, which makes each on one thread kept for it (a process's exports take
turns there, so the database pool needs one connection for all of them) and gives the connection
back after each.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor

from asgiref.sync import sync_to_async
from django.db import connections

_chunk_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stream")


def _next_chunk(chunks: Iterator[bytes]) -> bytes | None:
    try:
        return next(chunks, None)
    finally:
        connections.close_all()  # this thread's, back to the pool until the client wants more


async def chunks_from_the_loop(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    next_chunk = sync_to_async(_next_chunk, thread_sensitive=False, executor=_chunk_thread)
    while (chunk := await next_chunk(chunks)) is not None:
        yield chunk
