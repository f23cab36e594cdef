"""Generation tasks signed by the control plane and checked by the workers.

Celery's queue is written by anyone with the broker's credentials, every worker host included: a
host could queue a well-formed task (for a generation of someone else's, or a model directory on
another Mac) and steer another worker. With ``MLXSERVE_TASK_SIGNING_KEY`` on the control plane
(an Ed25519 private key) and the matching ``MLXSERVE_TASK_VERIFY_KEY`` on the workers (its public
key), each task carries a signature over its arguments and a worker runs only what verifies:
what a host can read on the queue it cannot forge, and a task it copies only runs a generation
the control plane asked for (bounded by ``MLXSERVE_MAX_ATTEMPTS``). ``python manage.py
create_task_keys`` makes a pair.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

SIGNATURE = "signature"


def signed_bytes(arguments: dict[str, Any]) -> bytes:
    """What is signed: the task's keyword arguments but the signature, as sorted JSON."""
    return msgspec.json.encode({k: v for k, v in arguments.items() if k != SIGNATURE}, order="sorted")


def task_sign(arguments: dict[str, Any]) -> dict[str, Any]:
    """``arguments`` with their signature, when the control plane has a signing key."""
    if not settings.TASK_SIGNING_KEY:
        return arguments
    key = Ed25519PrivateKey.from_private_bytes(_raw(settings.TASK_SIGNING_KEY, "MLXSERVE_TASK_SIGNING_KEY"))
    signature = base64.b64encode(key.sign(signed_bytes(arguments))).decode("ascii")
    return {**arguments, SIGNATURE: signature}


def task_signature_refusal(arguments: dict[str, Any]) -> str | None:
    """Why a worker must not run a task with these arguments (None: it may). Workers without a
    verify key run every task, as before."""
    if not settings.TASK_VERIFY_KEY:
        return None
    signature = arguments.get(SIGNATURE)
    if not isinstance(signature, str):
        return "not signed by the control plane"
    key = Ed25519PublicKey.from_public_bytes(_raw(settings.TASK_VERIFY_KEY, "MLXSERVE_TASK_VERIFY_KEY"))
    try:
        key.verify(base64.b64decode(signature, validate=True), signed_bytes(arguments))
    except (InvalidSignature, binascii.Error, ValueError):
        return "its signature does not verify with the control plane's key"
    return None


def task_keys() -> tuple[str, str]:
    """A new pair: (signing key for the control plane, verify key for the workers), base64."""
    private = Ed25519PrivateKey.generate()
    raw_private = private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    raw_public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw_private).decode(), base64.b64encode(raw_public).decode()


def _raw(text: str, name: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error:
        raw = b""
    if len(raw) != 32:
        raise ImproperlyConfigured(
            f"{name} must be a base64 Ed25519 key (32 bytes): see manage.py create_task_keys"
        )
    return raw
