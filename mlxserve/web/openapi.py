"""OpenAPI for the API, derived from the same msgspec declarations that validate it."""

from __future__ import annotations

from typing import Any

import drf_spectacular.openapi
import msgspec
from drf_spectacular.extensions import OpenApiSerializerExtension
from drf_spectacular.utils import OpenApiResponse
from rest_framework import serializers


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """msgspec writes JSON Schema 2020-12; OpenAPI 3.0 wants references resolved here and
    ``nullable: true`` instead of a ``{"type": "null"}`` alternative."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline(defs[ref.removeprefix("#/$defs/")], defs)
        result = {k: _inline(v, defs) for k, v in node.items() if k != "$defs"}
        options = result.get("anyOf")
        if isinstance(options, list) and {"type": "null"} in options:
            rest = [o for o in options if o != {"type": "null"}]
            del result["anyOf"]
            result.update(rest[0] if len(rest) == 1 else {"anyOf": rest})
            result["nullable"] = True
        return result
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
    "description": "The error object. `details` comes with validation errors (400).",
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


def json_request(schema: dict[str, Any]) -> dict[str, Any]:
    """A raw JSON schema as a request body (drf-spectacular takes raw dicts keyed by media type)."""
    return {"application/json": schema}


# Writes are throttled per account as well.
WRITE_ERROR_RESPONSES = {**ERROR_RESPONSES, 429: error("Too many writes from this account; see Retry-After")}


class AutoSchema(drf_spectacular.openapi.AutoSchema):
    """drf-spectacular's schema, with the error responses every endpoint can give filled in.

    Any operation can answer 400 (a bad query or body), 401 and 403; one with a path
    parameter 404; a write 413 and 429. Declared ones are kept as the view states them.
    """

    def _get_response_bodies(self, direction: Any = "response") -> dict[str, Any]:
        responses: dict[str, Any] = super()._get_response_bodies(direction)
        errors = dict(ERROR_RESPONSES)
        if "{" not in self.path:
            errors.pop(404, None)
        else:
            errors.setdefault(404, error("No such object"))
        if self.method in ("GET", "HEAD"):
            errors.pop(413, None)
        else:
            errors.update(WRITE_ERROR_RESPONSES)
        for code, response in errors.items():
            if str(code) not in responses:
                responses[str(code)] = self._get_response_for_code(
                    response, str(code), ["application/json"], direction
                )
        return responses


# -- msgspec structs where DRF wants a serializer class ---------------------------------------


class StructSerializer(serializers.Serializer):  # type: ignore[type-arg]
    """Stands for a msgspec struct where DRF's generic views and drf-spectacular want a
    serializer class (a list view's items, for its pagination and filters): the schema is
    the struct's. The view writes the structs itself; this never serializes anything."""

    struct: Any = None


def struct_serializer(struct: Any) -> type[StructSerializer]:
    return type(f"{struct.__name__}Serializer", (StructSerializer,), {"struct": struct})


class StructSerializerExtension(OpenApiSerializerExtension):
    target_class = "mlxserve.web.openapi.StructSerializer"
    match_subclasses = True

    def get_name(self, auto_schema: Any, direction: Any) -> str:
        return str(self.target.struct.__name__)

    def map_serializer(self, auto_schema: Any, direction: Any) -> dict[str, Any]:
        return struct_schema(self.target.struct)
