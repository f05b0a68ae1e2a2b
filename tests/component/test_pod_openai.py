"""The official ``openai`` client against a real pod: what a user's code does, unchanged."""

from __future__ import annotations

import base64
import io
import urllib.request

import numpy as np
import openai
import pytest
from PIL import Image

from imagefleet import wire
from tests.conftest import Pod


def client(pod: Pod) -> openai.OpenAI:
    return openai.OpenAI(base_url=pod.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def png_bytes(size: tuple[int, int], color: tuple[int, ...], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("n", [1, 3])
def test_generate_b64(pod: Pod, n: int) -> None:
    result = client(pod).images.generate(model="tiny", prompt="a lighthouse at dusk", n=n, size="64x64")
    assert len(result.data) == n
    for item in result.data:
        assert item.b64_json and item.url is None
        image = decode(item.b64_json)
        assert image.format == "PNG" and image.size == (64, 64)


def test_generate_url_is_built_from_the_request_host(pod: Pod) -> None:
    result = client(pod).images.generate(prompt="a lighthouse", n=2, size="96x64", response_format="url")
    assert len(result.data) == 2
    for item in result.data:
        assert item.url and item.url.startswith(pod.url + "/v1/images/files/")
        with urllib.request.urlopen(item.url, timeout=10) as resp:
            assert resp.headers["Content-Type"] == "image/png"
            image = Image.open(io.BytesIO(resp.read()))
        assert image.size == (96, 64)


def test_url_starts_with_the_base_the_router_names(pod: Pod) -> None:
    status, _, body = pod.request(
        "POST",
        "/v1/images/generations",
        {"prompt": "x", "response_format": "url"},
        headers={wire.PUBLIC_BASE_HEADER: "https://images.example.com/gen"},
    )
    assert status == 200
    assert body["data"][0]["url"].startswith("https://images.example.com/gen/v1/images/files/")


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Forwarded-Host": "evil.example.com", "X-Forwarded-Proto": "https", "X-Forwarded-Prefix": "/gen"},
        {wire.PUBLIC_BASE_HEADER: "https://evil.example.com/../x"},
        {wire.PUBLIC_BASE_HEADER: "https://user@evil.example.com"},
        {"X-Forwarded-Host": "bad host/<x>"},
    ],
)
def test_url_ignores_client_forwarding_headers_and_malformed_bases(pod: Pod, headers: dict[str, str]) -> None:
    status, _, body = pod.request(
        "POST", "/v1/images/generations", {"prompt": "x", "response_format": "url"}, headers=headers
    )
    assert status == 200
    assert body["data"][0]["url"].startswith(pod.url + "/v1/images/files/")


@pytest.mark.parametrize(("fmt", "pil_format"), [("jpeg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")])
def test_output_formats(pod: Pod, fmt: str, pil_format: str) -> None:
    extra = {"output_compression": 80} if fmt != "png" else {}
    result = client(pod).images.generate(prompt="a cat", size="64x64", output_format=fmt, **extra)  # type: ignore[arg-type]
    assert decode(result.data[0].b64_json or "").format == pil_format


def test_edit_image_to_image(pod: Pod) -> None:
    result = client(pod).images.edit(
        image=("in.png", png_bytes((64, 64), (200, 30, 30)), "image/png"),
        prompt="make it blue",
        n=2,
        size="64x64",
    )
    assert len(result.data) == 2
    assert all(decode(d.b64_json or "").size == (64, 64) for d in result.data)


def mask_png(hole: tuple[int, int, int, int] | None) -> bytes:
    """An OpenAI-style mask: opaque everywhere except the transparent ``hole`` (the area to edit)."""
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    if hole:
        mask.paste((0, 0, 0, 0), hole)
    buf = io.BytesIO()
    mask.save(buf, "PNG")
    return buf.getvalue()


def test_edit_inpainting_honours_the_mask(pod: Pod) -> None:
    image = ("in.png", png_bytes((64, 64), (30, 200, 30)), "image/png")

    def edit(hole: tuple[int, int, int, int] | None, seed: int) -> np.ndarray:
        result = client(pod).images.edit(
            image=image,
            mask=("mask.png", mask_png(hole), "image/png"),
            prompt="a window",
            extra_body={"seed": seed},
        )
        return np.asarray(decode(result.data[0].b64_json or "").convert("RGB"), dtype=float)

    def seed_effect(hole: tuple[int, int, int, int] | None) -> float:
        return float(np.abs(edit(hole, seed=1) - edit(hole, seed=2)).mean())

    # Nothing to repaint: the image is kept whatever the seed (up to rounding).
    assert seed_effect(None) < 0.5
    # A hole: its content comes from the seed.
    assert seed_effect((16, 16, 48, 48)) > 5.0


def test_edit_resizes_to_requested_size(pod: Pod) -> None:
    result = client(pod).images.edit(
        image=("in.jpg", png_bytes((128, 96), (10, 10, 10)), "image/png"), prompt="night", size="64x48"
    )
    assert decode(result.data[0].b64_json or "").size == (64, 48)


def test_models_lists_the_served_model_and_says_it_is_random(pod: Pod) -> None:
    models = client(pod).models.list()
    (model,) = models.data
    assert model.id == "tiny"
    assert model.model_extra and model.model_extra["random_weights"] is True
