"""Each field's declared rules with the exact message each is broken with, read from a struct.

For what declares fields its own way (a DRF serializer, a Django model's validators, the
contract's documentation): they are built from this, never from a copy of a range, a
pattern or a message. Every message is probed from the validator itself: each rule is
broken, alone, by a value made for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
import msgspec.inspect as mi

from mlxserve.contract.validation import INT64_MAX, collect_issues


@dataclass(frozen=True)
class Rule:
    constraint: str  # type, min_length, max_length, pattern, ge, le, finite, enum
    bound: Any  # the length, pattern, bound or allowed values; None for type and finite
    message: str
    issue_code: str


@dataclass(frozen=True)
class FieldRules:
    name: str  # the Python attribute
    wire_name: str  # the JSON key
    kind: str  # boolean, integer, number, string, UUID, object, enum, or "a or b"
    required: bool
    default: Any
    rules: tuple[Rule, ...]
    description: str = ""  # what the field means, from its declaration's Meta(description=...)

    def rule(self, constraint: str) -> Rule | None:
        return next((r for r in self.rules if r.constraint == constraint), None)


_KINDS = {
    mi.StrType: "string",
    mi.IntType: "integer",
    mi.FloatType: "number",
    mi.BoolType: "boolean",
    mi.UUIDType: "UUID",
    mi.DictType: "object",
    mi.LiteralType: "enum",
}


def _parts(info: mi.Type) -> list[mi.Type]:
    """The alternatives of a field's type (``msgspec.inspect`` leaves UNSET out)."""
    return list(info.types) if isinstance(info, mi.UnionType) else [info]


def _bare(info: mi.Type) -> mi.Type:
    return info.type if isinstance(info, mi.Metadata) else info


def _breakers(info: mi.Type) -> list[tuple[str, Any, Any]]:
    """(constraint, its bound, a value that breaks only that rule) for each declared rule."""
    bare = _bare(_parts(info)[0])
    if isinstance(bare, mi.LiteralType):
        return [("enum", bare.values, "not-a-value")]
    found: list[tuple[str, Any, Any]] = [("type", None, [] if not isinstance(bare, mi.DictType) else "x")]
    if isinstance(bare, mi.StrType):
        if bare.min_length:
            found.append(("min_length", bare.min_length, "x" * (bare.min_length - 1)))
        if bare.max_length is not None:
            found.append(("max_length", bare.max_length, "x" * (bare.max_length + 1)))
        if bare.pattern is not None:
            found.append(("pattern", bare.pattern, "not allowed!"))
    if isinstance(bare, mi.IntType | mi.FloatType):
        # Bounds that only say "64 bits" or "a finite float" belong to the type.
        if bare.ge is not None and bare.ge - 1 != bare.ge:
            found.append(("ge", bare.ge, bare.ge - 1))
        if bare.le is not None and bare.le + 1 != bare.le and bare.le != INT64_MAX:
            found.append(("le", bare.le, bare.le + 1))
        if isinstance(bare, mi.FloatType):
            found.append(("finite", None, float("nan")))
    return found


def _kind(info: mi.Type) -> str:
    kinds = []
    for part in _parts(info):
        bare = _bare(part)
        if isinstance(bare, mi.IntType) and bare.le == INT64_MAX:
            kinds.append("integer (64-bit)")
        else:
            kinds.append(_KINDS.get(type(bare), type(bare).__name__))
    return " or ".join(kinds)


def struct_rules(struct: Any) -> list[FieldRules]:
    info = mi.type_info(struct)
    assert isinstance(info, mi.StructType)
    rules = []
    for field in info.fields:
        probed = []
        for constraint, bound, value in _breakers(field.type):
            issues = collect_issues(value, field.type)
            if issues:  # a bound the walk does not model is left to the type
                probed.append(Rule(constraint, bound, issues[0].message, issues[0].code))
        rules.append(
            FieldRules(
                name=field.name,
                wire_name=field.encode_name,
                kind=_kind(field.type),
                required=field.required,
                default=None if field.default is msgspec.NODEFAULT else field.default,
                rules=tuple(probed),
                description=_description(field.type),
            )
        )
    return rules


def _description(field_type: Any) -> str:
    if isinstance(field_type, mi.Metadata):
        return str((field_type.extra_json_schema or {}).get("description", ""))
    return ""


def field_help(field: FieldRules) -> str:
    """A field's meaning and range in one line, for a form: "<description> <range>."."""
    parts = [field.description] if field.description else []
    low, high = field.rule("ge"), field.rule("le")
    if low is not None and high is not None:
        parts.append(f"From {low.bound} to {high.bound}.")
    shortest, longest = field.rule("min_length"), field.rule("max_length")
    if shortest is not None and longest is not None:
        parts.append(f"{shortest.bound} to {longest.bound} characters.")
    pattern = field.rule("pattern")
    if pattern is not None:
        parts.append(pattern.message + ".")
    if field.default is not None and not field.required:
        parts.append(f"Default {field.default}.")
    return " ".join(parts)
