"""Image encoding (PNG, JPEG, WebP) and base64, run on the CPU pool, never on the event loop."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any

from PIL import Image

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# OpenAI's output_compression defaults to 100 (no extra compression).
DEFAULT_COMPRESSION = 100
JPEG_MAX_QUALITY = 95  # Pillow: above 95 only grows the file


@dataclass(frozen=True)
class Encoded:
    data: bytes
    format: str
    b64: bytes | None = None  # ASCII base64 of data, ready to splice into a JSON body

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]


def encode(image: Image.Image, fmt: str, compression: int | None, as_b64: bool) -> Encoded:
    level = DEFAULT_COMPRESSION if compression is None else compression
    buf = io.BytesIO()
    options: dict[str, Any]
    if fmt == "png":
        options = {"format": "PNG"}
    elif fmt == "jpeg":
        options = {"format": "JPEG", "quality": min(level, JPEG_MAX_QUALITY)}
    elif fmt == "webp":
        options = {"format": "WEBP", "quality": level}
    else:
        raise ValueError(f"unknown output format {fmt!r}")
    image.convert("RGB").save(buf, **options)
    data = buf.getvalue()
    return Encoded(data, fmt, base64.b64encode(data) if as_b64 else None)
