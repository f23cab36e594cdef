"""The contract's per-token rules (``token_rules``), read from the declarations, against the
decoder: the same verdict on every event of a batch, and they step aside for what they do not know."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlxserve.contract.events import (
    envelope_decode,
    envelope_encode,
    envelope_validate,
    token_rules,
)
from mlxserve.contract.validation import ValidationFailed
from tests.factories import make_envelope

_TOKEN_VALUES = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 2**63 - 1, 2**63, -1, 946_684_800_000, 946_684_799_999, True, False]),
    st.sampled_from([time.time_ns() // 1_000_000 + 11 * 60_000, 1.8e12, -0.0, 1.7976931348623157e308]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.none(),
)


_VALID_ROW = st.tuples(
    st.integers(min_value=0, max_value=2**63 - 1),  # seq
    st.integers(min_value=946_684_800_000, max_value=int(time.time() * 1000) + 9 * 60_000),  # timestamp
    st.text(max_size=4),  # token
    st.floats(min_value=-1e308, max_value=0),  # logprob
)


@st.composite
def _token_rows(draw: Any) -> list[tuple[Any, Any, Any, Any]]:
    """A few valid rows, and in some of them one field given a value a buggy caller might send."""
    rows = draw(st.lists(_VALID_ROW, min_size=1, max_size=4))
    for _ in range(draw(st.integers(min_value=0, max_value=2))):
        at, field = draw(st.integers(0, len(rows) - 1)), draw(st.integers(0, 3))
        row = list(rows[at])
        row[field] = draw(_TOKEN_VALUES)
        rows[at] = tuple(row)
    return rows


@settings(max_examples=600, deadline=None)
@given(_token_rows())
def test_token_rules_say_what_the_decoder_says_of_each_event(rows: list[tuple[Any, Any, Any, Any]]) -> None:
    """Workers check a batch of token events with ``token_rules`` instead of decoding each one:
    for any values a buggy caller could put in seq, timestamp, token and logprob, the rules never
    pass a batch the decoder would refuse an event of, and pass every batch it accepts whose
    logprobs are floats (an int logprob the rules leave to the one-by-one path, which decides)."""
    rules = token_rules()
    assert rules is not None
    now_ms = time.time_ns() // 1_000_000
    decoder_accepts = True
    for seq, timestamp, token, logprob in rows:
        body = msgspec.json.encode(
            {
                "type": "tokenGenerated",
                "id": str(uuid.uuid4()),
                "timestamp": timestamp,
                "source": "h/w",
                "seq": seq,
                "generationId": str(uuid.UUID(int=1)),
                "payload": {"model": "m", "token": token, "logprob": logprob},
            }
        )
        try:
            envelope_decode(body, now_ms=now_ms)
        except ValidationFailed:
            decoder_accepts = False
    seqs, timestamps, tokens, logprobs = zip(*rows, strict=True)
    passes = rules.passes(seqs, timestamps, tokens, logprobs, now_ms)
    # NaN and infinities go to JSON as null, which the decoder refuses; so do the rules.
    assert passes <= decoder_accepts
    if all(type(value) is float for value in logprobs):
        assert passes == decoder_accepts


class _PatternToken(msgspec.Struct, kw_only=True):
    model: str
    token: Annotated[str, msgspec.Meta(pattern="^[a-z]*$")]
    logprob: float = 0.0
    metadata: dict[str, Any] = {}


class _ExtraField(msgspec.Struct, kw_only=True):
    model: str
    token: str
    logprob: float = 0.0
    metadata: dict[str, Any] = {}
    rank: int = 0


def test_token_rules_step_aside_for_a_rule_they_do_not_know() -> None:
    """A declaration the rules cannot apply (a pattern, a field more) gives no rules: then
    workers decode every token event, never pass one the decoder would refuse."""
    assert token_rules(payload_type=_PatternToken) is None  # type: ignore[arg-type]
    assert token_rules(payload_type=_ExtraField) is None  # type: ignore[arg-type]
    assert token_rules(envelope_type=_ExtraField) is None  # type: ignore[arg-type]
    rules = token_rules()
    assert rules is not None and rules.seq == (0, 2**63 - 1) and rules.logprob[0] < -1e308


_EDGES: list[Any] = [
    0,
    1,
    -1,
    2**63 - 1,
    2**63,
    -(2**63),
    2**70,
    True,
    False,
    None,
    "",
    "x",
    0.0,
    -0.0,
    1.5,
    -1.5,
    float("nan"),
    float("inf"),
    float("-inf"),
    1.7976931348623157e308,
    -1.7976931348623157e308,
    946_684_799_999,
    946_684_800_000,
    1.8e12,
    [],
    {},
]


@pytest.mark.parametrize("field", ["seq", "timestamp", "token", "logprob"])
def test_token_rules_at_each_fields_edges(field: str) -> None:
    """Each edge value in each field, the others valid, first and last of a batch: the rules
    decide as the decoder does (an int logprob aside: left to the one-by-one path)."""
    rules = token_rules()
    assert rules is not None
    now_ms = time.time_ns() // 1_000_000
    edges = [*_EDGES, now_ms + 9 * 60_000, now_ms + 11 * 60_000]
    index = ["seq", "timestamp", "token", "logprob"].index(field)
    for value in edges:
        for at in (0, 2):
            rows = [[5, now_ms, "a", -0.5], [6, now_ms, "b", -1.0], [7, now_ms, "c", -2.0]]
            rows[at][index] = value
            body = msgspec.json.encode(
                {
                    "type": "tokenGenerated",
                    "id": str(uuid.uuid4()),
                    "timestamp": rows[at][1],
                    "source": "h/w",
                    "seq": rows[at][0],
                    "generationId": str(uuid.UUID(int=1)),
                    "payload": {"model": "m", "token": rows[at][2], "logprob": rows[at][3]},
                }
            )
            try:
                envelope_decode(body, now_ms=now_ms)
                accepts = True
            except ValidationFailed:
                accepts = False
            seqs, timestamps, tokens, logprobs = zip(*rows, strict=True)
            passes = rules.passes(seqs, timestamps, tokens, logprobs, now_ms)
            if field == "logprob" and type(value) is int:
                assert not passes, value
            else:
                assert passes == accepts, (field, value, at)


class _NullableLogprob(msgspec.Struct, kw_only=True):
    model: str
    token: str
    logprob: float | None = None
    metadata: dict[str, Any] = {}


def test_token_rules_step_aside_for_a_union() -> None:
    assert token_rules(payload_type=_NullableLogprob) is None  # type: ignore[arg-type]


def test_a_batch_of_token_events_decodes_with_every_rule() -> None:
    """``token_envelopes_decode`` (a batch in one call) refuses what ``envelope_decode`` refuses,
    wherever in the batch: the clock's rule and free-form metadata included."""
    from mlxserve.contract.events import token_envelopes_decode

    now_ms = time.time_ns() // 1_000_000

    def body(**changes: Any) -> bytes:
        return envelope_encode(envelope_validate(make_envelope("tokenGenerated", **changes), now_ms=now_ms))

    good = [body(seq=1), body(seq=2)]
    assert [e.seq for e in token_envelopes_decode(good, now_ms=now_ms)] == [1, 2]
    ahead = msgspec.json.encode({**msgspec.json.decode(good[1]), "timestamp": now_ms + 11 * 60_000})
    with pytest.raises(ValidationFailed, match="in the future"):
        token_envelopes_decode([good[0], ahead, good[1]], now_ms=now_ms)
    deep: Any = 1
    for _ in range(70):
        deep = [deep]
    nested = msgspec.json.decode(good[0])
    nested["payload"]["metadata"] = {"k": deep}
    with pytest.raises(ValidationFailed):
        token_envelopes_decode([good[0], msgspec.json.encode(nested)], now_ms=now_ms)
    with pytest.raises(msgspec.ValidationError):
        token_envelopes_decode([good[0], body(seq=3).replace(b'"seq":3', b'"seq":-3')], now_ms=now_ms)
