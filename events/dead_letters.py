"""Dead letters: stream entries that could not be stored, kept with their error, replayable."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from django.db import transaction
from django.utils import timezone

from events.models import (
    DeadLetter,
)
from events.storage import events_store

logger = logging.getLogger(__name__)


class ReplayRefused(Exception):
    """A dead letter that still cannot be stored; ``error`` is why (also saved on it)."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error["message"])
        self.error = error


def dead_letter_replay(letter: DeadLetter) -> None:
    """Validate a dead letter again and store it as an event (say, after a producer or
    contract fix, or once its timestamp is no longer ahead of the clock).

    Raises ``ReplayRefused`` with the current error when it still cannot be stored:
    nothing is stored then, and the letter keeps that error.
    """
    body = letter.body.encode()
    try:
        with transaction.atomic():
            outcome = events_store([(letter.stream_id, body)])
            if outcome.dead_letters:
                raise ReplayRefused(outcome.dead_letters[0].error)  # rolls the new dead letter back
            letter.replayed_at = timezone.now()
            letter.save(update_fields=["replayed_at"])
    except ReplayRefused as refused:
        letter.error = refused.error
        letter.save(update_fields=["error"])
        raise


def dead_letters_replay(letters: Iterable[DeadLetter]) -> tuple[int, int]:
    """Replay each dead letter not yet replayed. Returns (stored, still refused)."""
    stored = refused = 0
    for letter in letters:
        if letter.replayed_at is not None:
            continue
        try:
            dead_letter_replay(letter)
            stored += 1
        except ReplayRefused:
            refused += 1
    return stored, refused
