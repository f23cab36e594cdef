"""OpenAPI for the API, derived from the same msgspec declarations that validate it."""

from __future__ import annotations

from typing import Any

import msgspec
from drf_spectacular.utils import OpenApiResponse


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def struct_schema(declaration: Any) -> dict[str, Any]:
    """The JSON schema of a msgspec type, with every reference inlined."""
    schema = msgspec.json.schema(declaration)
    result: dict[str, Any] = _inline(schema, schema.get("$defs", {}))
    return result


ISSUE_SCHEMA = {
    "type": "object",
    "properties": {
        "path": {"type": "array", "items": {"oneOf": [{"type": "string"}, {"type": "integer"}]}},
        "message": {"type": "string"},
        "code": {"type": "string"},
    },
    "required": ["path", "message", "code"],
}

ERROR_SCHEMA = {
    "type": "object",
    "description": "The error object (SPEC 3.3). `details` comes with validation errors (400).",
    "properties": {
        "code": {"type": "string"},
        "message": {"type": "string"},
        "details": {
            "type": "object",
            "properties": {
                "field": {"type": "string"},
                "issues": {"type": "array", "items": ISSUE_SCHEMA},
            },
            "required": ["field", "issues"],
        },
    },
    "required": ["code", "message"],
}


def error(description: str) -> OpenApiResponse:
    return OpenApiResponse(response=ERROR_SCHEMA, description=description)


ERROR_RESPONSES = {
    400: error("Invalid input: the error object with every issue"),
    401: error("Not authenticated"),
    403: error("Authenticated, but this account may not do this"),
    413: error("Request body over the size limit"),
}
