"""The event contract: eight payloads and the envelope, declared once.

Each envelope type is a ``msgspec.Struct`` tagged by ``type``, so one C call
(``msgspec.convert`` for Python objects, ``msgspec.json.decode`` for bytes
off the stream) picks the payload declaration and checks every rule. This
module imports nothing from Django: workers load it without a database.
"""

from __future__ import annotations

import sys
import time
import typing
import uuid
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

import msgspec
import msgspec.inspect as mi
from msgspec import UNSET, Meta, UnsetType

from mlxserve.contract.validation import (
    INT64_MAX,
    Issue,
    ValidationFailed,
    collect_issues,
    failure_for,
    is_plain_json,
    json_failure,
    json_value_issues,
    messages,
)

_FLOAT_MAX = sys.float_info.max

NonEmpty = Annotated[str, Meta(min_length=1)]
PositiveInt = Annotated[int, Meta(ge=1, le=INT64_MAX)]
NonNegativeInt = Annotated[int, Meta(ge=0, le=INT64_MAX)]
# The bounds are what makes msgspec reject NaN and +/-Infinity on the fast path.
FiniteNumber = Annotated[float, Meta(ge=-_FLOAT_MAX, le=_FLOAT_MAX)]
DurationMs = Annotated[float, Meta(ge=0, le=_FLOAT_MAX, extra=messages(ge="Duration cannot be negative"))]
Throughput = Annotated[float, Meta(ge=0, le=_FLOAT_MAX, extra=messages(ge="Throughput cannot be negative"))]
Quantization = Literal["none", "int8", "int4"]
RuntimeStateName = Literal["ready", "busy", "error", "shutdown"]
RUNTIME_STATES: tuple[str, ...] = typing.get_args(RuntimeStateName)
RuntimeState = Annotated[
    RuntimeStateName, Meta(extra=messages(enum="Status must be one of: " + ", ".join(RUNTIME_STATES)))
]
Metadata = dict[str, Any]
Prompt = str | dict[str, Any]
Source = Annotated[str, Meta(min_length=1, max_length=200)]

# Timestamps are epoch milliseconds. Anything before 2000-01-01 is almost surely seconds
# (or a clock that was never set): stored, retention would delete it within the hour.
TIMESTAMP_MIN_MS = 946_684_800_000
TIMESTAMP_MIN_MESSAGE = "Timestamp must be epoch milliseconds (2000-01-01 or later)"
# Ahead of the receiving clock by more than this is refused: a far-future event would
# sit on top of the newest-first history and keep its worker from ever counting as stale.
TIMESTAMP_MAX_AHEAD_MS = 10 * 60 * 1000
TIMESTAMP_FUTURE_MESSAGE = "Timestamp is in the future (more than 10 minutes ahead of the receiving clock)"
Timestamp = Annotated[int, Meta(ge=TIMESTAMP_MIN_MS, le=INT64_MAX, extra=messages(ge=TIMESTAMP_MIN_MESSAGE))]


# gc=False: events hold no reference cycles, so the cyclic GC need not track the
# thousands a second a worker makes (fewer collections on the generation thread).
class Payload(msgspec.Struct, forbid_unknown_fields=True, rename="camel", kw_only=True, gc=False):
    pass


class ModelLoaded(Payload):
    model: NonEmpty
    model_path: NonEmpty
    quantization: Quantization | UnsetType = UNSET
    parameters: PositiveInt | UnsetType = UNSET
    metadata: Metadata | UnsetType = UNSET


class ModelUnloaded(Payload):
    model: NonEmpty
    reason: str | UnsetType = UNSET


class ModelInvalidated(Payload):
    model: NonEmpty
    reason: NonEmpty


class GenerationStarted(Payload):
    model: NonEmpty
    prompt: Prompt
    max_tokens: PositiveInt | UnsetType = UNSET
    metadata: Metadata | UnsetType = UNSET


