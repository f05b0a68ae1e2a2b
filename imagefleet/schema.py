"""The Images API request: its fields, their types and limits, and their validation.

Shared by the inference pod (which serves the request) and the router (which estimates its cost).
Parsing is strict: a wrong type, a value out of range, an unknown field or a field this server
cannot honour raises :class:`~imagefleet.errors.InvalidRequest` naming the parameter. OpenAI
fields that only make sense for OpenAI's own models are accepted only at values that describe what
this server does anyway (``quality="auto"``, ``background="opaque"``, ``stream=false``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from imagefleet.errors import InvalidRequest, NotFound

Task = Literal["generate", "edit"]
RESPONSE_FORMATS = ("b64_json", "url")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
MAX_SEED = 2**63 - 1
MAX_GUIDANCE = 100.0
MAX_USER_CHARS = 256
_SIZE = re.compile(r"^(\d{1,6})x(\d{1,6})$")

# OpenAI fields accepted only at the values this server honours by construction.
_NO_OP_VALUES: dict[str, tuple[Any, ...]] = {
    "quality": ("auto",),
    "background": ("auto", "opaque"),
    "stream": (False,),
    "partial_images": (0,),
}
_NO_OP_HINT = {
    "quality": "use num_inference_steps to trade speed for quality",
    "background": "this server produces opaque images",
    "stream": "this server answers with complete images only",
    "partial_images": "this server answers with complete images only",
}
_COMMON_FIELDS = (
    "prompt",
    "n",
    "size",
    "response_format",
    "output_format",
    "output_compression",
    "model",
    "user",
    "negative_prompt",
    "num_inference_steps",
    "guidance_scale",
    "seed",
    *_NO_OP_VALUES,
)
GENERATION_FIELDS = frozenset(_COMMON_FIELDS)
EDIT_FIELDS = frozenset((*_COMMON_FIELDS, "strength"))
EDIT_FILE_FIELDS = frozenset(("image", "image[]", "mask"))


@dataclass(frozen=True)
class Limits:
    """What the served model and the pod's settings allow."""

    model: str
    max_n: int = 10
    max_pixels: int = 2048 * 2048
    max_side: int = 4096
    size_multiple: int = 8
    max_steps: int = 150
    max_prompt_chars: int = 4000
    default_width: int = 1024
    default_height: int = 1024

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Limits:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass(frozen=True)
class ImageRequest:
    """A validated request. ``None`` means "the server's default" and is resolved by the pod."""

    task: Task
    prompt: str
    n: int = 1
    width: int | None = None
    height: int | None = None
    response_format: str = "b64_json"
    output_format: str = "png"
    output_compression: int | None = None
    model: str | None = None
    user: str | None = None
    negative_prompt: str | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    strength: float | None = None

    def with_defaults(self, *, width: int, height: int, steps: int, guidance: float) -> ImageRequest:
        return replace(
            self,
            width=self.width or width,
            height=self.height or height,
            steps=self.steps or steps,
            guidance=guidance if self.guidance is None else self.guidance,
        )


def parse_generation(body: Any, limits: Limits) -> ImageRequest:
    """Validate the JSON body of ``POST /v1/images/generations``."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    _reject_unknown(body, GENERATION_FIELDS)
    return _parse_common(body, limits, "generate", _json_getter(body))


def parse_edit(fields: Mapping[str, str], limits: Limits) -> ImageRequest:
    """Validate the text fields of ``POST /v1/images/edits`` (the files are checked by the pod)."""
    _reject_unknown(fields, EDIT_FIELDS)
    get = _form_getter(fields)
    request = _parse_common(fields, limits, "edit", get)
    strength = get("strength", float)
    if strength is not None and not 0.0 < strength <= 1.0:
        raise InvalidRequest("strength must be in (0, 1].", param="strength")
    return replace(request, strength=strength)


def parse_size(value: str, limits: Limits, param: str = "size") -> tuple[int, int]:
    """``"WxH"`` -> (width, height), checked against the model's multiple and the pixel bounds."""
    match = _SIZE.match(value.strip().lower())
    if not match:
        raise InvalidRequest(
            f"size must look like '1024x1024' (WIDTHxHEIGHT), got {value[:40]!r}.", param=param
        )
    width, height = int(match.group(1)), int(match.group(2))
    check_size(width, height, limits, param)
    return width, height


def check_size(width: int, height: int, limits: Limits, param: str = "size") -> None:
    m = limits.size_multiple
    if width < m or height < m:
        raise InvalidRequest(
            f"size {width}x{height} is too small: each side must be at least {m}.", param=param
        )
    if width % m or height % m:
        raise InvalidRequest(
            f"size {width}x{height}: width and height must be multiples of {m} for this model.", param=param
        )
    if width > limits.max_side or height > limits.max_side:
        raise InvalidRequest(
            f"size {width}x{height}: each side must be at most {limits.max_side}.", param=param
        )
    if width * height > limits.max_pixels:
        raise InvalidRequest(
            f"size {width}x{height} is {width * height} pixels; the most this server renders is "
            f"{limits.max_pixels}.",
            param=param,
        )


# --- helpers -----------------------------------------------------------------------------------


