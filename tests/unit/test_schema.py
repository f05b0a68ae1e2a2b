"""The request table and what is derived from it: strict parsing, defaults, the cost view, the docs."""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imagefleet import schema
from imagefleet.errors import InvalidRequest, NotFound
from imagefleet.schema import (
    FIELDS,
    MAX_SEED,
    CostView,
    Defaults,
    ImageRequest,
    Limits,
    cost_view,
    model_defaults,
    parse_edit,
    parse_generation,
    parse_size,
    resolve_defaults,
)
from imagefleet.settings import PodSettings

LIMITS = Limits(
    model="m",
    max_n=4,
    max_pixels=1024 * 1024,
    max_side=2048,
    size_multiple=16,
    max_steps=50,
    max_prompt_chars=100,
)
DEFAULTS = Defaults(size=(512, 256), steps=28, guidance=4.5)
API_MD = Path(__file__).resolve().parents[2] / "docs" / "api.md"
TABLE_START = "<!-- request fields: generated from imagefleet.schema.FIELDS -->\n"
TABLE_END = "<!-- end of request fields -->"


def test_parsing_fills_constants_and_leaves_server_defaults_open() -> None:
    req = parse_generation({"prompt": "a cat"}, LIMITS)
    assert (req.n, req.response_format, req.output_format) == (1, "b64_json", "png")
    assert req.size is None and req.steps is None and req.guidance is None and req.seed is None
    assert req.unresolved() == ["size", "num_inference_steps", "guidance_scale", "seed"]


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
    assert req.output_compression == 70 and req.negative_prompt == "dog" and req.unresolved() == []


def test_defaults_fill_only_missing_values() -> None:
    req = resolve_defaults(parse_generation({"prompt": "x", "guidance_scale": 0}, LIMITS), DEFAULTS, LIMITS)
    assert (req.size, req.steps, req.guidance) == ((512, 256), 28, 0.0)
    assert req.seed is not None and 0 <= req.seed <= MAX_SEED - LIMITS.max_n


def test_a_random_seed_comes_from_the_given_generator() -> None:
    req = parse_generation({"prompt": "x"}, LIMITS)
    a = resolve_defaults(req, DEFAULTS, LIMITS, rng=random.Random(1)).seed
    assert a == resolve_defaults(req, DEFAULTS, LIMITS, rng=random.Random(1)).seed


def test_an_edit_defaults_to_its_images_size_which_must_fit_the_rules() -> None:
    req, _ = parse_edit({"prompt": "x"}, {"image": [b"png"]}, LIMITS)
    assert req.size is None
    assert resolve_defaults(req, DEFAULTS, LIMITS, image_size=(64, 48)).size == (64, 48)
    with pytest.raises(InvalidRequest, match="Pass `size`") as info:
        resolve_defaults(req, DEFAULTS, LIMITS, image_size=(60, 60))
    assert info.value.param == "image"


def test_pod_settings_override_the_models_defaults() -> None:
    native = Defaults(size=(64, 64), steps=4, guidance=5.0)
    same = model_defaults(native, PodSettings(), model="tiny", size_multiple=8)
    assert same == native
    settings = PodSettings(default_size="96x64", default_steps=7, default_guidance=0.0)
    assert model_defaults(native, settings, model="tiny", size_multiple=8) == Defaults((96, 64), 7, 0.0)
    with pytest.raises(ValueError, match="multiples of 16"):
        model_defaults(native, PodSettings(default_size="72x64"), model="x", size_multiple=16)


def test_limits_come_from_the_pod_settings() -> None:
    settings = PodSettings(max_images_per_request=3, max_steps=20)
    limits = Limits.from_settings(settings, model="m", size_multiple=8)
    assert (limits.max_n, limits.max_steps, limits.max_side) == (3, 20, settings.max_side)
    assert Limits.from_json(limits.to_json()) == limits


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
    for field, value in [("quality", "high"), ("background", "transparent")]:
        with pytest.raises(InvalidRequest) as info:
            parse_generation({"prompt": "x", field: value}, LIMITS)
        assert info.value.code == "unsupported_parameter"