class TokenGenerated(Payload):
    model: NonEmpty
    token: str
    logprob: FiniteNumber | UnsetType = UNSET
    metadata: Metadata | UnsetType = UNSET


class GenerationCompleted(Payload):
    model: NonEmpty
    tokens_generated: NonNegativeInt
    duration_ms: DurationMs
    throughput: Throughput | UnsetType = UNSET
    metadata: Metadata | UnsetType = UNSET


class Error(Payload):
    error: NonEmpty
    code: str | UnsetType = UNSET
    model: str | UnsetType = UNSET
    metadata: Metadata | UnsetType = UNSET


class RuntimeStatus(Payload):
    status: RuntimeState
    models_loaded: NonNegativeInt
    active_tasks: NonNegativeInt | UnsetType = UNSET
    metadata: Metadata | UnsetType = UNSET


class EnvelopeBase(
    msgspec.Struct, forbid_unknown_fields=True, rename="camel", kw_only=True, tag_field="type", gc=False
):
    id: uuid.UUID
    timestamp: Timestamp
    source: Source
    seq: NonNegativeInt

    @property
    def type(self) -> str:
        """The event type (the envelope's ``type`` on the wire)."""
        return str(self.__struct_config__.tag)


class _LifecycleEnvelope(EnvelopeBase, kw_only=True):
    generation_id: uuid.UUID | None = None


class _GenerationEnvelope(EnvelopeBase, kw_only=True):
    # Required (and not null) for the three events of a generation.
    generation_id: uuid.UUID


class ModelLoadedEnvelope(_LifecycleEnvelope, tag="modelLoaded", kw_only=True):
    payload: ModelLoaded


class ModelUnloadedEnvelope(_LifecycleEnvelope, tag="modelUnloaded", kw_only=True):
    payload: ModelUnloaded


class ModelInvalidatedEnvelope(_LifecycleEnvelope, tag="modelInvalidated", kw_only=True):
    payload: ModelInvalidated


class GenerationStartedEnvelope(_GenerationEnvelope, tag="generationStarted", kw_only=True):
    payload: GenerationStarted


class TokenGeneratedEnvelope(_GenerationEnvelope, tag="tokenGenerated", kw_only=True):
    payload: TokenGenerated


class GenerationCompletedEnvelope(_GenerationEnvelope, tag="generationCompleted", kw_only=True):
    payload: GenerationCompleted


class ErrorEnvelope(_LifecycleEnvelope, tag="error", kw_only=True):
    payload: Error


class RuntimeStatusEnvelope(_LifecycleEnvelope, tag="runtimeStatus", kw_only=True):
    payload: RuntimeStatus


Envelope = (
    ModelLoadedEnvelope
    | ModelUnloadedEnvelope
    | ModelInvalidatedEnvelope
    | GenerationStartedEnvelope
    | TokenGeneratedEnvelope
    | GenerationCompletedEnvelope
    | ErrorEnvelope
    | RuntimeStatusEnvelope
)

ENVELOPE_BY_TYPE: dict[str, type[EnvelopeBase]] = {
    cls.__struct_config__.tag: cls  # type: ignore[misc]
    for cls in Envelope.__args__  # type: ignore[attr-defined]
}
EVENT_TYPES: tuple[str, ...] = tuple(ENVELOPE_BY_TYPE)
GENERATION_EVENT_TYPES = frozenset({"generationStarted", "tokenGenerated", "generationCompleted"})
TYPE_MESSAGE = "Type must be one of: " + ", ".join(EVENT_TYPES)


class _AnyTypeEnvelope(_LifecycleEnvelope, kw_only=True):
    """Envelope fields alone, to report on them when ``type`` itself is wrong."""

    payload: dict[str, Any]


