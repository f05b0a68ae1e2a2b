"""Decoding the files of ``POST /v1/images/edits``: the image to edit and the optional mask.

Runs on the CPU pool. Headers are checked before pixels are decoded, so a decompression bomb is
refused without being expanded. A photo's EXIF orientation is applied (to the image and to the
mask alike), so the pixels are upright as every viewer shows them.
"""

from __future__ import annotations

import io

from PIL import Image, ImageOps, UnidentifiedImageError

from imagefleet.errors import InvalidRequest

FORMATS = ("PNG", "JPEG", "WEBP")


def open_image(data: bytes, param: str, max_pixels: int) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in FORMATS:
            raise InvalidRequest(
                f"{param} must be a PNG, JPEG or WebP image, got {image.format}.", param=param
            )
        if image.width * image.height > max_pixels:
            raise InvalidRequest(
                f"{param} is {image.width}x{image.height}; uploads may have at most {max_pixels} pixels.",
                param=param,
            )
        image.load()
        upright = ImageOps.exif_transpose(image) or image
    except InvalidRequest:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError, EOFError):
        raise InvalidRequest(f"{param} is not a readable PNG, JPEG or WebP image.", param=param) from None
    return upright


def edit_mask(mask: Image.Image) -> Image.Image:
    """An inpainting mask, white where the image is to be repainted.

    As in OpenAI's API, a mask with an alpha channel marks the area to edit by full transparency;
    a mask without one is read as a grayscale image, white meaning "repaint".
    """
    if mask.mode in ("RGBA", "LA") or (mask.mode == "P" and "transparency" in mask.info):
        alpha = mask.convert("RGBA").getchannel("A")
        return alpha.point(lambda a: 255 if a == 0 else 0)
    return mask.convert("L")


def prepare(
    image_data: bytes, mask_data: bytes | None, size: tuple[int, int] | None, max_pixels: int
) -> tuple[Image.Image, Image.Image | None, tuple[int, int]]:
    """Decode, check and resize the upload(s); returns (image, mask, original size)."""
    image = open_image(image_data, "image", max_pixels)
    mask = None
    if mask_data is not None:
        raw_mask = open_image(mask_data, "mask", max_pixels)
        if raw_mask.size != image.size:
            raise InvalidRequest(
                f"mask is {raw_mask.width}x{raw_mask.height} but image is {image.width}x{image.height}; "
                "they must be the same size.",
                param="mask",
            )
        mask = edit_mask(raw_mask)
    original = image.size
    rgb = image.convert("RGB")
    if size is not None and size != original:
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
        if mask is not None:
            mask = mask.resize(size, Image.Resampling.NEAREST)
    return rgb, mask, original
