from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlxserve.contract.events import (
    EVENT_TYPES,
    envelope_decode,
    envelope_encode,
    envelope_issues,
    envelope_to_wire,
    envelope_validate,
)
from mlxserve.contract.validation import ValidationFailed
from tests.factories import ACCEPTED, DROP, REJECTED, make_envelope, with_payload


def issues(envelope: dict[str, Any]) -> list[tuple[list[Any], str, str]]:
    with pytest.raises(ValidationFailed) as info:
        envelope_validate(envelope)
    return [(i.path, i.message, i.code) for i in info.value.issues]


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_every_event_type_validates_and_round_trips(event_type: str) -> None:
    envelope = make_envelope(event_type)
    validated = envelope_validate(envelope)
    assert envelope_to_wire(validated) == envelope
    assert envelope_to_wire(envelope_decode(envelope_encode(validated))) == envelope


@pytest.mark.parametrize(("event_type", "field", "value", "message"), REJECTED)
def test_payload_rules_reject_with_the_exact_message(
    event_type: str, field: str, value: Any, message: str
) -> None:
    found = issues(with_payload(event_type, **{field: value}))
    assert [(path, msg) for path, msg, _ in found] == [(["payload", field], message)]


@pytest.mark.parametrize(("event_type", "field", "value"), ACCEPTED)
def test_payload_rules_accept_the_edges(event_type: str, field: str, value: Any) -> None:
    envelope_validate(with_payload(event_type, **{field: value}))


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_every_payload_rejects_unknown_fields(event_type: str) -> None:
    assert issues(with_payload(event_type, surprise=1)) == [
        (["payload", "surprise"], "Unknown field 'surprise'", "unknown_field")
    ]


def test_model_invalidated_payload_has_no_metadata() -> None:
    assert issues(with_payload("modelInvalidated", metadata={}))[0][1] == "Unknown field 'metadata'"


# -- the envelope ----------------------------------------------------------------


ENVELOPE_REJECTED = [
    ("id", "not-a-uuid", "Must be a UUID"),
    ("id", None, "Must be a UUID"),
    ("id", DROP, "Required"),
    ("timestamp", 0, "Timestamp must be epoch milliseconds (2000-01-01 or later)"),
    ("timestamp", 946_684_799_999, "Timestamp must be epoch milliseconds (2000-01-01 or later)"),
    ("timestamp", 1_764_115_200, "Timestamp must be epoch milliseconds (2000-01-01 or later)"),  # seconds
    ("timestamp", 1764115200000.5, "Must be an integer"),
    ("timestamp", "1764115200000", "Must be an integer"),
    ("source", "", "Cannot be empty"),
    ("source", "s" * 201, "Cannot exceed 200 characters"),
    ("source", None, "Must be a string"),
    ("seq", -1, "Cannot be negative"),
    ("seq", None, "Must be an integer"),
    ("seq", DROP, "Required"),
    ("generationId", "nope", "Must be a UUID"),
    ("payload", DROP, "Required"),
    ("payload", "text", "Must be an object"),
]


@pytest.mark.parametrize(("field", "value", "message"), ENVELOPE_REJECTED)
def test_envelope_rules_reject_with_the_exact_message(field: str, value: Any, message: str) -> None:
    envelope = make_envelope("runtimeStatus")
    if value is DROP:
        del envelope[field]
    else:
        envelope[field] = value
    assert [(p, m) for p, m, _ in issues(envelope)] == [([field], message)]


@pytest.mark.parametrize(
    ("field", "value"),
    [("source", "s"), ("source", "s" * 200), ("seq", 0), ("timestamp", 946_684_800_000)],
)
def test_envelope_accepts_the_edges(field: str, value: Any) -> None:
    envelope_validate(make_envelope("runtimeStatus", **{field: value}))


@pytest.mark.parametrize("event_type", ["generationStarted", "tokenGenerated", "generationCompleted"])
def test_generation_events_need_a_generation_id(event_type: str) -> None:
    missing = make_envelope(event_type)
    del missing["generationId"]
    assert issues(missing) == [(["generationId"], "Required", "required")]
    assert issues(make_envelope(event_type, generationId=None)) == [
        (["generationId"], "Must be a UUID", "invalid_uuid")
    ]