def _free_form_fields(payload_type: type[Payload]) -> tuple[tuple[str, str], ...]:
    """Payload fields that may hold an arbitrary JSON object (``dict[str, Any]``)."""

    def holds_object(info: mi.Type) -> bool:
        if isinstance(info, mi.UnionType):
            return any(holds_object(t) for t in info.types)
        return isinstance(info, mi.DictType) and isinstance(info.value_type, mi.AnyType)

    struct_info = mi.type_info(payload_type)
    assert isinstance(struct_info, mi.StructType)
    return tuple((f.name, f.encode_name) for f in struct_info.fields if holds_object(f.type))


_FREE_FORM_FIELDS: dict[type, tuple[tuple[str, str], ...]] = {
    payload_type: _free_form_fields(payload_type) for payload_type in Payload.__subclasses__()
}

_DECODER: msgspec.json.Decoder[Envelope] = msgspec.json.Decoder(Envelope)  # type: ignore[arg-type]


def envelope_issues(obj: Any) -> list[Issue]:
    """Every problem with ``obj`` as an envelope; empty when it is valid."""
    if not isinstance(obj, dict):
        return [Issue([], "Must be an object", "invalid_type")]
    event_type = obj.get("type", UNSET)
    declaration = ENVELOPE_BY_TYPE.get(event_type) if isinstance(event_type, str) else None
    if declaration is not None:
        issues = collect_issues(obj, declaration)
    else:
        issue = (
            Issue(["type"], "Required", "required")
            if event_type is UNSET
            else Issue(["type"], TYPE_MESSAGE, "invalid_enum")
        )
        issues = [issue, *collect_issues(obj, _AnyTypeEnvelope)]
    timestamp = obj.get("timestamp")
    if type(timestamp) is int and timestamp > _now_ms() + TIMESTAMP_MAX_AHEAD_MS:
        issues.append(_future_issue())
    return issues


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _future_issue() -> Issue:
    return Issue(["timestamp"], TIMESTAMP_FUTURE_MESSAGE, "in_future")


def envelope_validate(obj: Any, *, now_ms: int | None = None) -> Envelope:
    """The hot-path validator: a Python mapping in, a typed envelope out.

    ``now_ms`` is the receiving clock (read here when not given; a caller validating
    many events, or one that has just read the clock, passes it).

    Raises ``ValidationFailed`` (the error object) listing every issue.
    """
    # Dispatch on ``type`` by hand: ``convert`` to the tagged union re-reads the
    # union's declaration on every call (about 8 us), one Struct is cached (<1 us).
    try:
        envelope: Envelope = msgspec.convert(obj, ENVELOPE_BY_TYPE[obj["type"]], strict=True)  # type: ignore[assignment]
    except (msgspec.ValidationError, KeyError, TypeError) as exc:
        raise _failure(obj, exc) from None
    # JSON text cannot hold NaN or a datetime, but a Python caller's free-form
    # objects (metadata, a structured prompt) can: msgspec takes them as Any.
    return _undeclared_rules_checked(envelope, now_ms, is_plain_json)


def envelope_decode(raw: bytes | str, *, now_ms: int | None = None) -> Envelope:
    """Bytes off the stream or the wire to a typed envelope, or ``ValidationFailed``.

    Whatever ``raw`` holds (not UTF-8, nested 100,000 deep, not JSON at all), the
    answer is an envelope or ``ValidationFailed``: never another exception.
    """
    try:
        envelope: Envelope = _DECODER.decode(raw)
    except msgspec.ValidationError as exc:
        # The typed decoder can stop at a wrong type before it reaches broken JSON further on.
        try:
            obj = msgspec.json.decode(raw)
        except Exception as json_exc:
            raise json_failure(json_exc) from None
        raise _failure(obj, exc) from None
    except Exception as exc:
        raise json_failure(exc) from None
    # Decoded free-form objects are JSON, but of any depth. Most are flat (a few numbers
    # and strings), which one loop over the values tells; only the others are walked.
    return _undeclared_rules_checked(envelope, now_ms, _flat)


