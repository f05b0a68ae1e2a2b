"""Pricing a request from its body, leniently: what cannot be read costs the pod's default."""

from __future__ import annotations

import pytest

from imagefleet.errors import InvalidRequest
from imagefleet.loadreport import LoadReport
from imagefleet.router.cost import Shape, shape_of, shape_of_json

REPORT = LoadReport(model="m", ready=True, default_steps=28, default_width=1024, default_height=1024)


def test_generation_fields() -> None:
    shape = shape_of({"prompt": "x", "n": 3, "size": "512x256", "num_inference_steps": 10})
    assert shape == Shape(n=3, width=512, height=256, steps=10)
    assert shape.units(REPORT) == pytest.approx(3 * 10 * 512 * 256 / 1e6)


def test_edit_fields_arrive_as_text() -> None:
    shape = shape_of(
        {"prompt": "x", "n": "2", "size": "64x64", "num_inference_steps": "8", "strength": "0.5"}
    )
    assert shape == Shape(n=2, width=64, height=64, steps=8, strength=0.5)
    assert shape.units(REPORT) == pytest.approx(2 * 8 * 0.5 * 64 * 64 / 1e6)


def test_defaults_come_from_the_pod() -> None:
    assert shape_of({"prompt": "x"}).units(REPORT) == pytest.approx(28 * 1024 * 1024 / 1e6)


@pytest.mark.parametrize(
    "fields",
    [
        {"n": "three", "size": "big", "num_inference_steps": -1, "strength": 7},
        {"n": True, "size": 512, "num_inference_steps": 2.5, "strength": "nan"},
        {"n": 10**9, "size": "auto", "num_inference_steps": None, "strength": None},
    ],
)
def test_unreadable_fields_cost_the_default(fields: dict[str, object]) -> None:
    assert shape_of(fields) == Shape()


def test_json_bodies() -> None:
    assert shape_of_json(b'{"prompt": "x", "n": 2}') == Shape(n=2)
    assert shape_of_json(b'["not", "an", "object"]') == Shape()  # the pod says what is wrong with it
    with pytest.raises(InvalidRequest):
        shape_of_json(b'{"prompt": ')


@pytest.mark.parametrize("field", ["n", "seed", "num_inference_steps"])
def test_a_json_integer_past_pythons_digit_limit_is_a_400_not_a_crash(field: str) -> None:
    body = b'{"prompt": "x", "' + field.encode() + b'": ' + b"7" * 5000 + b"}"
    with pytest.raises(InvalidRequest) as info:
        shape_of_json(body)
    assert info.value.status == 400 and "digits" in info.value.message