@pytest.mark.parametrize(
    "event_type", ["modelLoaded", "modelUnloaded", "modelInvalidated", "error", "runtimeStatus"]
)
def test_other_events_may_omit_or_null_the_generation_id(event_type: str) -> None:
    envelope_validate(make_envelope(event_type, generationId=None))
    missing = make_envelope(event_type)
    del missing["generationId"]
    envelope_validate(missing)


def test_an_unknown_type_is_named_and_the_rest_still_checked() -> None:
    found = issues(make_envelope("runtimeStatus", type="modelExploded", seq=-1))
    assert found[0] == (
        ["type"],
        "Type must be one of: modelLoaded, modelUnloaded, modelInvalidated, generationStarted, "
        "tokenGenerated, generationCompleted, error, runtimeStatus",
        "invalid_enum",
    )
    assert found[1] == (["seq"], "Cannot be negative", "too_small")


def test_a_missing_type_is_required() -> None:
    envelope = make_envelope("error")
    del envelope["type"]
    assert issues(envelope)[0] == (["type"], "Required", "required")


def test_envelope_rejects_unknown_fields() -> None:
    assert issues(make_envelope("error", priority="high")) == [
        (["priority"], "Unknown field 'priority'", "unknown_field")
    ]


@pytest.mark.parametrize("value", [None, [], "envelope", 5])
def test_an_envelope_must_be_an_object(value: Any) -> None:
    assert issues(value) == [([], "Must be an object", "invalid_type")]  # type: ignore[arg-type]


def test_the_error_object_lists_every_issue_with_field_and_path() -> None:
    envelope = with_payload("generationStarted", maxTokens=0, prompt=None, extra=True)
    envelope["source"] = ""
    with pytest.raises(ValidationFailed) as info:
        envelope_validate(envelope)
    assert info.value.as_error() == {
        "code": "InvalidParams",
        "message": "Validation error on field 'source': Cannot be empty",
        "details": {
            "field": "source",
            "issues": [
                {"path": ["source"], "message": "Cannot be empty", "code": "too_small"},
                {"path": ["payload", "prompt"], "message": "Must be a string", "code": "invalid_type"},
                {
                    "path": ["payload", "maxTokens"],
                    "message": "Must be a positive integer",
                    "code": "too_small",
                },
                {"path": ["payload", "extra"], "message": "Unknown field 'extra'", "code": "unknown_field"},
            ],
        },
    }


def test_python_metadata_must_be_json() -> None:
    found = issues(with_payload("tokenGenerated", metadata={"t": float("nan"), "when": object(), 3: "x"}))
    assert found == [
        (["payload", "metadata", "t"], "Must be a finite number", "not_finite"),
        (["payload", "metadata", "when"], "Must be a JSON value", "invalid_type"),
        (["payload", "metadata", "3"], "Keys must be strings", "invalid_type"),
    ]


def test_a_structured_prompt_must_be_json_too() -> None:
    assert issues(with_payload("generationStarted", prompt={"temperature": float("inf")})) == [
        (["payload", "prompt", "temperature"], "Must be a finite number", "not_finite")
    ]


def test_integers_beyond_64_bits_are_refused() -> None:
    assert issues(make_envelope("error", timestamp=2**63))[0][1] == "Cannot exceed 9223372036854775807"


def test_decoding_bytes_reports_bad_json_and_bad_envelopes() -> None:
    with pytest.raises(ValidationFailed) as info:
        envelope_decode(b'{"id": NaN}')
    assert info.value.issues[0].code == "invalid_json"
    with pytest.raises(ValidationFailed) as info:
        envelope_decode(msgspec.json.encode(make_envelope("tokenGenerated", seq=-1)))
    assert info.value.issues[0].message == "Cannot be negative"
    with pytest.raises(ValidationFailed) as info:
        envelope_decode(b'{"payload": {"model": "m"}, "type": "nope"}')
    assert info.value.field == "type"


def test_a_uuid_object_is_as_good_as_its_text() -> None:
    envelope_validate(make_envelope("error", id=uuid.uuid4(), generationId=uuid.uuid4()))