def _undeclared_rules_checked(
    envelope: Envelope, now_ms: int | None, looks_fine: Callable[[dict[str, Any]], bool]
) -> Envelope:
    """The rules no static declaration holds: free-form objects hold finite JSON values
    nested at most 64 deep (walked only where ``looks_fine`` cannot tell), and the
    timestamp is not too far ahead of the receiving clock."""
    for name, wire_name in _FREE_FORM_FIELDS[type(envelope.payload)]:
        value = getattr(envelope.payload, name)
        if type(value) is dict and not looks_fine(value):
            issues: list[Issue] = []
            json_value_issues(value, ["payload", wire_name], issues)
            if issues:
                raise ValidationFailed(issues)
    if envelope.timestamp > (_now_ms() if now_ms is None else now_ms) + TIMESTAMP_MAX_AHEAD_MS:
        raise ValidationFailed([_future_issue()])
    return envelope


PAYLOAD_BY_TYPE: dict[str, type[Payload]] = {
    event_type: next(f.type for f in msgspec.structs.fields(envelope) if f.name == "payload")
    for event_type, envelope in ENVELOPE_BY_TYPE.items()
}


def payload_validate(event_type: str, payload: Any) -> Payload:
    """One payload of ``event_type`` alone, by the rules it has inside an envelope (paths start
    at the payload's own fields). Raises ``ValidationFailed``."""
    struct = PAYLOAD_BY_TYPE.get(event_type)
    if struct is None:
        raise ValidationFailed([Issue(["type"], TYPE_MESSAGE, "invalid_enum")])
    try:
        result = msgspec.convert(payload, struct, strict=True)
    except (msgspec.ValidationError, TypeError) as exc:
        raise failure_for(payload, struct, exc) from None
    issues: list[Issue] = []
    for name, wire_name in _FREE_FORM_FIELDS[struct]:
        value = getattr(result, name)
        if type(value) is dict and not is_plain_json(value):
            json_value_issues(value, [wire_name], issues)
    if issues:
        raise ValidationFailed(issues)
    return result


def _flat(value: dict[str, Any]) -> bool:
    for item in value.values():  # noqa: SIM110 - a plain loop is the cheapest here
        if type(item) is dict or type(item) is list:
            return False
    return True


_TOKEN_BATCH: msgspec.json.Decoder[list[TokenGeneratedEnvelope]] = msgspec.json.Decoder(
    list[TokenGeneratedEnvelope]
)


def token_envelopes_decode(bodies: Sequence[bytes], *, now_ms: int | None = None) -> list[Envelope]:
    """A batch of ``tokenGenerated`` JSON bodies to typed envelopes, every rule of
    ``envelope_decode`` checked (the declarations in one C call, then the rest per event).
    Raises ``msgspec.ValidationError`` or ``ValidationFailed``; no message is worked out:
    a caller that needs one decodes the events one by one."""
    now = _now_ms() if now_ms is None else now_ms
    return [
        _undeclared_rules_checked(envelope, now, _flat)
        for envelope in _TOKEN_BATCH.decode(b"[" + b",".join(bodies) + b"]")
    ]


