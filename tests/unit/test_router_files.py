"""File ids that name the pod holding the image, and the multipart fields used for pricing."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from imagefleet import wire
from imagefleet.router import forms
from imagefleet.router.discovery import backend_key


def key_of(file_id: str) -> str | None:
    parsed = wire.parse_file_id(file_id)
    return parsed.key if parsed else None


def test_key_round_trip() -> None:
    key = backend_key("http://10.0.0.7:8001")
    assert key == backend_key("http://10.0.0.7:8001") != backend_key("http://10.0.0.8:8001")
    assert key_of(wire.compose_file_id(wire.file_prefix(key), "png")) == key


@pytest.mark.parametrize(
    "file_id",
    [
        "AbC9xyz.png",  # issued without a prefix
        "~AbC9xyz.png",
        "abc~.png",
        "abc~def.gif",
        "../../etc~passwd.png",
        "http:~~evil.com~x.png",
        "a" * 300 + "~x.png",
    ],
)
def test_ids_the_router_did_not_issue_have_no_key(file_id: str) -> None:
    assert key_of(file_id) is None


async def _form_bytes(form: aiohttp.FormData) -> tuple[bytes, str]:
    payload = form()
    chunks: list[bytes] = []

    class Sink:
        async def write(self, data: bytes) -> None:
            chunks.append(bytes(data))

    await payload.write(Sink())  # type: ignore[arg-type]
    return b"".join(chunks), str(payload.content_type)


def test_text_fields_of_a_multipart_body() -> None:
    async def run() -> dict[str, str]:
        form = aiohttp.FormData()
        form.add_field("prompt", "a cat")
        form.add_field("image", b"\x89PNG" + b"\0" * 100_000, filename="a.png", content_type="image/png")
        form.add_field("size", "128x128")
        form.add_field("n", "2")
        body, content_type = await _form_bytes(form)
        return await forms.text_fields(body, content_type)

    assert asyncio.run(run()) == {"prompt": "a cat", "size": "128x128", "n": "2"}


def test_fields_behind_a_large_file_are_left_unread() -> None:
    async def run() -> dict[str, str]:
        form = aiohttp.FormData()
        form.add_field("n", "3")
        form.add_field("image", b"\0" * (forms.SCAN_LIMIT + 1024), filename="a.png", content_type="image/png")
        form.add_field("size", "128x128")
        body, content_type = await _form_bytes(form)
        return await forms.text_fields(body, content_type)

    assert asyncio.run(run()) == {"n": "3"}


@pytest.mark.parametrize(
    "body,content_type",
    [
        (b"not multipart at all", "multipart/form-data; boundary=xyz"),
        (b"--xyz\r\n", "multipart/form-data; boundary=xyz"),
        (b"", "multipart/form-data"),
        (b"--xyz\r\n1--xyz--\r\n", "multipart/form-data; boundary=xyz"),  # a part header with no colon
    ],
)
def test_malformed_bodies_give_no_fields(body: bytes, content_type: str) -> None:
    assert asyncio.run(forms.text_fields(body, content_type)) == {}
