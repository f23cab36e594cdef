"""What the OpenAI-compatible endpoint's tests share: the two workers' names, the messages they
send, plain HTTP calls, API keys, and a generation as stored (the stack itself: conftest.py)."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
import uuid
from typing import Any

import redis
from django.core.management import call_command
from openai.types.chat import ChatCompletionMessageParam

from events.selectors import generation_detail
from tests.factories import ingest_until

DEMO_WORKER = "test-host/demo-worker"
OTHER_WORKER = "test-host/other-worker"


def http(url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """A plain HTTP call (the status and the JSON or text answer), for what the client will not send."""
    request = urllib.request.Request(
        url, data=body, headers=headers or {}, method="POST" if body is not None else "GET"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            status, raw = answer.status, answer.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()


def api_key(name: str = "team", **options: Any) -> str:
    out = io.StringIO()
    call_command("create_api_key", name, stdout=out, stderr=io.StringIO(), **options)
    return out.getvalue().strip()


CHAT: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello"},
]


def stored_generation(redis_client: redis.Redis, generation_id: str) -> Any:
    """The generation as the API shows it, once the ingester stored its end."""

    def ended() -> bool:
        detail = generation_detail(generation_id=uuid.UUID(generation_id))
        return detail is not None and detail.state in ("completed", "failed")

    ingest_until(redis_client, ended)
    return generation_detail(generation_id=uuid.UUID(generation_id))
