"""Who may call ``/v1/``, and how much: API keys (``Authorization: Bearer <key>``) and their
budgets, requests and tokens a minute, counted in Redis so every web process shares the count."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from asgiref.sync import sync_to_async
from django.http import HttpRequest
from django.utils import timezone

from serving.models import ApiKey, key_digest
from serving.replies import async_redis
from serving.requests import OpenAIError

BUDGET_PREFIX = "mlxserve:budget:"


@dataclass(frozen=True)
class Caller:
    key_id: int
    name: str
    user_id: int
    models: tuple[str, ...]
    requests_per_minute: int | None
    tokens_per_minute: int | None

    def may_use(self, model: str) -> bool:
        return not self.models or model in self.models


def _lookup(key: str) -> Caller | None:
    from mlxserve.web.roles import OPERATOR_GROUP

    row = ApiKey.objects.select_related("user").filter(digest=key_digest(key), is_active=True).first()
    if row is None:
        return None
    user = row.user
    if not user.is_active or not (user.is_staff or user.groups.filter(name=OPERATOR_GROUP).exists()):
        raise OpenAIError(
            403,
            "This key's account may not generate (it needs to be an operator or staff).",
            code="permission_denied",
        )
    now = timezone.now()
    if row.last_used_at is None or (now - row.last_used_at).total_seconds() >= 60:
        # A minute's resolution is what the admin shows: not a write per request.
        ApiKey.objects.filter(pk=row.pk).update(last_used_at=now)
    return Caller(
        key_id=row.pk,
        name=row.name,
        user_id=user.pk,
        models=tuple(row.model_names or ()),
        requests_per_minute=row.requests_per_minute,
        tokens_per_minute=row.tokens_per_minute,
    )


async def caller_authenticate(request: HttpRequest) -> Caller:
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key or len(key) > 200:
        raise OpenAIError(
            401,
            "You didn't provide an API key. Send it as 'Authorization: Bearer <key>' "
            "(keys are made with manage.py create_api_key).",
            code="missing_api_key",
        )
    caller = await sync_to_async(_lookup)(key)
    if caller is None:
        raise OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key")
    return caller


def _window() -> tuple[int, int]:
    """This minute's number, and the seconds left in it (at least 1)."""
    now = time.time()
    return int(now // 60), max(1, math.ceil(60 - now % 60))


async def budget_admit(caller: Caller) -> None:
    """Count one request against the key's budgets; 429 with ``Retry-After`` past either."""
    if caller.requests_per_minute is None and caller.tokens_per_minute is None:
        return
    minute, left = _window()
    requests_key = f"{BUDGET_PREFIX}{caller.key_id}:requests:{minute}"
    tokens_key = f"{BUDGET_PREFIX}{caller.key_id}:tokens:{minute}"
    pipe = async_redis().pipeline(transaction=False)
    pipe.incr(requests_key)
    pipe.expire(requests_key, 120)
    pipe.get(tokens_key)
    requests, _, tokens = await pipe.execute()
    headers = {"Retry-After": str(left)}
    if caller.requests_per_minute is not None and int(requests) > caller.requests_per_minute:
        raise OpenAIError(
            429,
            f"Rate limit reached for key '{caller.name}': {caller.requests_per_minute} requests per minute. "
            f"Retry in {left} s.",
            code="rate_limit_exceeded",
            headers=headers,
        )
    if caller.tokens_per_minute is not None and int(tokens or 0) >= caller.tokens_per_minute:
        raise OpenAIError(
            429,
            f"Rate limit reached for key '{caller.name}': {caller.tokens_per_minute} tokens per minute. "
            f"Retry in {left} s.",
            code="rate_limit_exceeded",
            headers=headers,
        )


async def budget_spend(caller: Caller, tokens: int) -> None:
    """Add a finished request's tokens (prompt and completion) to this minute's count."""
    if caller.tokens_per_minute is None or tokens <= 0:
        return
    minute, _ = _window()
    key = f"{BUDGET_PREFIX}{caller.key_id}:tokens:{minute}"
    pipe = async_redis().pipeline(transaction=False)
    pipe.incrby(key, tokens)
    pipe.expire(key, 120)
    await pipe.execute()
