"""The prompt privacy policy: how prompts are kept at rest.

Applied where a prompt is stored: the ingester, to each ``generationStarted``
payload, and ``POST /api/generations/``, to the recorded request (the worker
gets the prompt in the task message, which Redis drops once it is done).
Whatever the mode, what is stored is still a valid payload: a string or an object.
"""

from __future__ import annotations

from typing import Any

import msgspec
from django.conf import settings
from django.utils.crypto import salted_hmac

from events.models import PromptPolicy

HASH_PREFIX = "hmac-sha256:"


def prompt_policy_get() -> PromptPolicy:
    return PromptPolicy.load()


def prompt_redact(prompt: str | dict[str, Any], policy: PromptPolicy) -> str | dict[str, Any]:
    """The prompt as ``policy`` keeps it.

    - ``keep``: unchanged.
    - ``truncate``: the first ``truncate_chars`` characters (an object is cut as its JSON text).
    - ``hash``: ``hmac-sha256:<hex>``, keyed with ``MLXSERVE_PROMPT_HASH_KEY``, so equal
      prompts can be matched but short ones cannot be guessed by hashing candidates
      without the key.
    - ``drop``: an empty string.
    """
    if policy.mode == PromptPolicy.KEEP:
        return prompt
    text = prompt if isinstance(prompt, str) else msgspec.json.encode(prompt, order="sorted").decode()
    if policy.mode == PromptPolicy.TRUNCATE:
        if isinstance(prompt, str) and len(prompt) <= policy.truncate_chars:
            return prompt
        return text[: policy.truncate_chars]
    if policy.mode == PromptPolicy.HASH:
        return (
            HASH_PREFIX
            + salted_hmac(
                "mlxserve.prompt", text, secret=settings.PROMPT_HASH_KEY, algorithm="sha256"
            ).hexdigest()
        )
    return ""