class TokenRules(msgspec.Struct, frozen=True):
    """What may differ from one ``tokenGenerated`` event of a generation to the next (seq,
    timestamp, token, logprob) and its bounds, read from the declarations above.

    A worker checks a batch of one generation's token events with it after one of them has
    been decoded in full (which holds everything the batch shares: id form, source,
    generation id, model, no metadata): what the decoder would say of the others, in a
    fraction of the time. ``token_rules()`` is None when a declaration holds a rule this
    check does not know; then every event is decoded.
    """

    seq: tuple[int, int]
    timestamp: tuple[int, int]
    token_length: tuple[int, int]
    logprob: tuple[float, float]

    def passes(
        self,
        seqs: Sequence[int],
        timestamps: Sequence[int],
        tokens: Sequence[str],
        logprobs: Sequence[float],
        now_ms: int,
    ) -> bool:
        """Whether every event of the batch keeps them (the ``now_ms`` clock's rule included)."""
        (seq_ge, seq_le), (ts_ge, ts_le), (len_ge, len_le), (lp_ge, lp_le) = (
            self.seq,
            self.timestamp,
            self.token_length,
            self.logprob,
        )
        for value in (*seqs, *timestamps):  # an int subclass (a bool) is refused as the decoder would
            if type(value) is not int:
                return False
        if not (seq_ge <= min(seqs) and max(seqs) <= seq_le):
            return False
        if not (ts_ge <= min(timestamps) and max(timestamps) <= min(ts_le, now_ms + TIMESTAMP_MAX_AHEAD_MS)):
            return False
        lengths = len_ge > 0 or len_le < sys.maxsize
        for token, logprob in zip(tokens, logprobs, strict=True):
            # A NaN fails both comparisons; an int is refused as the strict decoder would.
            if type(token) is not str or type(logprob) is not float or not (lp_ge <= logprob <= lp_le):
                return False
            if lengths and not (len_ge <= len(token) <= len_le):
                return False
        return True


def token_rules(
    envelope_type: type[EnvelopeBase] = TokenGeneratedEnvelope, payload_type: type[Payload] = TokenGenerated
) -> TokenRules | None:
    """The per-token rules of ``tokenGenerated`` (its two declarations), or None when they hold
    one this check cannot apply (a pattern, a bound it does not read, a field it does not know)."""

    def declared(struct: type) -> dict[str, mi.Type]:
        info = mi.type_info(struct)
        assert isinstance(info, mi.StructType)
        return {f.name: f.type for f in info.fields}

    def set_part(info: mi.Type) -> mi.Type | None:  # messages aside; a union (null allowed?): unknown
        if isinstance(info, mi.Metadata):
            info = info.type
        return None if isinstance(info, mi.UnionType) else info

    def int_bounds(info: mi.Type | None) -> tuple[int, int] | None:
        if not isinstance(info, mi.IntType) or info.gt is not None or info.lt is not None or info.multiple_of:
            return None
        return (
            info.ge if info.ge is not None else -INT64_MAX - 1,
            info.le if info.le is not None else INT64_MAX,
        )

    envelope, payload = declared(envelope_type), declared(payload_type)
    if set(envelope) != {"id", "timestamp", "source", "seq", "generation_id", "payload"}:
        return None
    if set(payload) != {"model", "token", "logprob", "metadata"}:
        return None
    token, logprob = set_part(payload["token"]), set_part(payload["logprob"])
    seq, timestamp = int_bounds(set_part(envelope["seq"])), int_bounds(set_part(envelope["timestamp"]))
    if not isinstance(token, mi.StrType) or token.pattern is not None:
        return None
    if not isinstance(logprob, mi.FloatType) or logprob.gt is not None or logprob.lt is not None:
        return None
    if logprob.multiple_of or logprob.ge is None or logprob.le is None or seq is None or timestamp is None:
        return None
    return TokenRules(
        seq=seq,
        timestamp=timestamp,
        token_length=(
            token.min_length or 0,
            token.max_length if token.max_length is not None else sys.maxsize,
        ),
        logprob=(float(logprob.ge), float(logprob.le)),
    )


def envelope_encode(envelope: EnvelopeBase) -> bytes:
    return msgspec.json.encode(envelope)


def envelope_to_wire(envelope: EnvelopeBase) -> dict[str, Any]:
    wire: dict[str, Any] = msgspec.to_builtins(envelope)
    return wire


def _failure(obj: Any, exc: Exception) -> ValidationFailed:
    issues = envelope_issues(obj)
    if issues:
        return ValidationFailed(issues)
    return failure_for(obj, _AnyTypeEnvelope, exc)