# The fast path (msgspec) and the thorough walk must agree on every input:
# valid for one exactly when the other finds no issue.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def mutated_envelopes(draw: st.DrawFn) -> Any:
    envelope = make_envelope(draw(st.sampled_from(EVENT_TYPES)))
    target = draw(st.sampled_from(["envelope", "payload"]))
    container = envelope if target == "envelope" else envelope["payload"]
    keys = [*container.keys(), "unknownField"]
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        key = draw(st.sampled_from(keys))
        if draw(st.booleans()):
            container.pop(key, None)
        else:
            container[key] = draw(json_values)
    return envelope


@settings(max_examples=400, deadline=None)
@given(mutated_envelopes())
def test_fast_path_and_thorough_walk_agree(envelope: Any) -> None:
    try:
        envelope_validate(envelope)
        fast_ok = True
    except ValidationFailed:
        fast_ok = False
    assert fast_ok == (envelope_issues(envelope) == [])


def test_decoding_a_wrong_type_ahead_of_broken_json_reports_the_json() -> None:
    with pytest.raises(ValidationFailed) as info:
        envelope_decode(b"[not json")
    assert info.value.issues[0].code == "invalid_json"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def test_a_timestamp_up_to_ten_minutes_ahead_is_accepted_for_clock_skew() -> None:
    envelope = make_envelope("runtimeStatus", timestamp=now_ms() + 9 * 60_000)
    assert envelope_validate(envelope).timestamp == envelope["timestamp"]
    assert envelope_decode(msgspec.json.encode(envelope)).timestamp == envelope["timestamp"]


@pytest.mark.parametrize("timestamp", ["in 10 minutes and 5 seconds", "in a century", "at the end of int64"])
def test_a_timestamp_in_the_future_is_refused_on_every_path(timestamp: str) -> None:
    moments = {
        "in 10 minutes and 5 seconds": now_ms() + 605_000,
        "in a century": now_ms() + 100 * 365 * 86_400_000,
        "at the end of int64": 2**63 - 1,
    }
    envelope = make_envelope("runtimeStatus", timestamp=moments[timestamp])
    future = "Timestamp is in the future (more than 10 minutes ahead of the receiving clock)"
    for validate_one in (envelope_validate, lambda e: envelope_decode(msgspec.json.encode(e))):
        with pytest.raises(ValidationFailed) as caught:
            validate_one(envelope)
        assert caught.value.as_error()["details"]["issues"] == [
            {"path": ["timestamp"], "message": future, "code": "in_future"}
        ]


def test_a_future_timestamp_is_listed_beside_the_other_problems() -> None:
    envelope = make_envelope("runtimeStatus", timestamp=now_ms() + 3_600_000, seq=-1)
    with pytest.raises(ValidationFailed) as caught:
        envelope_validate(envelope)
    assert [i.path for i in caught.value.issues] == [["seq"], ["timestamp"]]


def test_the_contract_documents_every_field_rule_and_message_as_declared() -> None:
    """docs/contract.md's tables are generated from the declarations; stale tables fail here.
    Refresh: python -m mlxserve.contract.reference --write docs/contract.md"""
    from pathlib import Path

    from django.conf import settings

    from mlxserve.contract.reference import document_refreshed, tables

    document = (Path(settings.BASE_DIR) / "docs" / "contract.md").read_text()
    assert document_refreshed(document) == document
    generated = tables()
    # The messages are the validator's own, probed: a few a reader would look for.
    assert "| `prometheusPort` | integer | no | type | `Must be an integer` |" in generated
    assert "`Port must be at least 1024 (non-privileged)`" in generated
    assert "`Duration cannot be negative`" in generated
    assert "`Status must be one of: ready, busy, error, shutdown`" in generated


def test_a_stale_contract_document_is_refreshed_by_the_command(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlxserve.contract import reference

    stale = tmp_path / "contract.md"
    stale.write_text(f"# Contract\n\n{reference.BEGIN}\n| old | table |\n{reference.END}\n\nAfter.\n")
    monkeypatch.setattr("sys.argv", ["reference", "--write", str(stale)])
    assert reference.main() == 0
    text = stale.read_text()
    assert "| old | table |" not in text and "### `tokenGenerated` payload" in text
    assert text.startswith("# Contract\n") and text.endswith("\n\nAfter.\n")

    monkeypatch.setattr("sys.argv", ["reference"])
    assert reference.main() == 0
    assert "### The telemetry config" in capsys.readouterr().out

    stale.write_text("no markers here")
    with pytest.raises(ValueError, match="no generated region"):
        reference.document_refreshed(stale.read_text())
