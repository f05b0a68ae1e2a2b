"""Bad input gets the right 4xx in OpenAI's error envelope, and loses nothing else.

Every case is followed by a good request on the same pod, which must succeed: no 500, no stack
trace, no dead worker.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image
from urllib3.filepost import encode_multipart_formdata

from imagefleet import settings as settings_mod
from imagefleet.inference_pod.app import create_app
from imagefleet.settings import PodSettings
from imagefleet.testing.servers import ServerThread, wait_ready
from tests.conftest import Pod

GEN = "/v1/images/generations"
EDIT = "/v1/images/edits"


@pytest.fixture(scope="module")
def small_pod() -> Iterator[Pod]:
    """A pod with a 1 MiB body limit, so oversize bodies are cheap to send."""
    s = settings_mod.load(PodSettings, env={}, max_body_mb=1.0)
    server = ServerThread(lambda: create_app(s)).start()
    wait_ready(server.url)
    yield Pod(server)
    server.stop()


def png(size: tuple[int, int] = (64, 64), fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (120, 20, 200)).save(buf, fmt)
    return buf.getvalue()


def multipart(fields: dict[str, Any]) -> tuple[bytes, str]:
    body, content_type = encode_multipart_formdata(fields)
    return body, content_type


# (id, body, expected status, expected param or None)
JSON_CASES: list[tuple[str, Any, int, str | None]] = [
    ("missing-prompt", {}, 400, "prompt"),
    ("empty-prompt", {"prompt": ""}, 400, "prompt"),
    ("blank-prompt", {"prompt": "   "}, 400, "prompt"),
    ("prompt-int", {"prompt": 5}, 400, "prompt"),
    ("prompt-null", {"prompt": None}, 400, "prompt"),
    ("prompt-list", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("megabyte-ish-prompt", {"prompt": "x" * 200_000}, 400, "prompt"),
    ("n-zero", {"prompt": "a", "n": 0}, 400, "n"),
    ("n-1000", {"prompt": "a", "n": 1000}, 400, "n"),
    ("n-string", {"prompt": "a", "n": "2"}, 400, "n"),
    ("n-float", {"prompt": "a", "n": 1.5}, 400, "n"),
    ("n-bool", {"prompt": "a", "n": True}, 400, "n"),
    ("size-abc", {"prompt": "a", "size": "abc"}, 400, "size"),
    ("size-0x0", {"prompt": "a", "size": "0x0"}, 400, "size"),
    ("size-huge", {"prompt": "a", "size": "100000x100000"}, 400, "size"),
    ("size-not-multiple", {"prompt": "a", "size": "65x64"}, 400, "size"),
    ("size-half", {"prompt": "a", "size": "64x"}, 400, "size"),
    ("size-int", {"prompt": "a", "size": 64}, 400, "size"),
    ("size-negative", {"prompt": "a", "size": "-64x64"}, 400, "size"),
    ("size-too-many-pixels", {"prompt": "a", "size": "4096x4096"}, 400, "size"),
    ("size-side-too-long", {"prompt": "a", "size": "8192x64"}, 400, "size"),
    ("response-format", {"prompt": "a", "response_format": "gif"}, 400, "response_format"),
    ("output-format", {"prompt": "a", "output_format": "bmp"}, 400, "output_format"),
    (
        "compression-101",
        {"prompt": "a", "output_format": "jpeg", "output_compression": 101},
        400,
        "output_compression",
    ),
    ("compression-png", {"prompt": "a", "output_compression": 50}, 400, "output_compression"),
    ("steps-negative", {"prompt": "a", "num_inference_steps": -1}, 400, "num_inference_steps"),
    ("steps-zero", {"prompt": "a", "num_inference_steps": 0}, 400, "num_inference_steps"),
    ("steps-huge", {"prompt": "a", "num_inference_steps": 10_000}, 400, "num_inference_steps"),
    ("steps-string", {"prompt": "a", "num_inference_steps": "ten"}, 400, "num_inference_steps"),
    ("guidance-string", {"prompt": "a", "guidance_scale": "high"}, 400, "guidance_scale"),
    ("guidance-negative", {"prompt": "a", "guidance_scale": -1}, 400, "guidance_scale"),
    ("seed-negative", {"prompt": "a", "seed": -5}, 400, "seed"),
    ("seed-string", {"prompt": "a", "seed": "abc"}, 400, "seed"),
    ("seed-huge", {"prompt": "a", "seed": 2**70}, 400, "seed"),
    ("negative-prompt-int", {"prompt": "a", "negative_prompt": 123}, 400, "negative_prompt"),
    (
        "negative-prompt-without-cfg",
        {"prompt": "a", "negative_prompt": "blur", "guidance_scale": 1.0},
        400,
        "negative_prompt",
    ),
    ("unknown-model", {"prompt": "a", "model": "dall-e-3"}, 404, "model"),
    ("unknown-field", {"prompt": "a", "foo": 1}, 400, "foo"),
    ("style-not-honoured", {"prompt": "a", "style": "vivid"}, 400, "style"),
    ("quality-not-honoured", {"prompt": "a", "quality": "hd"}, 400, "quality"),
    ("background-not-honoured", {"prompt": "a", "background": "transparent"}, 400, "background"),
    ("stream-string", {"prompt": "a", "stream": "yes"}, 400, "stream"),
    ("stream-n-2", {"prompt": "a", "stream": True, "n": 2}, 400, "n"),
    ("stream-url", {"prompt": "a", "stream": True, "response_format": "url"}, 400, "response_format"),
    ("partial-images-without-stream", {"prompt": "a", "partial_images": 2}, 400, "partial_images"),
    ("partial-images-4", {"prompt": "a", "stream": True, "partial_images": 4}, 400, "partial_images"),
    ("user-int", {"prompt": "a", "user": 123}, 400, "user"),
    # a lone UTF-16 surrogate is valid JSON ("\ud800") but no text: it would fail its whole batch
    ("prompt-lone-surrogate", {"prompt": "a \ud800 cat"}, 400, "prompt"),
    ("negative-prompt-lone-surrogate", {"prompt": "a", "negative_prompt": "\udc00"}, 400, "negative_prompt"),
    ("user-lone-surrogate", {"prompt": "a", "user": "\ud83d"}, 400, "user"),
    ("size-full-width-digits", {"prompt": "a", "size": "\uff16\uff14x\uff16\uff14"}, 400, "size"),
    ("size-arabic-indic-digits", {"prompt": "a", "size": "\u0666\u0664x\u0666\u0664"}, 400, "size"),
    ("moderation-high", {"prompt": "a", "moderation": "high"}, 400, "moderation"),
    ("guidance-beyond-float", {"prompt": "a", "guidance_scale": 10**400}, 400, "guidance_scale"),
]

RAW_CASES: list[tuple[str, str, str, bytes, dict[str, str], int]] = [
    # (id, method, path, body, headers, expected status)
    ("malformed-json", "POST", GEN, b'{"prompt": ', {"Content-Type": "application/json"}, 400),
    ("json-array", "POST", GEN, b"[]", {"Content-Type": "application/json"}, 400),
    ("json-string", "POST", GEN, b'"a cat"', {"Content-Type": "application/json"}, 400),
    (
        "json-nan",
        "POST",
        GEN,
        b'{"prompt": "a", "guidance_scale": NaN}',
        {"Content-Type": "application/json"},
        400,
    ),
    ("deep-json", "POST", GEN, b"[" * 100_000 + b"]" * 100_000, {"Content-Type": "application/json"}, 400),
    ("invalid-utf8", "POST", GEN, b'{"prompt": "\xff\xfe"}', {"Content-Type": "application/json"}, 400),
    ("wrong-content-type", "POST", GEN, b'{"prompt": "a"}', {"Content-Type": "text/plain"}, 415),
    ("no-content-type", "POST", GEN, b'{"prompt": "a"}', {"Content-Type": ""}, 415),
    (
        "oversize-body",
        "POST",
        GEN,
        b'{"prompt": "' + b"x" * (2 * 1024 * 1024) + b'"}',
        {"Content-Type": "application/json"},
        413,
    ),
    (
        "n-past-the-digit-limit",
        "POST",
        GEN,
        b'{"prompt": "a", "n": ' + b"1" * 5000 + b"}",
        {"Content-Type": "application/json"},
        400,
    ),
    (
        "seed-past-the-digit-limit",
        "POST",
        GEN,
        b'{"prompt": "a", "seed": ' + b"9" * 4301 + b"}",
        {"Content-Type": "application/json"},
        400,
    ),
    ("get-on-post-route", "GET", GEN, b"", {}, 405),
    ("unknown-route", "GET", "/v1/images/variations", b"", {}, 404),
    ("edits-json", "POST", EDIT, b'{"prompt": "a"}', {"Content-Type": "application/json"}, 415),
    (
        "broken-multipart",
        "POST",
        EDIT,
        b"--xyz\r\nthis is not a part\r\n",
        {"Content-Type": "multipart/form-data; boundary=xyz"},
        400,
    ),
    ("multipart-no-boundary", "POST", EDIT, b"abc", {"Content-Type": "multipart/form-data"}, 400),
    ("unknown-file", "GET", "/v1/images/files/nothere.png", b"", {}, 404),
    ("traversal-file", "GET", "/v1/images/files/..%2F..%2Fetc%2Fpasswd", b"", {}, 404),
]

EDIT_CASES: list[tuple[str, dict[str, Any], int, str | None]] = [
    ("missing-image", {"prompt": "a"}, 400, "image"),
    (
        "non-image-upload",
        {"prompt": "a", "image": ("a.png", b"hello, not an image", "image/png")},
        400,
        "image",
    ),
    ("truncated-png", {"prompt": "a", "image": ("a.png", png()[:60], "image/png")}, 400, "image"),
    ("gif-upload", {"prompt": "a", "image": ("a.gif", png(fmt="GIF"), "image/gif")}, 400, "image"),
    (
        "mask-other-size",
        {
            "prompt": "a",
            "image": ("a.png", png((64, 64)), "image/png"),
            "mask": ("m.png", png((32, 32)), "image/png"),
        },
        400,
        "mask",
    ),
    (
        "mask-not-image",
        {"prompt": "a", "image": ("a.png", png(), "image/png"), "mask": ("m.png", b"nope", "image/png")},
        400,
        "mask",
    ),
    (
        "two-images",
        {"prompt": "a", "image[]": [("a.png", png(), "image/png"), ("b.png", png(), "image/png")]},
        400,
        "image",
    ),
    (
        "unknown-form-field",
        {"prompt": "a", "image": ("a.png", png(), "image/png"), "colour": "red"},
        400,
        "colour",
    ),
    ("strength-2", {"prompt": "a", "image": ("a.png", png(), "image/png"), "strength": "2"}, 400, "strength"),
    (
        "strength-text",
        {"prompt": "a", "image": ("a.png", png(), "image/png"), "strength": "abc"},
        400,
        "strength",
    ),
    ("n-text", {"prompt": "a", "image": ("a.png", png(), "image/png"), "n": "many"}, 400, "n"),
    ("edit-missing-prompt", {"image": ("a.png", png(), "image/png")}, 400, "prompt"),
    ("edit-size-not-multiple", {"prompt": "a", "image": ("a.png", png((60, 60)), "image/png")}, 400, "image"),
    ("n-full-width", {"prompt": "a", "image": ("a.png", png(), "image/png"), "n": "\uff12"}, 400, "n"),
    ("n-arabic-indic", {"prompt": "a", "image": ("a.png", png(), "image/png"), "n": "\u0662"}, 400, "n"),
    ("n-superscript", {"prompt": "a", "image": ("a.png", png(), "image/png"), "n": "\u00b2"}, 400, "n"),
    (
        "n-past-the-digit-limit",
        {"prompt": "a", "image": ("a.png", png(), "image/png"), "n": "1" * 5000},
        400,
        "n",
    ),
    (
        "seed-past-the-digit-limit",
        {"prompt": "a", "image": ("a.png", png(), "image/png"), "seed": "9" * 5000},
        400,
        "seed",
    ),
    (
        "steps-full-width",
        {"prompt": "a", "image": ("a.png", png(), "image/png"), "num_inference_steps": "\uff14"},
        400,
        "num_inference_steps",
    ),
    (
        "size-full-width",
        {"prompt": "a", "image": ("a.png", png(), "image/png"), "size": "\uff16\uff14x\uff16\uff14"},
        400,
        "size",
    ),
    (
        "strength-arabic-indic",
        {"prompt": "a", "image": ("a.png", png(), "image/png"), "strength": "\u0660.\u0665"},
        400,
        "strength",
    ),
    # int(num_inference_steps x strength) == 0: the pipeline would be left no denoising step
    (
        "no-denoising-step",
        {
            "prompt": "a",
            "image": ("a.png", png(), "image/png"),
            "num_inference_steps": "2",
            "strength": "0.3",
        },
        400,
        "strength",
    ),
    (
        "no-denoising-step-at-the-default-strength",
        {"prompt": "a", "image": ("a.png", png(), "image/png"), "num_inference_steps": "1"},
        400,
        "num_inference_steps",
    ),
    (
        "oversize-upload",
        {"prompt": "a", "image": ("a.png", b"\x89PNG" + b"0" * (2 * 1024 * 1024), "image/png")},
        413,
        None,
    ),
]


def assert_envelope(status: int, body: Any, expected_status: int, param: str | None) -> None:
    assert status == expected_status, body
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


def assert_still_serving(pod: Pod) -> None:
    status, body = pod.generate(size="64x64")
    assert status == 200, body
    assert len(body["data"]) == 1


@pytest.mark.parametrize(
    ("body", "status", "param"), [c[1:] for c in JSON_CASES], ids=[c[0] for c in JSON_CASES]
)
def test_bad_generation_fields(small_pod: Pod, body: Any, status: int, param: str | None) -> None:
    got, _, answer = small_pod.request("POST", GEN, body)
    assert_envelope(got, answer, status, param)
    assert_still_serving(small_pod)


@pytest.mark.parametrize(
    ("method", "path", "raw", "headers", "status"), [c[1:] for c in RAW_CASES], ids=[c[0] for c in RAW_CASES]
)
def test_bad_raw_requests(
    small_pod: Pod, method: str, path: str, raw: bytes, headers: dict[str, str], status: int
) -> None:
    got, _, answer = small_pod.request(method, path, raw=raw if method == "POST" else None, headers=headers)
    assert_envelope(got, answer if isinstance(answer, dict) else json.loads(answer or b"{}"), status, None)
    assert_still_serving(small_pod)


@pytest.mark.parametrize(
    ("fields", "status", "param"), [c[1:] for c in EDIT_CASES], ids=[c[0] for c in EDIT_CASES]
)
def test_bad_edits(small_pod: Pod, fields: dict[str, Any], status: int, param: str | None) -> None:
    flat: list[tuple[str, Any]] = []
    for name, value in fields.items():
        for item in value if isinstance(value, list) else [value]:
            flat.append((name, item))
    body, content_type = encode_multipart_formdata(flat)
    got, _, answer = small_pod.request("POST", EDIT, raw=body, headers={"Content-Type": content_type})
    assert_envelope(got, answer, status, param)
    assert_still_serving(small_pod)


def test_there_are_at_least_forty_bad_inputs() -> None:
    assert len(JSON_CASES) + len(RAW_CASES) + len(EDIT_CASES) >= 40
