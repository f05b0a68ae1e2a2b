"""The OpenAPI 3.1 description of the public API, served at ``GET /openapi.json`` by pods and routers.

Built as plain dicts: every request schema is derived from :data:`imagefleet.schema.FIELDS` (kinds,
bounds, choices, defaults, notes), the error envelope from :mod:`imagefleet.errors`, the load
report from :class:`~imagefleet.loadreport.LoadReport`'s fields. No library is used: what one such
as ``apispec`` adds is turning marshmallow or dataclass models into schemas, and the request here
is a table of its own, not such a model; the rest is a dict literal.

A pod describes its own limits (``--max-pixels``, ``--max-steps``, ...), so what the description
calls valid is what that pod accepts field by field; a router, which sends a request to any of
its pods, describes the widest bounds any pod may be set to (:meth:`~imagefleet.schema.Bound.widest`).
Rules across fields (``stream`` needs ``n = 1``, ``size`` a multiple of the model's
``size_multiple`` and at most ``--max-pixels``) are said in words: a request that breaks one gets
a 400 in the error envelope.

docs/openapi.json is the router's description, rendered by :func:`render` (a test keeps it fresh).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import typing
from typing import Any, Literal

from imagefleet import errors, sse, wire
from imagefleet.loadreport import LoadReport
from imagefleet.schema import (
    OUTPUT_FORMATS,
    TIERS,
    Bound,
    DefaultFrom,
    Field,
    Kind,
    Limits,
    Task,
    fields_of,
)

PATH = "/openapi.json"
Component = Literal["pod", "router"]
VERSION = "3.1.0"

_JSON = "application/json"
_BLANK = "".join(chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace())
NOT_BLANK = "[^" + "".join(f"\\u{ord(c):04x}" for c in _BLANK) + "]"
"""A pattern a text matches when it holds a character that is not blank (as ``str.strip`` sees it)."""
SIZE_PATTERN = "^(auto|[0-9]{1,6}x[0-9]{1,6})$"

_TYPES: dict[Kind, str] = {
    Kind.TEXT: "string",
    Kind.CHOICE: "string",
    Kind.SIZE: "string",
    Kind.INTEGER: "integer",
    Kind.NUMBER: "number",
    Kind.BOOLEAN: "boolean",
    Kind.FILE: "string",
}


# --- request schemas, from the field table -----------------------------------------------------


def _bound(bound: Bound | None, limits: Limits | None) -> float | None:
    if bound is None:
        return None
    value = bound.at(limits) if limits is not None else bound.widest()
    if math.isinf(value):
        return None
    return int(value) if float(value).is_integer() else value


def field_schema(f: Field, limits: Limits | None, *, json_body: bool) -> dict[str, Any]:
    """The JSON Schema of one request field on a server with ``limits`` (None: any pod)."""
    schema: dict[str, Any] = {"type": _TYPES[f.kind]}
    lo, hi = _bound(f.lo, limits), _bound(f.hi, limits)
    if f.kind is Kind.FILE:
        schema["contentMediaType"] = "application/octet-stream"
    elif f.choices:
        schema["enum"] = list(f.choices)
    elif f.kind is Kind.SIZE:
        schema["pattern"] = SIZE_PATTERN
    elif f.kind is Kind.TEXT:
        if hi is not None:
            schema["maxLength"] = hi
        if f.default is DefaultFrom.REQUIRED:
            schema["pattern"] = NOT_BLANK
    elif f.kind in (Kind.INTEGER, Kind.NUMBER):
        if lo is not None:
            schema["exclusiveMinimum" if f.open_lo else "minimum"] = lo
        if hi is not None:
            schema["maximum"] = hi
    if f.default is DefaultFrom.CONSTANT:
        schema["default"] = f.value
    if f.doc or f.hint:
        schema["description"] = (f.doc or f.hint).replace("`", "")
    if json_body and f.default is not DefaultFrom.REQUIRED:  # null is the same as leaving it out
        schema["type"] = [schema["type"], "null"]
        if "enum" in schema:
            schema["enum"] = [*schema["enum"], None]
    return schema


def request_schema(task: Task, limits: Limits | None) -> dict[str, Any]:
    """The body of a generation (JSON) or an edit (multipart: text fields and files)."""
    json_body = task == "generate"
    fields = [*fields_of(task), *([] if json_body else fields_of(task, files=True))]
    return {
        "type": "object",
        "properties": {f.name: field_schema(f, limits, json_body=json_body) for f in fields},
        "required": [f.name for f in fields if f.default is DefaultFrom.REQUIRED],
        "additionalProperties": False,
    }


# --- response schemas ----------------------------------------------------------------------------


def _error_types() -> list[str]:
    found: set[str] = set()
    pending: list[type[errors.APIError]] = [errors.APIError]
    while pending:
        cls = pending.pop()
        found.add(cls.type)
        pending.extend(cls.__subclasses__())
    return sorted(found)


def error_schema() -> dict[str, Any]:
    """OpenAI's error envelope (:func:`imagefleet.errors.error_envelope`), the body of every error."""
    nullable = {"type": ["string", "null"]}
    return {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string", "enum": _error_types()},
                    "param": nullable,
                    "code": nullable,
                },
            }
        },
    }


