"""Strict validation for the wire contract.

Every rule is declared once, as a ``msgspec.Struct`` with ``Meta`` constraints
(see ``mlxserve/contract/telemetry.py`` and ``mlxserve/contract/events.py``). Two things read that
declaration:

* the fast path, ``msgspec.convert`` in strict mode, which runs in C and stops
  at the first problem. It is what the worker's hot path and the ingester use;
* ``collect_issues``, which walks the same declaration through
  ``msgspec.inspect`` and lists *every* problem with the exact messages of the
  contract. It only runs once the fast path has said no, so its cost is paid on
  bad input alone.

A field's own messages live in its ``Meta(extra={"messages": {...}})``, keyed
by the constraint (``ge``, ``le``, ``min_length``, ``max_length``,
``pattern``, ``type``, ``enum``); anything not given there falls back to the
defaults below, which are the contract's messages for payload fields.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import msgspec
import msgspec.inspect as mi

PathItem = str | int
StructT = TypeVar("StructT", bound=msgspec.Struct)

INT64_MAX = 2**63 - 1
# How deep a free-form JSON object (metadata, a structured prompt) may nest. Deeper
# values are refused as input: Python's recursion, PostgreSQL's jsonb parser and every
# reader after them have limits of their own, and nothing a producer sends may reach them.
MAX_JSON_DEPTH = 64


class Issue(msgspec.Struct, frozen=True):
    path: list[PathItem]
    message: str
    code: str


class EngineError(Exception):
    """The error object as a Python exception: ``code``, ``message`` and ``details`` as the
    API sends them. Validation failures are ``ValidationFailed`` (code ``InvalidParams``);
    the engine's own failures carry theirs (``ModelNotFound``, ``ModelLoadFailed``,
    ``GenerationFailed``, ...), the code the ``error`` event and the task result carry."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details

    def as_error(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            error["details"] = self.details
        return error


class ValidationFailed(EngineError):
    """Input that breaks the contract: every issue found, the first one in ``message``."""

    def __init__(self, issues: Sequence[Issue]) -> None:
        if not issues:
            raise ValueError("ValidationFailed needs at least one issue")
        self.issues = list(issues)
        path = self.issues[0].path
        self.field = ".".join(str(p) for p in path) if path else "root"
        super().__init__(
            "InvalidParams",
            f"Validation error on field '{self.field}': {self.issues[0].message}",
            {
                "field": self.field,
                "issues": [{"path": list(i.path), "message": i.message, "code": i.code} for i in self.issues],
            },
        )


def error_object(code: str, message: str, issue_code: str) -> dict[str, Any]:
    """The error object for a failure that is not a field's (storage, delivery): one issue at the root."""
    return {
        "code": code,
        "message": message,
        "details": {"field": "root", "issues": [{"path": [], "message": message, "code": issue_code}]},
    }


def messages(**by_constraint: str) -> dict[str, Any]:
    """``Meta(extra=messages(ge="..."))``: the field's own error messages."""
    return {"messages": by_constraint}


def validate(obj: Any, struct_type: type[StructT], *, path: Sequence[PathItem] = ()) -> StructT:
    """Return ``obj`` converted to ``struct_type`` or raise ``ValidationFailed``."""
    try:
        return msgspec.convert(obj, struct_type, strict=True)
    except msgspec.ValidationError as exc:
        raise failure_for(obj, struct_type, exc, path=path) from None


def failure_for(
    obj: Any, struct_type: Any, exc: Exception, *, path: Sequence[PathItem] = ()
) -> ValidationFailed:
    """Explain why the fast path rejected ``obj``, listing every issue.

    Should the thorough walk ever disagree with msgspec (a rule it does not
    model), msgspec's own message is reported rather than letting bad input
    through or raising a bare error.
    """
    issues = collect_issues(obj, struct_type, path=path)
    if not issues:
        issues = [Issue(list(path), str(exc), "invalid")]
    return ValidationFailed(issues)


def json_parse(raw: bytes | str) -> Any:
    """JSON text to Python values; anything that is not JSON is a ``ValidationFailed``.

    msgspec raises several kinds of error besides ``DecodeError`` on hostile input:
    ``RecursionError`` for deep nesting, ``UnicodeDecodeError`` for bytes that are not
    UTF-8, ``ValidationError`` for an integer beyond 64 bits. All of them are bad input.
    """
    try:
        return msgspec.json.decode(raw)
    except Exception as exc:
        raise json_failure(exc) from None


def json_failure(exc: BaseException) -> ValidationFailed:
    """The error object for JSON text that could not be decoded (see ``json_parse``)."""
    if isinstance(exc, RecursionError):
        return ValidationFailed([Issue([], "Nested too deeply", "too_deep")])
    if isinstance(exc, UnicodeDecodeError):
        return ValidationFailed([Issue([], "Invalid JSON: not UTF-8 text", "invalid_encoding")])
    if isinstance(exc, msgspec.ValidationError):
        # The only schema-free check msgspec makes: an integer that does not fit 64 bits.
        return ValidationFailed([Issue([], "Number out of range (integers are at most 64 bits)", "too_big")])
    return ValidationFailed([Issue([], f"Invalid JSON: {exc}", "invalid_json")])


# -- the thorough walk ---------------------------------------------------------

_TYPE_NAMES = {
    mi.IntType: ("Must be an integer", "invalid_type"),
    mi.FloatType: ("Must be a number", "invalid_type"),
    mi.StrType: ("Must be a string", "invalid_type"),
    mi.BoolType: ("Must be a boolean", "invalid_type"),
    mi.UUIDType: ("Must be a UUID", "invalid_uuid"),
    mi.DictType: ("Must be an object", "invalid_type"),
    mi.StructType: ("Must be an object", "invalid_type"),
    mi.NoneType: ("Must be null", "invalid_type"),
}


def collect_issues(obj: Any, struct_type: Any, *, path: Sequence[PathItem] = ()) -> list[Issue]:
    info = struct_type if isinstance(struct_type, mi.Type) else mi.type_info(struct_type)
    issues: list[Issue] = []
    _check(obj, info, list(path), {}, issues)
    return issues


def _check(
    value: Any, info: mi.Type, path: list[PathItem], msgs: Mapping[str, str], out: list[Issue]
) -> None:
    if isinstance(info, mi.Metadata):
        extra = info.extra or {}
        _check(value, info.type, path, {**msgs, **extra.get("messages", {})}, out)
        return
    if isinstance(info, mi.UnionType):
        _check_union(value, info, path, msgs, out)
        return
    if isinstance(info, mi.AnyType):
        return
    checker = _CHECKERS.get(type(info))
    if checker is None:  # pragma: no cover - a declaration using a type we do not model
        raise TypeError(f"validation: unsupported declaration {info!r}")
    checker(value, info, path, msgs, out)


def _wrong_type(info: mi.Type, path: list[PathItem], msgs: Mapping[str, str], out: list[Issue]) -> None:
    message, code = _TYPE_NAMES.get(type(info), ("Invalid value", "invalid_type"))
    out.append(Issue(path, msgs.get("type", message), code))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_bounds(
    value: float,
    info: mi.IntType | mi.FloatType,
    path: list[PathItem],
    msgs: Mapping[str, str],
    out: list[Issue],
) -> None:
    if info.ge is not None and not value >= info.ge:
        if info.ge == 1 and isinstance(info, mi.IntType):
            default = "Must be a positive integer"
        elif info.ge == 0:
            default = "Cannot be negative"
        else:
            default = f"Must be at least {info.ge}"
        out.append(Issue(path, msgs.get("ge", default), "too_small"))
    elif info.gt is not None and not value > info.gt:
        out.append(Issue(path, msgs.get("gt", f"Must be greater than {info.gt}"), "too_small"))
    if info.le is not None and value > info.le:
        out.append(Issue(path, msgs.get("le", f"Cannot exceed {info.le}"), "too_big"))
    elif info.lt is not None and value >= info.lt:
        out.append(Issue(path, msgs.get("lt", f"Must be less than {info.lt}"), "too_big"))


def _check_int(
    value: Any, info: mi.IntType, path: list[PathItem], msgs: Mapping[str, str], out: list[Issue]
) -> None:
    if not _is_int(value):
        _wrong_type(info, path, msgs, out)
        return
    _check_bounds(value, info, path, msgs, out)


def _check_float(
    value: Any, info: mi.FloatType, path: list[PathItem], msgs: Mapping[str, str], out: list[Issue]
) -> None:
    if not (_is_int(value) or isinstance(value, float)):
        _wrong_type(info, path, msgs, out)
        return
    if isinstance(value, float) and not math.isfinite(value):
        out.append(Issue(path, msgs.get("finite", "Must be a finite number"), "not_finite"))
        return
    _check_bounds(value, info, path, msgs, out)


def _check_str(
    value: Any, info: mi.StrType, path: list[PathItem], msgs: Mapping[str, str], out: list[Issue]
) -> None:
    if not isinstance(value, str):
        _wrong_type(info, path, msgs, out)
        return
    if info.min_length is not None and len(value) < info.min_length:
        default = (
            "Cannot be empty" if info.min_length == 1 else f"Must be at least {info.min_length} characters"
        )
        out.append(Issue(path, msgs.get("min_length", default), "too_small"))
        return
    if info.max_length is not None and len(value) > info.max_length:
        out.append(
            Issue(path, msgs.get("max_length", f"Cannot exceed {info.max_length} characters"), "too_big")
        )
        return
    # msgspec applies patterns with ``re.search``: do the same, so both paths agree.
    if info.pattern is not None and re.search(info.pattern, value) is None:
        out.append(Issue(path, msgs.get("pattern", "Has characters that are not allowed"), "invalid_string"))


def _check_bool(
    value: Any, info: mi.BoolType, path: list[PathItem], msgs: Mapping[str, str], out: list[Issue]
) -> None:
    if not isinstance(value, bool):
        _wrong_type(info, path, msgs, out)


def _check_none(
    value: Any, info: mi.NoneType, path: list[PathItem], msgs: Mapping[str, str], out: list[Issue]
) -> None:
    if value is not None:
        _wrong_type(info, path, msgs, out)


def _check_literal(
    value: Any, info: mi.LiteralType, path: list[PathItem], msgs: Mapping[str, str], out: list[Issue]
) -> None:
    if value not in info.values or isinstance(value, bool) != any(isinstance(v, bool) for v in info.values):
        choices = ", ".join(str(v) for v in info.values)
        out.append(Issue(path, msgs.get("enum", f"Must be one of: {choices}"), "invalid_enum"))


def _check_uuid(
    value: Any, info: mi.UUIDType, path: list[PathItem], msgs: Mapping[str, str], out: list[Issue]
) -> None:
    if isinstance(value, uuid.UUID):
        return
    if isinstance(value, str):
        try:
            msgspec.convert(value, uuid.UUID)
            return
        except msgspec.ValidationError:
            pass
    _wrong_type(info, path, msgs, out)


def _check_dict(
    value: Any, info: mi.DictType, path: list[PathItem], msgs: Mapping[str, str], out: list[Issue]
) -> None:
    if not isinstance(value, dict):
        _wrong_type(info, path, msgs, out)
        return
    if isinstance(info.value_type, mi.AnyType):
        # A free-form JSON object (metadata, a structured prompt).
        json_value_issues(value, path, out)
        return
    for key, item in value.items():
        if not isinstance(key, str):
            out.append(Issue([*path, str(key)], "Keys must be strings", "invalid_type"))
            continue
        _check(item, info.value_type, [*path, key], {}, out)


def _check_struct(
    value: Any, info: mi.StructType, path: list[PathItem], msgs: Mapping[str, str], out: list[Issue]
) -> None:
    if not isinstance(value, dict):
        _wrong_type(info, path, msgs, out)
        return
    known = set()
    for field in info.fields:
        known.add(field.encode_name)
        if field.encode_name not in value:
            if field.required:
                out.append(Issue([*path, field.encode_name], "Required", "required"))
            continue
        _check(value[field.encode_name], field.type, [*path, field.encode_name], {}, out)
    tag_field = getattr(info.cls.__struct_config__, "tag_field", None)
    for key in value:
        if key not in known and key != tag_field:
            out.append(Issue([*path, str(key)], f"Unknown field '{key}'", "unknown_field"))


def _check_union(
    value: Any, info: mi.UnionType, path: list[PathItem], msgs: Mapping[str, str], out: list[Issue]
) -> None:
    # UNSET only means "may be absent", which the struct walk already handled.
    options = [t for t in info.types if not isinstance(t, mi.CustomType)]
    if value is None and not any(isinstance(_bare(t), mi.NoneType) for t in options):
        non_null = [t for t in options if not isinstance(_bare(t), mi.NoneType)]
        _wrong_type(_bare(non_null[0]), path, {**msgs, **_messages_of(non_null[0])}, out)
        return
    # Pick the option whose kind matches the value and report that option's issues.
    for option in options:
        if _kind_matches(value, _bare(option)):
            _check(value, option, path, msgs, out)
            return
    _wrong_type(_bare(options[0]), path, {**msgs, **_messages_of(options[0])}, out)


def _bare(info: mi.Type) -> mi.Type:
    return info.type if isinstance(info, mi.Metadata) else info


def _messages_of(info: mi.Type) -> dict[str, str]:
    if isinstance(info, mi.Metadata) and info.extra:
        return dict(info.extra.get("messages", {}))
    return {}


def _kind_matches(value: Any, info: mi.Type) -> bool:
    if isinstance(info, mi.IntType):
        return _is_int(value)
    if isinstance(info, mi.FloatType):
        return _is_int(value) or isinstance(value, float)
    if isinstance(info, mi.StrType | mi.UUIDType):
        return isinstance(value, str | uuid.UUID)
    if isinstance(info, mi.BoolType):
        return isinstance(value, bool)
    if isinstance(info, mi.NoneType):
        return value is None
    if isinstance(info, mi.DictType | mi.StructType):
        return isinstance(value, dict)
    return bool(isinstance(info, mi.LiteralType))


_CHECKERS: dict[type, Any] = {
    mi.IntType: _check_int,
    mi.FloatType: _check_float,
    mi.StrType: _check_str,
    mi.BoolType: _check_bool,
    mi.NoneType: _check_none,
    mi.LiteralType: _check_literal,
    mi.UUIDType: _check_uuid,
    mi.DictType: _check_dict,
    mi.StructType: _check_struct,
}


# -- JSON values ---------------------------------------------------------------


_JSON_SCALARS = frozenset({str, int, bool, type(None)})


def is_plain_json(value: Any, depth: int = 0) -> bool:
    """A quick yes for the common case: plain JSON types, finite floats, shallow nesting.

    ``False`` means "look closer" with ``json_value_issues`` (which also
    accepts subclasses such as OrderedDict), not necessarily "invalid".
    """
    kind = type(value)
    if kind in _JSON_SCALARS:
        return True
    if kind is float:
        return value - value == 0  # NaN and +/-Infinity give NaN
    if depth >= MAX_JSON_DEPTH:
        return False
    if kind is dict:
        # Plain loops: cheaper than all() over a generator for the small objects seen here.
        for key, item in value.items():
            if type(key) is not str or not is_plain_json(item, depth + 1):
                return False
        return True
    if kind is list:
        for item in value:  # noqa: SIM110
            if not is_plain_json(item, depth + 1):
                return False
        return True
    return False


def json_value_issues(value: Any, path: list[PathItem], out: list[Issue], depth: int = 0) -> None:
    """Issues that keep ``value`` from being stored as JSON (used for ``metadata``).

    Values parsed from JSON text always pass; this guards the Python emitter,
    where a ``float('nan')`` or a ``datetime`` could otherwise slip into an
    event and be written as ``null`` or fail at encode time.
    """
    if value is None or isinstance(value, str | bool | int):
        return
    elif depth >= MAX_JSON_DEPTH and isinstance(value, dict | list | tuple):
        out.append(Issue(path, "Nested too deeply", "too_deep"))
    elif isinstance(value, float):
        if not math.isfinite(value):
            out.append(Issue(path, "Must be a finite number", "not_finite"))
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                out.append(Issue([*path, str(key)], "Keys must be strings", "invalid_type"))
            else:
                json_value_issues(item, [*path, key], out, depth + 1)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            json_value_issues(item, [*path, index], out, depth + 1)
    else:
        out.append(Issue(path, "Must be a JSON value", "invalid_type"))
