"""Request validation: the rules shared by the pod and the router."""

from __future__ import annotations

import pytest

from imagefleet.errors import InvalidRequest, NotFound
from imagefleet.schema import Limits, parse_edit, parse_generation, parse_size

LIMITS = Limits(
    model="m",
    max_n=4,
    max_pixels=1024 * 1024,
    max_side=2048,
    size_multiple=16,
    max_steps=50,
    max_prompt_chars=100,
    default_width=512,
    default_height=256,
)


def test_defaults_come_from_the_limits() -> None:
    req = parse_generation({"prompt": "a cat"}, LIMITS)
    assert (req.n, req.width, req.height, req.response_format, req.output_format) == (
        1,
        512,
        256,
        "b64_json",
        "png",
    )
    assert req.steps is None and req.guidance is None and req.seed is None


def test_all_fields_parse() -> None:
    req = parse_generation(
        {
            "prompt": "a cat",
            "n": 2,
            "size": "640x480",
            "response_format": "url",
            "output_format": "webp",
            "output_compression": 70,
            "model": "m",
            "negative_prompt": "dog",
            "num_inference_steps": 20,
            "guidance_scale": 6,
            "seed": 9,
            "user": "u1",
            "quality": "auto",
            "background": "opaque",
            "stream": False,
        },
        LIMITS,
    )
    assert (req.width, req.height, req.steps, req.guidance, req.seed) == (640, 480, 20, 6.0, 9)
    assert req.output_compression == 70 and req.negative_prompt == "dog"


def test_with_defaults_fills_only_missing_values() -> None:
    req = parse_generation({"prompt": "x", "guidance_scale": 0}, LIMITS).with_defaults(
        width=1, height=2, steps=28, guidance=4.5
    )
    assert (req.steps, req.guidance) == (28, 0.0)


@pytest.mark.parametrize(
    ("size", "ok"),
    [
        ("1024x1024", True),
        ("1024x1040", False),
        ("2048x512", True),
        ("2064x16", False),
        ("16x16", True),
        ("0x16", False),
        ("1x1", False),
        (" 512x512 ", True),
        ("512X512", True),
        ("512*512", False),
    ],
)
def test_sizes(size: str, ok: bool) -> None:
    if ok:
        assert parse_size(size, LIMITS)
    else:
        with pytest.raises(InvalidRequest) as info:
            parse_size(size, LIMITS)
        assert info.value.param == "size"


def test_unknown_model_is_not_found() -> None:
    with pytest.raises(NotFound) as info:
        parse_generation({"prompt": "x", "model": "other"}, LIMITS)
    assert info.value.code == "model_not_found" and info.value.status == 404


def test_no_op_openai_fields_are_only_accepted_at_values_that_hold() -> None:
    parse_generation({"prompt": "x", "quality": "auto", "partial_images": 0}, LIMITS)
    for field, value in [("quality", "high"), ("partial_images", 1), ("background", "transparent")]:
        with pytest.raises(InvalidRequest) as info:
            parse_generation({"prompt": "x", field: value}, LIMITS)
        assert info.value.code == "unsupported_parameter"


def test_edit_form_fields_are_strings_parsed_by_type() -> None:
    req = parse_edit({"prompt": "x", "n": "3", "strength": "0.5", "size": "256x256", "seed": "4"}, LIMITS)
    assert (req.task, req.n, req.strength, req.width, req.seed) == ("edit", 3, 0.5, 256, 4)
    assert parse_edit({"prompt": "x"}, LIMITS).width is None  # the image's own size, decided later


@pytest.mark.parametrize("strength", ["0", "1.5", "nan", "x"])
def test_edit_strength_bounds(strength: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_edit({"prompt": "x", "strength": strength}, LIMITS)


def test_prompt_length_is_limited() -> None:
    with pytest.raises(InvalidRequest, match="100"):
        parse_generation({"prompt": "x" * 101}, LIMITS)
