"""The OpenAPI description: valid OpenAPI 3.1, derived from the request table, fresh in docs/."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from openapi_spec_validator import validate

from imagefleet import openapi
from imagefleet.schema import FIELDS, Kind, Limits, fields_of

DOC = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
LIMITS = Limits(
    model="tiny", size_multiple=8, max_n=3, max_pixels=4096, max_side=64, max_steps=7, max_prompt_chars=50
)


def body_fields(doc: dict, path: str, media_type: str) -> dict:
    schema = doc["paths"][path]["post"]["requestBody"]["content"][media_type]["schema"]
    return dict(schema["properties"]) | {"__required__": schema["required"]}


@pytest.mark.parametrize("component", ["pod", "router"])
@pytest.mark.parametrize("limits", [None, LIMITS])
def test_the_description_is_valid_openapi(component: openapi.Component, limits: Limits | None) -> None:
    validate(openapi.document(component, limits))


def test_request_schemas_hold_every_field_of_the_table() -> None:
    doc = openapi.document("pod", LIMITS)
    generation = body_fields(doc, "/v1/images/generations", "application/json")
    edit = body_fields(doc, "/v1/images/edits", "multipart/form-data")
    assert set(generation) - {"__required__"} == {f.name for f in fields_of("generate")}
    assert set(edit) - {"__required__"} == {
        f.name for f in (*fields_of("edit"), *fields_of("edit", files=True))
    }
    assert generation["__required__"] == ["prompt"]
    assert edit["__required__"] == ["prompt", "image"]
    assert edit["image"] == {
        "type": "string",
        "contentMediaType": "application/octet-stream",
        "description": "PNG, JPEG or WebP; one image per request",
    }


def test_bounds_are_the_pods_own_limits_or_the_widest_on_a_router() -> None:
    pod = body_fields(openapi.document("pod", LIMITS), "/v1/images/generations", "application/json")
    assert pod["n"]["maximum"] == 3
    assert pod["num_inference_steps"]["maximum"] == 7
    assert pod["prompt"]["maxLength"] == 50
    assert pod["seed"]["maximum"] == 2**63 - 1 - 3
    assert "strength" not in pod  # edits only
    router = body_fields(openapi.document("router"), "/v1/images/generations", "application/json")
    assert router["n"]["maximum"] == 128  # PodSettings.max_images_per_request's own maximum
    assert router["num_inference_steps"]["maximum"] == 1000
    assert router["seed"]["maximum"] == 2**63 - 1 - 1


def test_field_schemas_follow_kinds() -> None:
    edit = body_fields(openapi.document("pod", LIMITS), "/v1/images/edits", "multipart/form-data")
    assert edit["strength"]["exclusiveMinimum"] == 0 and edit["strength"]["maximum"] == 1
    assert edit["n"]["type"] == "integer"  # multipart text is never null
    generation = body_fields(openapi.document("pod", LIMITS), "/v1/images/generations", "application/json")
    assert generation["response_format"]["enum"] == ["b64_json", "url", None]
    assert generation["quality"]["enum"] == ["auto", None]
    assert generation["stream"] == {
        "type": ["boolean", "null"],
        "default": False,
        "description": next(f.doc for f in FIELDS if f.name == "stream").replace("`", ""),
    }
    sizes = [f for f in FIELDS if f.kind is Kind.SIZE]
    assert all(generation[f.name]["pattern"] == openapi.SIZE_PATTERN for f in sizes)


@pytest.mark.parametrize(
    ("text", "blank"),
    [(" ", True), ("\x1c\t\u3000\x85", True), ("", True), (" a ", False), ("\ufeff", False)],
)
def test_a_prompt_is_not_blank_exactly_when_strip_leaves_something(text: str, blank: bool) -> None:
    assert (re.search(openapi.NOT_BLANK, text) is None) == blank == (not text.strip())


def test_pod_only_and_router_only_paths() -> None:
    pod, router = openapi.document("pod", LIMITS)["paths"], openapi.document("router")["paths"]
    assert "/v1/load" in pod and "/v1/models/{model_id}" in pod and "/v1/fleet" not in pod
    assert "/v1/fleet" in router and "/v1/load" not in router and "/v1/models/{model_id}" in router
    assert "401" in router["/v1/images/generations"]["post"]["responses"]
    assert "401" not in pod["/v1/images/generations"]["post"]["responses"]


def test_docs_openapi_json_is_the_routers_description() -> None:
    """docs/openapi.json is generated; ``IMAGEFLEET_UPDATE_DOCS=1`` rewrites it."""
    expected = openapi.render()
    if os.environ.get("IMAGEFLEET_UPDATE_DOCS") == "1":
        DOC.write_text(expected)
        return
    assert DOC.exists() and DOC.read_text() == expected, (
        "docs/openapi.json is stale: rerun this test with IMAGEFLEET_UPDATE_DOCS=1"
    )
    assert json.loads(DOC.read_text())["openapi"] == openapi.VERSION