def _reject_unknown(body: Mapping[str, Any], allowed: frozenset[str]) -> None:
    for key in body:
        if key not in allowed:
            raise InvalidRequest(
                f"Unknown parameter: '{str(key)[:64]}'.", param=str(key)[:64], code="unknown_parameter"
            )


def _parse_common(body: Mapping[str, Any], limits: Limits, task: Task, get: Any) -> ImageRequest:
    prompt = get("prompt", str)
    if prompt is None or not prompt.strip():
        raise InvalidRequest("prompt is required and must not be empty.", param="prompt")
    _check_length("prompt", prompt, limits.max_prompt_chars)
    negative = get("negative_prompt", str)
    if negative is not None:
        _check_length("negative_prompt", negative, limits.max_prompt_chars)

    n = get("n", int)
    if n is None:
        n = 1
    if not 1 <= n <= limits.max_n:
        raise InvalidRequest(f"n must be between 1 and {limits.max_n}, got {n}.", param="n")

    width = height = None
    size = get("size", str)
    if size is not None and size.strip().lower() != "auto":
        width, height = parse_size(size, limits)
    elif task == "generate":
        width, height = limits.default_width, limits.default_height

    response_format = _choice(get("response_format", str), RESPONSE_FORMATS, "response_format", "b64_json")
    output_format = _choice(get("output_format", str), OUTPUT_FORMATS, "output_format", "png")
    compression = get("output_compression", int)
    if compression is not None:
        if not 0 <= compression <= 100:
            raise InvalidRequest("output_compression must be between 0 and 100.", param="output_compression")
        if output_format == "png":
            raise InvalidRequest(
                "output_compression applies to jpeg and webp; png is lossless.", param="output_compression"
            )

    model = get("model", str)
    if model is not None and model != limits.model:
        raise NotFound(
            f"The model '{model[:200]}' is not served here; this server serves '{limits.model}'.",
            param="model",
            code="model_not_found",
        )

    steps = get("num_inference_steps", int)
    if steps is not None and not 1 <= steps <= limits.max_steps:
        raise InvalidRequest(
            f"num_inference_steps must be between 1 and {limits.max_steps}, got {steps}.",
            param="num_inference_steps",
        )
    guidance = get("guidance_scale", float)
    if guidance is not None and not 0.0 <= guidance <= MAX_GUIDANCE:
        raise InvalidRequest(
            f"guidance_scale must be between 0 and {MAX_GUIDANCE:g}.", param="guidance_scale"
        )
    if negative is not None and guidance is not None and guidance <= 1.0:
        raise InvalidRequest(
            "negative_prompt needs guidance_scale > 1 (classifier-free guidance is off at <= 1).",
            param="negative_prompt",
        )
    seed = get("seed", int)
    if seed is not None and not 0 <= seed <= MAX_SEED - limits.max_n:
        raise InvalidRequest(f"seed must be between 0 and {MAX_SEED - limits.max_n}.", param="seed")
    user = get("user", str)
    if user is not None:
        _check_length("user", user, MAX_USER_CHARS)

    for name, allowed in _NO_OP_VALUES.items():
        value = get(name, type(allowed[0]))
        if value is not None and value not in allowed:
            raise InvalidRequest(
                f"{name}={value!r} is not supported: {_NO_OP_HINT[name]}.",
                param=name,
                code="unsupported_parameter",
            )

    return ImageRequest(
        task=task,
        prompt=prompt,
        n=n,
        width=width,
        height=height,
        response_format=response_format,
        output_format=output_format,
        output_compression=compression,
        model=model,
        user=user,
        negative_prompt=negative,
        steps=steps,
        guidance=guidance,
        seed=seed,
    )


def _check_length(name: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise InvalidRequest(f"{name} is {len(value)} characters; the limit is {limit}.", param=name)


def _choice(value: str | None, allowed: tuple[str, ...], param: str, default: str) -> str:
    if value is None:
        return default
    if value not in allowed:
        raise InvalidRequest(f"{param} must be one of {', '.join(allowed)}, got {value[:40]!r}.", param=param)
    return value


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}


def _json_getter(body: Mapping[str, Any]) -> Any:
    def get(name: str, kind: type) -> Any:
        value = body.get(name)
        if value is None:
            return None
        ok = (
            isinstance(value, kind) and not (kind is int and isinstance(value, bool))
            if kind is not float
            else isinstance(value, (int, float)) and not isinstance(value, bool)
        )
        if not ok:
            raise InvalidRequest(f"{name} must be {_TYPE_NAMES[kind]}.", param=name)
        if kind is float:
            value = float(value)
            if not math.isfinite(value):
                raise InvalidRequest(f"{name} must be a finite number.", param=name)
        return value

    return get


def _form_getter(fields: Mapping[str, str]) -> Any:
    def get(name: str, kind: type) -> Any:
        raw = fields.get(name)
        if raw is None:
            return None
        if kind is str:
            return raw
        text = raw.strip()
        try:
            if kind is bool:
                if text.lower() not in ("true", "false"):
                    raise ValueError
                return text.lower() == "true"
            value = kind(text)
        except ValueError:
            raise InvalidRequest(
                f"{name} must be {_TYPE_NAMES[kind]}, got {raw[:40]!r}.", param=name
            ) from None
        if kind is float and not math.isfinite(value):
            raise InvalidRequest(f"{name} must be a finite number.", param=name)
        return value

    return get