def test_edit_form_fields_are_strings_parsed_by_type() -> None:
    fields = {"prompt": "x", "n": "3", "strength": "0.5", "size": "256x256", "seed": "4"}
    req, files = parse_edit(fields, {"image": [b"i"], "mask": [b"m"]}, LIMITS)
    assert (req.task, req.n, req.strength, req.width, req.seed) == ("edit", 3, 0.5, 256, 4)
    assert files == schema.EditFiles(image=b"i", mask=b"m")
    assert parse_edit({"prompt": "x"}, {"image[]": [b"i"]}, LIMITS)[1] == schema.EditFiles(b"i", None)


@pytest.mark.parametrize(
    ("files", "param"),
    [
        ({}, "image"),
        ({"image": [b"a"], "image[]": [b"b"]}, "image"),
        ({"image": [b"a"], "mask": [b"m"] * 2}, "mask"),
    ],
)
def test_an_edit_takes_exactly_one_image_and_at_most_one_mask(
    files: dict[str, list[bytes]], param: str
) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_edit({"prompt": "x"}, files, LIMITS)
    assert info.value.param == param


@pytest.mark.parametrize("strength", ["0", "1.5", "nan", "x"])
def test_edit_strength_bounds(strength: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_edit({"prompt": "x", "strength": strength}, {"image": [b"i"]}, LIMITS)


def test_generations_do_not_take_edit_fields() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_generation({"prompt": "x", "strength": 0.5}, LIMITS)
    assert info.value.code == "unknown_parameter"


def test_prompt_length_is_limited() -> None:
    with pytest.raises(InvalidRequest, match="100"):
        parse_generation({"prompt": "x" * 101}, LIMITS)


def test_seed_bounds_are_exact_integers() -> None:
    top = MAX_SEED - LIMITS.max_n
    assert parse_generation({"prompt": "x", "seed": top}, LIMITS).seed == top
    with pytest.raises(InvalidRequest):
        parse_generation({"prompt": "x", "seed": top + 1}, LIMITS)


# --- the table itself ---


def test_every_request_attribute_is_in_the_table_and_back() -> None:
    attrs = {f.attr for f in FIELDS if f.attr}
    assert attrs == {f.name for f in dataclasses.fields(ImageRequest)} - {"task"}
    assert len({f.name for f in FIELDS}) == len(FIELDS)


def test_model_defaults_name_a_pod_setting_and_a_defaults_attribute() -> None:
    defaults = {f.name for f in dataclasses.fields(Defaults)}
    settings = {f.name for f in dataclasses.fields(PodSettings)}
    for f in FIELDS:
        if f.default in (schema.DefaultFrom.MODEL, schema.DefaultFrom.IMAGE_OR_MODEL):
            assert f.attr in defaults and f.setting in settings, f.name


def test_the_key_fields_are_the_ones_that_change_the_pipeline_call() -> None:
    assert [f.name for f in schema.KEY_FIELDS] == [
        "size",
        "num_inference_steps",
        "guidance_scale",
        "strength",
        "tier",
    ]
    req = resolve_defaults(parse_generation({"prompt": "x"}, LIMITS), DEFAULTS, LIMITS)
    assert dict(req.key_values()) == {"size": (512, 256), "steps": 28, "guidance": 4.5, "tier": "lossless"}


def test_docs_api_md_shows_the_field_table() -> None:
    """docs/api.md's field table is generated; ``IMAGEFLEET_UPDATE_DOCS=1`` rewrites it."""
    text = API_MD.read_text()
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    expected = schema.markdown_table()
    if os.environ.get("IMAGEFLEET_UPDATE_DOCS") == "1":
        API_MD.write_text(text[:start] + expected + text[end:])
        return
    assert text[start:end] == expected, "docs/api.md is stale: rerun this test with IMAGEFLEET_UPDATE_DOCS=1"


# --- the lenient cost view ---


def test_the_cost_view_reads_only_pricing_fields() -> None:
    view = cost_view({"prompt": "x", "n": 2, "size": "64x32", "num_inference_steps": 8, "guidance_scale": 9})
    assert view == CostView(n=2, width=64, height=32, steps=8)
    assert view.work_units(default_width=1, default_height=1, default_steps=1) == 2 * 8 * 64 * 32 / 1e6


def test_the_cost_view_accepts_what_the_widest_pod_settings_allow() -> None:
    widest_n = schema.MAX_N.widest()
    assert cost_view({"n": int(widest_n)}).n == widest_n
    assert cost_view({"n": int(widest_n) + 1}).n == 1  # no pod takes it: priced as the default


requests = st.fixed_dictionaries(
    {"prompt": st.text(min_size=1, max_size=20).filter(str.strip)},
    optional={
        "n": st.integers(1, LIMITS.max_n),
        "size": st.tuples(st.integers(1, 8), st.integers(1, 8)).map(lambda s: f"{s[0] * 16}x{s[1] * 16}"),
        "num_inference_steps": st.integers(1, LIMITS.max_steps),
        "guidance_scale": st.floats(0, 100),
        "seed": st.integers(0, 1000),
    },
)


@given(requests)
def test_the_cost_view_agrees_with_strict_parsing_on_every_valid_request(body: dict[str, Any]) -> None:
    req = parse_generation(body, LIMITS)
    for as_text in (False, True):  # JSON values, and the same as multipart text
        fields = {k: str(v) for k, v in body.items()} if as_text else body
        view = cost_view(fields)
        assert (view.n, view.width, view.height, view.steps) == (req.n, req.width, req.height, req.steps)


# --- text and numbers as clients write them ---


@pytest.mark.parametrize("field", ["prompt", "negative_prompt", "user", "model"])
def test_a_lone_surrogate_in_any_text_field_is_a_400_naming_it(field: str) -> None:
    body = {"prompt": "a cat", "guidance_scale": 5, field: "a \ud800 cat"}
    with pytest.raises(InvalidRequest) as info:
        parse_generation(body, LIMITS)
    assert info.value.param == field and "surrogate" in info.value.message


def test_a_lone_surrogate_in_an_edit_field_is_a_400_naming_it() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_edit({"prompt": "\udfff"}, {"image": [b"i"]}, LIMITS)
    assert info.value.param == "prompt"


@pytest.mark.parametrize(
    ("field", "text"),
    [
        ("n", "\uff12"),  # full-width
        ("n", "\u0662"),  # Arabic-Indic
        ("n", "\u00b2"),  # superscript
        ("n", "1_0"),
        ("seed", "\u0664\u0662"),
        ("num_inference_steps", "\uff11\uff10"),
        ("strength", "\uff10.\uff15"),
        ("strength", "\u0660.\u0665"),
        ("guidance_scale", "5_0"),
        ("size", "\uff16\uff14x\uff16\uff14"),
        ("size", "\u0666\u0664x\u0666\u0664"),
    ],
)
def test_numbers_in_form_fields_are_ascii_digits_only(field: str, text: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_edit({"prompt": "x", field: text}, {"image": [b"i"]}, LIMITS)
    assert info.value.param == field


def test_a_json_size_in_unicode_digits_is_refused() -> None:
    for size in ("\uff16\uff14x\uff16\uff14", "\u0666\u0664x\u0666\u0664"):
        with pytest.raises(InvalidRequest) as info:
            parse_generation({"prompt": "x", "size": size}, LIMITS)
        assert info.value.param == "size"


@pytest.mark.parametrize("field", ["n", "seed", "num_inference_steps"])
def test_an_integer_past_pythons_digit_limit_is_a_400(field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_edit({"prompt": "x", field: "7" * 5000}, {"image": [b"i"]}, LIMITS)
    assert info.value.param == field and len(info.value.message) < 200
    with pytest.raises(InvalidRequest) as info:  # in JSON (below the limit json.loads keeps)
        parse_generation({"prompt": "x", field: 7 * 10**4000}, LIMITS)
    assert info.value.param == field and len(info.value.message) < 200


@pytest.mark.parametrize("field", ["guidance_scale"])
def test_an_integer_too_large_for_a_float_is_a_400(field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_generation({"prompt": "x", field: 10**400}, LIMITS)
    assert info.value.param == field
    with pytest.raises(InvalidRequest):
        parse_edit({"prompt": "x", "strength": "1" * 400}, {"image": [b"i"]}, LIMITS)


def test_ascii_numbers_in_form_fields_still_parse() -> None:
    fields = {"prompt": "x", "n": " +2 ", "strength": ".5", "guidance_scale": "7.5e0", "seed": "007"}
    req, _ = parse_edit(fields, {"image": [b"i"]}, LIMITS)
    assert (req.n, req.strength, req.guidance, req.seed) == (2, 0.5, 7.5, 7)


@pytest.mark.parametrize(
    "value",
    [
        "\u00b2",
        "\uff12",
        "\u0662",
        "\u0661\u0660\u0662\u0664x\u0661\u0660\u0662\u0664",
        "\uff11\uff10\uff12\uff14x\uff11\uff10\uff12\uff14",
        "7" * 5000,
        10**400,
        "1" * 400,
        [1],
        {"a": 1},
    ],
)
def test_the_cost_view_reads_unicode_digits_and_huge_numbers_as_unset(value: Any) -> None:
    fields = {"n": value, "size": value, "num_inference_steps": value, "strength": value}
    assert cost_view(fields) == CostView()


def test_the_cost_view_of_something_that_is_not_an_object_is_the_default() -> None:
    assert cost_view([1, 2]) == cost_view("x") == cost_view(None) == CostView()


# --- OpenAI's moderation field ---


@pytest.mark.parametrize("value", ["auto", "low"])
def test_moderation_is_accepted_at_auto_and_low(value: str) -> None:
    assert parse_generation({"prompt": "x", "moderation": value}, LIMITS).prompt == "x"


@pytest.mark.parametrize("value", ["high", "", 1, None, True])
def test_other_moderation_values_are_refused(value: Any) -> None:
    if value is None:  # JSON null means "not given"
        parse_generation({"prompt": "x", "moderation": value}, LIMITS)
        return
    with pytest.raises(InvalidRequest) as info:
        parse_generation({"prompt": "x", "moderation": value}, LIMITS)
    assert info.value.param == "moderation"


def test_style_stays_an_unknown_parameter() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_generation({"prompt": "x", "style": "vivid"}, LIMITS)
    assert info.value.code == "unknown_parameter"


# --- an edit must leave a denoising step ---


def edit(steps: int, strength: str | None) -> ImageRequest:
    fields = {"prompt": "x", "num_inference_steps": str(steps)}
    if strength is not None:
        fields["strength"] = strength
    req, _ = parse_edit(fields, {"image": [b"i"]}, LIMITS)
    return resolve_defaults(req, DEFAULTS, LIMITS, image_size=(64, 64))


@pytest.mark.parametrize(
    ("steps", "strength", "pipeline_strength", "param"),
    [
        (2, "0.3", 0.8, "strength"),
        (4, "0.2", None, "strength"),
        (3, "0.33", 1.0, "strength"),
        (1, None, 0.8, "num_inference_steps"),
    ],
)
def test_an_edit_that_leaves_no_denoising_step_is_a_400_naming_both(
    steps: int, strength: str | None, pipeline_strength: float | None, param: str
) -> None:
    with pytest.raises(InvalidRequest) as info:
        schema.check_denoising_steps(edit(steps, strength), pipeline_strength)
    assert info.value.param == param
    assert "num_inference_steps" in info.value.message and "strength" in info.value.message


@pytest.mark.parametrize(
    ("steps", "strength", "pipeline_strength"),
    [(10, "0.1", 0.8), (2, "0.5", 0.8), (2, None, 0.8), (1, None, 1.0), (1, None, None), (1, "1", 0.3)],
)
def test_an_edit_with_a_denoising_step_left_passes(
    steps: int, strength: str | None, pipeline_strength: float | None
) -> None:
    schema.check_denoising_steps(edit(steps, strength), pipeline_strength)


# --- properties ---

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(alphabet=st.characters(codec=None)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
"""What ``json.loads`` can return (surrogates included: JSON's ``\\ud800`` escapes make them)."""
FIELD_NAMES = st.sampled_from(sorted(schema.BY_NAME)) | st.text(max_size=8)
NUMBERY_TEXT = st.one_of(
    st.text(alphabet=st.characters(codec=None), max_size=12),
    st.text(alphabet="0123456789+-.eExX _\u00b2\uff12\u0662", max_size=12),
    st.integers().map(str),
    st.floats().map(str),
)


@given(st.dictionaries(FIELD_NAMES, JSON_VALUES, max_size=6) | JSON_VALUES)
def test_any_json_body_parses_or_is_a_clean_4xx(body: Any) -> None:
    try:
        parse_generation(body, LIMITS)
    except (InvalidRequest, NotFound) as exc:
        assert 400 <= exc.status < 500 and exc.message
        assert exc.param is None or isinstance(exc.param, str)


@given(st.dictionaries(FIELD_NAMES, NUMBERY_TEXT, max_size=6))
def test_any_edit_form_parses_or_is_a_clean_4xx(fields: dict[str, str]) -> None:
    try:
        parse_edit(fields, {"image": [b"i"]}, LIMITS)
    except (InvalidRequest, NotFound) as exc:
        assert 400 <= exc.status < 500 and exc.message


@given(requests)
def test_a_valid_body_parses_to_exactly_its_values(body: dict[str, Any]) -> None:
    req = parse_generation(body, LIMITS)
    assert req.prompt == body["prompt"] and req.n == body.get("n", 1)
    assert req.steps == body.get("num_inference_steps") and req.seed == body.get("seed")
    assert req.guidance == (None if "guidance_scale" not in body else float(body["guidance_scale"]))
    assert (f"{req.width}x{req.height}" if req.size else None) == body.get("size")
    # and the same request written as multipart text parses to the same values
    fields = {k: repr(v) if isinstance(v, float) else str(v) for k, v in body.items()}
    as_edit, _ = parse_edit(fields, {"image": [b"i"]}, LIMITS)
    assert dataclasses.replace(as_edit, task="generate") == req


@given(st.dictionaries(FIELD_NAMES, JSON_VALUES | NUMBERY_TEXT, max_size=6) | JSON_VALUES)
def test_the_cost_view_never_raises(fields: Any) -> None:
    view = cost_view(fields)
    assert view.n >= 1 and (view.width is None) == (view.height is None)


def test_stream_and_partial_images_parse_from_json_and_forms() -> None:
    req = parse_generation({"prompt": "x", "stream": True, "partial_images": 3}, LIMITS)
    assert (req.stream, req.partial_images) == (True, 3)
    plain = parse_generation({"prompt": "x"}, LIMITS)
    assert (plain.stream, plain.partial_images) == (False, 0)
    edit, _ = parse_edit({"prompt": "x", "stream": "true", "partial_images": "2"}, {"image": [b"i"]}, LIMITS)
    assert (edit.stream, edit.partial_images) == (True, 2)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"partial_images": 1}, "partial_images"),  # previews only exist in a stream
        ({"stream": True, "partial_images": 4}, "partial_images"),
        ({"stream": True, "partial_images": -1}, "partial_images"),
        ({"stream": True, "n": 2}, "n"),  # the events carry no image index
        ({"stream": True, "response_format": "url"}, "response_format"),
        ({"stream": "yes"}, "stream"),
    ],
)
def test_stream_rules_name_the_parameter(body: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_generation({"prompt": "x", **body}, LIMITS)
    assert info.value.param == param and info.value.status == 400