_JSON_TYPES: dict[Any, str] = {
    str: "string",
    bool: "boolean",
    int: "integer",
    float: "number",
    dict: "object",
}


def load_report_schema() -> dict[str, Any]:
    """``GET /v1/load``: :meth:`LoadReport.to_json`, field by field."""
    hints = typing.get_type_hints(LoadReport)
    properties: dict[str, Any] = {
        f.name: {"type": _JSON_TYPES[typing.get_origin(hints[f.name]) or hints[f.name]]}
        for f in dataclasses.fields(LoadReport)
    }
    properties["expected_wait_seconds"] = {"type": "number"}
    return {"type": "object", "required": sorted(properties), "properties": properties}


def images_schema() -> dict[str, Any]:
    image = {
        "type": "object",
        "properties": {
            "b64_json": {"type": "string", "contentEncoding": "base64"},
            "url": {"type": "string"},
            "revised_prompt": {"type": "null"},
        },
        "oneOf": [{"required": ["b64_json"]}, {"required": ["url"]}],
    }
    return {
        "type": "object",
        "required": ["created", "data", "output_format", "size", "background", "quality", "tier"],
        "properties": {
            "created": {"type": "integer"},
            "data": {"type": "array", "items": image},
            "output_format": {"type": "string", "enum": list(OUTPUT_FORMATS)},
            "size": {"type": "string", "pattern": "^[0-9]+x[0-9]+$"},
            "background": {"type": "string", "enum": ["opaque"]},
            "quality": {"type": "string", "enum": ["auto"]},
            "tier": {"type": "string", "enum": list(TIERS)},
        },
    }


def event_schema(task: Task) -> dict[str, Any]:
    """One event of a stream (OpenAPI before 3.2 has a stream's ``schema`` describe each event)."""
    return {
        "type": "object",
        "required": ["event", "data"],
        "properties": {
            "event": {"type": "string", "enum": sse.event_names(task)},
            "data": {"type": "string", "contentMediaType": _JSON},
        },
    }


def model_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["id", "object", "created", "owned_by"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "model"},
            "created": {"type": "integer"},
            "owned_by": {"type": "string"},
            "size_multiple": {"type": "integer"},
            "default_size": {"type": "string"},
            "default_steps": {"type": "integer"},
            "default_guidance_scale": {"type": "number"},
            "tiers": {"type": "array", "items": {"type": "string", "enum": list(TIERS)}},
        },
    }


def _status_schema(*statuses: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string", "enum": list(statuses)}, "reason": {"type": "string"}},
    }


def components() -> dict[str, Any]:
    return {
        "Error": error_schema(),
        "ImagesResponse": images_schema(),
        "Model": model_schema(),
        "ModelList": {
            "type": "object",
            "required": ["object", "data"],
            "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Model")}},
        },
        "LoadReport": load_report_schema(),
        "Health": _status_schema("ok"),
        "Ready": _status_schema("ready", "not_ready"),
    }


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


# --- operations ------------------------------------------------------------------------------------

_ERROR_TEXT = {
    400: "Bad request: a field is wrong (`param` names it)",
    401: "Missing or wrong API key",
    404: "Not found",
    413: "Body too large",
    415: "Wrong Content-Type",
    429: "Queue full: retry after `Retry-After` seconds",
    500: "The generation failed",
    502: "No pod answered",
    503: "Not ready, draining, or no ready pod",
    504: "Timed out",
}


def _json_answer(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): _json_answer(_ERROR_TEXT[s], _ref("Error")) for s in statuses}


def _operation(
    summary: str, answers: dict[str, Any], *, body: dict[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, **extra, "responses": answers}
    if body is not None:
        op["requestBody"] = {"required": True, "content": body}
    return op


def _path_param(name: str, description: str) -> list[dict[str, Any]]:
    schema = {"type": "string", "minLength": 1}
    return [{"name": name, "in": "path", "required": True, "schema": schema, "description": description}]


def paths(component: Component, limits: Limits | None) -> dict[str, Any]:
    """The operations ``component`` serves, with the statuses each can answer."""
    router = component == "router"
    key = (401,) if router else ()
    proxied = (502, 503, 504) if router else (503,)
    work = (400, *key, 404, 413, 415, 429, 500, *proxied)
    images = _json_answer("The images", _ref("ImagesResponse"))

    def made(task: Task) -> dict[str, Any]:
        return {**images, "content": {**images["content"], sse.CONTENT_TYPE: {"schema": event_schema(task)}}}

    out: dict[str, Any] = {
        "/v1/images/generations": {
            "post": _operation(
                "Create images from a prompt (stream: true answers with server-sent events)",
                {"200": made("generate"), **_errors(*work)},
                body={_JSON: {"schema": request_schema("generate", limits)}},
            )
        },
        "/v1/images/edits": {
            "post": _operation(
                "Edit an image (image-to-image, or inpainting with a mask)",
                {"200": made("edit"), **_errors(*work)},
                body={"multipart/form-data": {"schema": request_schema("edit", limits)}},
            )
        },
        wire.FILES_PATH + "{file_id}": {
            "get": _operation(
                "An image kept for response_format=url",
                {
                    "200": {
                        "description": "The image",
                        "content": {f"image/{fmt}": {"schema": {"type": "string"}} for fmt in OUTPUT_FORMATS},
                    },
                    **_errors(*key, 404, *((502, 504) if router else ())),
                },
                parameters=_path_param("file_id", "as in the url of the generation's answer"),
            )
        },
        "/v1/models": {
            "get": _operation(
                "The served model",
                {"200": _json_answer("The models", _ref("ModelList")), **_errors(*key, *proxied)},
            )
        },
    }
    out["/v1/models/{model_id}"] = {
        "get": _operation(
            "One model",
            {
                "200": _json_answer("The model", _ref("Model")),
                **_errors(*key, 404, *(proxied if router else ())),
            },
            parameters=_path_param("model_id", "a Hugging Face id may hold a slash"),
        )
    }
    if not router:
        out[wire.LOAD_PATH] = {
            "get": _operation("The pod's load report", {"200": _json_answer("Load", _ref("LoadReport"))})
        }
    else:
        out["/v1/fleet"] = {
            "get": _operation(
                "The fleet as the router sees it",
                {"200": _json_answer("Fleet", {"type": "object"}), **_errors(401)},
            )
        }
    out[wire.STATS_PATH] = {
        "get": _operation("Counters", {"200": _json_answer("Counters", {"type": "object"}), **_errors(*key)})
    }
    out[wire.HEALTH_PATH] = {
        "get": _operation("Liveness", {"200": _json_answer("Alive", _ref("Health"))}, security=[])
    }
    out[wire.READY_PATH] = {
        "get": _operation(
            "Readiness",
            {"200": _json_answer("Ready", _ref("Ready")), "503": _json_answer("Not ready", _ref("Ready"))},
            security=[],
        )
    }
    text = {
        "description": "Prometheus text exposition",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
    out[wire.METRICS_PATH] = {"get": _operation("Prometheus metrics", {"200": text, **_errors(*key)})}
    return out


def document(component: Component, limits: Limits | None = None) -> dict[str, Any]:
    """The description ``component`` serves; ``limits`` are a pod's own (None: the widest any pod takes)."""
    doc: dict[str, Any] = {
        "openapi": VERSION,
        "info": {
            "title": f"imagefleet {component}",
            "version": "1",
            "description": (
                "OpenAI's Images API, self-hosted. Bounds are "
                + (f"this pod's (model {limits.model})" if limits else "the widest any pod accepts")
                + "; size must also be a multiple of the model's size_multiple (see /v1/models) and "
                "at most --max-side per side and --max-pixels in all. Every error is OpenAI's envelope."
            ),
        },
        "paths": paths(component, limits),
        "components": {"schemas": components()},
    }
    if component == "router":
        doc["components"]["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"apiKey": []}]
    return doc


def render(component: Component = "router", limits: Limits | None = None) -> str:
    """The description as docs/openapi.json holds it."""
    return json.dumps(document(component, limits), indent=2, ensure_ascii=False) + "\n"
