"""The Images API request, declared once as a table of fields; everything else is derived from it.

Shared by the inference pod (which serves the request) and the router (which estimates its cost).
:data:`FIELDS` lists every request field with its kind, bounds, default source, whether it
enters the batching compatibility key, whether it prices the request, and the tasks that accept
it. From that one table come:

* strict parsing (:func:`parse_generation`, :func:`parse_edit`): a wrong type, a value out of
  range, an unknown field or a field this server cannot honour raises
  :class:`~imagefleet.errors.InvalidRequest` naming the parameter;
* default resolution (:func:`model_defaults`, :func:`resolve_defaults`): constants while parsing,
  then the served model's defaults (which pod settings may override), the upload's own size for
  edits, and a random seed, all in one place;
* the router's lenient cost view (:func:`cost_view`): the pricing fields read without
  validating, within the widest bounds any pod accepts;
* the field table of docs/api.md (:func:`markdown_table`; a test checks the doc matches).

Adding a field is one row in :data:`FIELDS` (and its attribute on :class:`ImageRequest`, which a
test keeps in step with the table), plus its use in the pod's worker. OpenAI fields that only make
sense for OpenAI's own models are accepted only at values that describe what this server does
anyway (``quality="auto"``, ``background="opaque"``, ``moderation="auto"``).

Text must be valid Unicode (a JSON string may hold a lone UTF-16 surrogate, which no tokenizer
takes), and numbers are written in ASCII digits only: Python's ``int`` and ``float`` also read
full-width, Arabic-Indic and other Unicode digits, which no client means as numbers.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

from imagefleet.errors import InvalidRequest, NotFound
from imagefleet.loadreport import work_units
from imagefleet.settings import PodSettings, flag_name
from imagefleet.settings import parse_size as parse_setting_size

Task = Literal["generate", "edit"]
TASKS: tuple[Task, ...] = ("generate", "edit")
ENDPOINTS: dict[Task, str] = {"generate": "generations", "edit": "edits"}
RESPONSE_FORMATS = ("b64_json", "url")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
TIERS = ("lossless", "fast")
"""Quality tiers: ``lossless`` is the eager pipeline's maths (compiled, fused: bf16 rounding apart);
``fast`` trades exactness for speed (a step cache). Every response names the tier that made it."""
MAX_SEED = 2**63 - 1
MAX_GUIDANCE = 100.0
MAX_USER_CHARS = 256
MAX_PARTIAL_IMAGES = 3
_SIZE = re.compile(r"^([0-9]{1,6})x([0-9]{1,6})$")
_INTEGER = re.compile(r"[+-]?[0-9]+")
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
MAX_DIGITS = 40
"""An integer written with more digits is refused unread (every bound here has at most 19)."""


class Kind(enum.Enum):
    """How a field is written on the wire (JSON value, or multipart text or file)."""

    TEXT = "string"
    INTEGER = "integer"
    NUMBER = "number"
    BOOLEAN = "boolean"
    CHOICE = "choice"  # a string from ``Field.choices``
    SIZE = "size"  # "WxH" or "auto"
    FILE = "file"  # a multipart file part (edits)


class DefaultFrom(enum.Enum):
    """Where a field's value comes from when the request leaves it out."""

    REQUIRED = "required"
    CONSTANT = "constant"  # Field.value, filled in while parsing
    NONE = "none"  # stays None: the feature is not used
    MODEL = "model"  # the served model's default; the pod setting Field.setting overrides it
    IMAGE_OR_MODEL = "image or model"  # edits: the uploaded image's own size; else as MODEL
    RANDOM = "random"  # drawn per request, below the field's upper bound
    PIPELINE = "pipeline"  # stays None: the diffusers pipeline's own default applies


# --- bounds ------------------------------------------------------------------------------------


class Bound(Protocol):
    def at(self, limits: Limits) -> float:
        """The bound on a pod with ``limits``."""

    def widest(self) -> float:
        """The bound on the most permissive pod settings allow (the router's lenient view)."""

    def text(self) -> str:
        """The bound as docs/api.md writes it."""


@dataclass(frozen=True)
class Const:
    value: float

    def at(self, limits: Limits) -> float:
        return self.value

    def widest(self) -> float:
        return self.value

    def text(self) -> str:
        return _number(self.value)


@dataclass(frozen=True)
class Limit:
    """A bound set by a pod setting: ``Limits.<attr>``, from ``PodSettings.<setting>``."""

    attr: str
    setting: str

    def at(self, limits: Limits) -> float:
        value: int = getattr(limits, self.attr)
        return value

    def widest(self) -> float:
        maximum: float | None = _setting_field(self.setting).metadata.get("maximum")
        return math.inf if maximum is None else maximum

    def text(self) -> str:
        return f"`{flag_name(self.setting)}` ({_setting_field(self.setting).default})"


@dataclass(frozen=True)
class Minus:
    """``top`` less a limit (the seed: image *i* of a request uses ``seed + i``)."""

    top: int
    limit: Limit

    def at(self, limits: Limits) -> float:
        return self.top - self.limit.at(limits)

    def widest(self) -> float:
        minimum: float = _setting_field(self.limit.setting).metadata.get("minimum") or 0
        return self.top - minimum

    def text(self) -> str:
        return f"2^63 - 1 - `{flag_name(self.limit.setting)}`"


def _setting_field(name: str) -> dataclasses.Field[Any]:
    return next(f for f in dataclasses.fields(PodSettings) if f.name == name)


MAX_N = Limit("max_n", "max_images_per_request")
MAX_STEPS = Limit("max_steps", "max_steps")
MAX_PROMPT_CHARS = Limit("max_prompt_chars", "max_prompt_chars")
MAX_SIDE = Limit("max_side", "max_side")
MAX_PIXELS = Limit("max_pixels", "max_pixels")
LIMITS = (MAX_N, MAX_STEPS, MAX_PROMPT_CHARS, MAX_SIDE, MAX_PIXELS)


@dataclass(frozen=True)
class Limits:
    """What the served model and the pod's settings allow (see :data:`LIMITS` for the settings)."""

    model: str
    size_multiple: int
    max_n: int
    max_pixels: int
    max_side: int
    max_steps: int
    max_prompt_chars: int
    tiers: tuple[str, ...] = TIERS[:1]

    @classmethod
    def from_settings(cls, settings: PodSettings, *, model: str, size_multiple: int) -> Limits:
        values = {limit.attr: getattr(settings, limit.setting) for limit in LIMITS}
        tiers = tuple(t for t in TIERS if t in settings.tiers.split(","))
        return cls(model=model, size_multiple=size_multiple, tiers=tiers, **values)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Limits:
        values = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        if "tiers" in values:
            values["tiers"] = tuple(values["tiers"])
        return cls(**values)


# --- the table ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One request field. See the module docstring for what is derived from it."""

    name: str
    kind: Kind
    attr: str | None
    """The :class:`ImageRequest` attribute; None for OpenAI fields accepted only at no-op values."""
    default: DefaultFrom = DefaultFrom.NONE
    value: Any = None
    """The default of a CONSTANT field."""
    lo: Bound | None = None
    hi: Bound | None = None
    """Numbers: inclusive bounds. Text: ``hi`` is the most characters."""
    open_lo: bool = False
    choices: tuple[Any, ...] = ()
    """CHOICE: the allowed values. A field without ``attr``: the only values accepted."""
    key: bool = False
    """Enters the compatibility key: only samples with equal values share a pipeline call."""
    prices: bool = False
    """Read by the router's cost view: the request's GPU work depends on it."""
    tasks: tuple[Task, ...] = TASKS
    setting: str | None = None
    """MODEL defaults: the pod setting that overrides the model's own default."""
    aliases: tuple[str, ...] = ()
    hint: str = ""
    """A field without ``attr``: why other values are refused."""
    doc: str = ""


EDIT: tuple[Task, ...] = ("edit",)
GENERATE: tuple[Task, ...] = ("generate",)
_CONST, _REQUIRED, _MODEL = DefaultFrom.CONSTANT, DefaultFrom.REQUIRED, DefaultFrom.MODEL

# fmt: off
FIELDS: tuple[Field, ...] = (
    Field("prompt", Kind.TEXT, "prompt", _REQUIRED, hi=MAX_PROMPT_CHARS, doc="must not be blank"),
    Field("n", Kind.INTEGER, "n", _CONST, 1, lo=Const(1), hi=MAX_N, prices=True,
          doc="each image is one *sample*"),
    Field("size", Kind.SIZE, "size", DefaultFrom.IMAGE_OR_MODEL, key=True, prices=True,
          setting="default_size",
          doc="`auto` means the default"),
    Field("response_format", Kind.CHOICE, "response_format", _CONST, "b64_json", choices=RESPONSE_FORMATS,
          doc="`url` answers with `/v1/images/files/{id}` links kept `--file-ttl-s` (1 h)"),
    Field("output_format", Kind.CHOICE, "output_format", _CONST, "png", choices=OUTPUT_FORMATS),
    Field("output_compression", Kind.INTEGER, "output_compression", lo=Const(0), hi=Const(100),
          doc="jpeg and webp only (png is lossless: asking for it there is an error); unset means 100"),
    Field("model", Kind.TEXT, "model", doc="must name the served model; anything else is `404 model_not_found`"),
    Field("user", Kind.TEXT, "user", hi=Const(MAX_USER_CHARS), doc="accepted for compatibility"),
    Field("negative_prompt", Kind.TEXT, "negative_prompt", hi=MAX_PROMPT_CHARS,
          doc="extension; needs `guidance_scale > 1` and a model that takes one"),
    Field("num_inference_steps", Kind.INTEGER, "steps", _MODEL, lo=Const(1), hi=MAX_STEPS, key=True,
          prices=True, setting="default_steps", doc="extension"),
    Field("guidance_scale", Kind.NUMBER, "guidance", _MODEL, lo=Const(0), hi=Const(MAX_GUIDANCE), key=True,
          setting="default_guidance", doc="extension"),
    Field("seed", Kind.INTEGER, "seed", DefaultFrom.RANDOM, lo=Const(0), hi=Minus(MAX_SEED, MAX_N),
          doc="extension; image *i* of the request uses `seed + i`, so the same seed gives the same images"),
    Field("strength", Kind.NUMBER, "strength", DefaultFrom.PIPELINE, lo=Const(0), hi=Const(1), open_lo=True,
          key=True, prices=True, tasks=EDIT, doc="extension: how far from the input image to go"),
    Field("tier", Kind.CHOICE, "tier", _CONST, "lossless", choices=TIERS, key=True,
          doc="extension: `fast` (opt-in, where the pod serves it) may differ from `lossless` beyond "
              "rounding; the response's `tier` field and `X-Imagefleet-Tier` header say which made it"),
    Field("image", Kind.FILE, None, _REQUIRED, tasks=EDIT, aliases=("image[]",),
          doc="PNG, JPEG or WebP; one image per request"),
    Field("mask", Kind.FILE, None, tasks=EDIT,
          doc="inpainting; same size as `image`. Fully transparent pixels (alpha 0) mark the area to "
              "repaint; a mask without alpha is read as grayscale, white = repaint"),
    Field("quality", Kind.TEXT, None, choices=("auto",),
          hint="use num_inference_steps to trade speed for quality"),
    Field("background", Kind.TEXT, None, choices=("auto", "opaque"), hint="this server produces opaque images"),
    Field("stream", Kind.BOOLEAN, "stream", _CONST, False,
          doc="`true`: server-sent events, as OpenAI's (see *Streaming*); needs `n = 1` and `b64_json`"),
    Field("partial_images", Kind.INTEGER, "partial_images", _CONST, 0, lo=Const(0), hi=Const(MAX_PARTIAL_IMAGES),
          doc="previews sent before the image while it is made; needs `stream: true`"),
    Field("moderation", Kind.TEXT, None, choices=("auto", "low"), tasks=GENERATE,
          hint="this server applies no content moderation of its own"),
)
# fmt: on

_SERVER_DEFAULTS = (DefaultFrom.MODEL, DefaultFrom.IMAGE_OR_MODEL, DefaultFrom.RANDOM)
BY_NAME: dict[str, Field] = {name: f for f in FIELDS for name in (f.name, *f.aliases)}


def fields_of(task: Task, *, files: bool = False) -> tuple[Field, ...]:
    """The fields ``task`` accepts: its text fields, or (``files``) its file fields."""
    return tuple(f for f in FIELDS if task in f.tasks and (f.kind is Kind.FILE) == files)


def names_of(task: Task, *, files: bool = False) -> frozenset[str]:
    return frozenset(name for f in fields_of(task, files=files) for name in (f.name, *f.aliases))


GENERATION_FIELDS = names_of("generate")
EDIT_FIELDS = names_of("edit")
EDIT_FILE_FIELDS = names_of("edit", files=True)
KEY_FIELDS = tuple(f for f in FIELDS if f.key)
PRICE_FIELDS = tuple(f for f in FIELDS if f.prices)


@dataclass(frozen=True, kw_only=True)
class ImageRequest:
    """A validated request; ``None`` means "the server's default" until :func:`resolve_defaults`."""

    task: Task
    prompt: str
    n: int
    size: tuple[int, int] | None
    response_format: str
    output_format: str
    output_compression: int | None
    model: str | None
    user: str | None
    negative_prompt: str | None
    steps: int | None
    guidance: float | None
    seed: int | None
    strength: float | None
    stream: bool = False
    partial_images: int = 0
    tier: str = TIERS[0]

    @property
    def width(self) -> int | None:
        return self.size[0] if self.size else None

    @property
    def height(self) -> int | None:
        return self.size[1] if self.size else None

    def unresolved(self) -> list[str]:
        """The fields still waiting for a server default (see :func:`resolve_defaults`)."""
        return [
            f.name
            for f in FIELDS
            if f.attr
            and self.task in f.tasks
            and f.default in _SERVER_DEFAULTS
            and getattr(self, f.attr) is None
        ]

    def key_values(self) -> tuple[tuple[str, Any], ...]:
        """The values of the key fields (``Field.key``) this request's task accepts, in table order."""
        return tuple((f.attr, getattr(self, f.attr)) for f in KEY_FIELDS if f.attr and self.task in f.tasks)


@dataclass(frozen=True)
class EditFiles:
    """The uploads of an edit, undecoded."""

    image: bytes
    mask: bytes | None


# --- cross-field rules -------------------------------------------------------------------------


def _compression_needs_lossy_format(values: Mapping[str, Any], limits: Limits) -> None:
    if values["output_compression"] is not None and values["output_format"] == "png":
        raise InvalidRequest(
            "output_compression applies to jpeg and webp; png is lossless.", param="output_compression"
        )


def _model_is_served(values: Mapping[str, Any], limits: Limits) -> None:
    model = values["model"]
    if model is not None and model != limits.model:
        raise NotFound(
            f"The model '{model[:200]}' is not served here; this server serves '{limits.model}'.",
            param="model",
            code="model_not_found",
        )


def _tier_is_served(values: Mapping[str, Any], limits: Limits) -> None:
    if values["tier"] not in limits.tiers:
        raise InvalidRequest(
            f"The tier '{values['tier']}' is not served here; this server serves: {', '.join(limits.tiers)}.",
            param="tier",
            code="tier_not_served",
        )


def _negative_prompt_needs_guidance(values: Mapping[str, Any], limits: Limits) -> None:
    guidance = values["guidance"]
    if values["negative_prompt"] is not None and guidance is not None and guidance <= 1.0:
        raise InvalidRequest(
            "negative_prompt needs guidance_scale > 1 (classifier-free guidance is off at <= 1).",
            param="negative_prompt",
        )


def _stream_is_one_b64_image(values: Mapping[str, Any], limits: Limits) -> None:
    """A stream's events carry one image, in base64, and no index saying which of ``n`` it is."""
    if values["partial_images"] and not values["stream"]:
        raise InvalidRequest("partial_images needs stream: true.", param="partial_images")
    if not values["stream"]:
        return
    if values["n"] != 1:
        raise InvalidRequest(
            "stream: true streams one image: its events do not say which of n images they belong to. "
            "Send n requests with n=1 (seed, seed + 1, ... to get the images of one seed).",
            param="n",
        )
    if values["response_format"] != "b64_json":
        raise InvalidRequest("stream: true sends images as b64_json only.", param="response_format")


RULES: tuple[Callable[[Mapping[str, Any], Limits], None], ...] = (
    _compression_needs_lossy_format,
    _model_is_served,
    _negative_prompt_needs_guidance,
    _stream_is_one_b64_image,
    _tier_is_served,
)
"""Checks across fields, run after every field parsed on its own."""


# --- strict parsing ----------------------------------------------------------------------------

Getter = Callable[[Field], Any]


def parse_generation(body: Any, limits: Limits) -> ImageRequest:
    """Validate the JSON body of ``POST /v1/images/generations``."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    _reject_unknown(body, GENERATION_FIELDS)
    return _parse("generate", _json_getter(body), limits)


def parse_edit(
    fields: Mapping[str, str], files: Mapping[str, Sequence[bytes]], limits: Limits
) -> tuple[ImageRequest, EditFiles]:
    """Validate the text fields and count the files of ``POST /v1/images/edits``."""
    _reject_unknown(fields, EDIT_FIELDS)
    _reject_unknown(files, EDIT_FILE_FIELDS)
    request = _parse("edit", _form_getter(fields), limits)
    uploads: dict[str, bytes | None] = {}
    for f in fields_of("edit", files=True):
        parts = [part for name in (f.name, *f.aliases) for part in files.get(name, ())]
        if not parts and f.default is DefaultFrom.REQUIRED:
            raise InvalidRequest(f"{f.name} is required: upload it as a file field.", param=f.name)
        if len(parts) > 1:
            raise InvalidRequest(f"Send at most one {f.name} per request.", param=f.name)
        uploads[f.name] = parts[0] if parts else None
    image = uploads["image"]
    assert image is not None
    return request, EditFiles(image=image, mask=uploads["mask"])


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


def _parse(task: Task, get: Getter, limits: Limits) -> ImageRequest:
    values: dict[str, Any] = {}
    for f in fields_of(task):
        value = _checked(f, get(f), limits)
        if f.attr is not None:
            values[f.attr] = value
    for f in FIELDS:  # fields another task accepts are simply unset here
        if f.attr is not None and f.attr not in values:
            values[f.attr] = None
    for rule in RULES:
        rule(values, limits)
    return ImageRequest(task=task, **values)


def _checked(f: Field, value: Any, limits: Limits) -> Any:
    """``value`` (already of the field's type, or None) checked against the field's rules."""
    if isinstance(value, str) and not _is_unicode(value):
        raise InvalidRequest(
            f"{f.name} is not valid Unicode text (it holds a lone UTF-16 surrogate).", param=f.name
        )
    if f.attr is None:  # an OpenAI field honoured only at the values that describe this server
        if value is not None and value not in f.choices:
            raise InvalidRequest(
                f"{f.name}={value!r} is not supported: {f.hint}.", param=f.name, code="unsupported_parameter"
            )
        return None
    if f.kind is Kind.SIZE and value is not None:
        value = None if value.strip().lower() == "auto" else parse_size(value, limits, f.name)
    if value is None:
        if f.default is DefaultFrom.REQUIRED:
            raise InvalidRequest(f"{f.name} is required and must not be empty.", param=f.name)
        return f.value if f.default is DefaultFrom.CONSTANT else None
    if f.kind is Kind.TEXT:
        if f.default is DefaultFrom.REQUIRED and not value.strip():
            raise InvalidRequest(f"{f.name} is required and must not be empty.", param=f.name)
        if f.hi is not None and len(value) > f.hi.at(limits):
            raise InvalidRequest(
                f"{f.name} is {len(value)} characters; the limit is {_number(f.hi.at(limits))}.", param=f.name
            )
    elif f.kind is Kind.CHOICE and value not in f.choices:
        raise InvalidRequest(
            f"{f.name} must be one of {', '.join(f.choices)}, got {value[:40]!r}.", param=f.name
        )
    elif f.kind in (Kind.INTEGER, Kind.NUMBER) and not _in_bounds(f, value, limits):
        raise InvalidRequest(f"{f.name} must be {_range_text(f, limits)}, got {_shown(value)}.", param=f.name)
    return value


def _is_unicode(text: str) -> bool:
    """Whether ``text`` is valid Unicode: encodable as UTF-8 (no lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(value: Any) -> str:
    """A value as an error message quotes it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _in_bounds(f: Field, value: float, limits: Limits | None) -> bool:
    """Within the field's bounds on a pod with ``limits`` (None: the widest any pod allows)."""
    lo = None if f.lo is None else f.lo.at(limits) if limits else f.lo.widest()
    hi = None if f.hi is None else f.hi.at(limits) if limits else f.hi.widest()
    if lo is not None and (value <= lo if f.open_lo else value < lo):
        return False
    return hi is None or value <= hi


def _range_text(f: Field, limits: Limits) -> str:
    lo = _number(f.lo.at(limits)) if f.lo else "-inf"
    hi = _number(f.hi.at(limits)) if f.hi else "inf"
    return f"in ({lo}, {hi}]" if f.open_lo else f"between {lo} and {hi}"


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _reject_unknown(body: Mapping[str, Any], allowed: frozenset[str]) -> None:
    for key in body:
        if key not in allowed:
            raise InvalidRequest(
                f"Unknown parameter: '{str(key)[:64]}'.", param=str(key)[:64], code="unknown_parameter"
            )


_PY_TYPES: dict[Kind, type] = {
    Kind.TEXT: str,
    Kind.CHOICE: str,
    Kind.SIZE: str,
    Kind.INTEGER: int,
    Kind.NUMBER: float,
    Kind.BOOLEAN: bool,
}
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}


def _json_getter(body: Mapping[str, Any]) -> Getter:
    def get(f: Field) -> Any:
        value = body.get(f.name)
        if value is None:
            return None
        kind = _PY_TYPES[f.kind]
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if not ok:
            raise InvalidRequest(f"{f.name} must be {_TYPE_NAMES[kind]}.", param=f.name)
        if kind is float:
            value = _finite(value)
            if value is None:
                raise InvalidRequest(f"{f.name} must be a finite number.", param=f.name)
        return value

    return get


def _form_getter(fields: Mapping[str, str]) -> Getter:
    def get(f: Field) -> Any:
        raw = fields.get(f.name)
        if raw is None:
            return None
        kind = _PY_TYPES[f.kind]
        if kind is str:
            return raw
        text = raw.strip()
        value: bool | int | float | None
        if kind is bool:
            value = {"true": True, "false": False}.get(text.lower())
        elif kind is int:
            value = read_int(text)
            if value is None and _INTEGER.fullmatch(text):
                raise InvalidRequest(
                    f"{f.name} must be an integer of at most {MAX_DIGITS} digits.", param=f.name
                )
        else:
            value = read_number(text)
            if value is not None and not math.isfinite(value):
                raise InvalidRequest(f"{f.name} must be a finite number.", param=f.name)
        if value is None:
            raise InvalidRequest(f"{f.name} must be {_TYPE_NAMES[kind]}, got {_shown(raw)}.", param=f.name)
        return value

    return get


def read_int(text: str) -> int | None:
    """An integer written in ASCII digits (an optional sign, at most :data:`MAX_DIGITS` digits)."""
    if not _INTEGER.fullmatch(text) or len(text.lstrip("+-")) > MAX_DIGITS:
        return None
    return int(text)


def read_number(text: str) -> float | None:
    """A decimal number written in ASCII (``1``, ``-0.5``, ``.5``, ``2e-3``); may be infinite."""
    return float(text) if _NUMBER.fullmatch(text) else None


def _finite(value: float) -> float | None:
    """``value`` as a finite float; None if it is infinite, NaN, or too large for a float."""
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


# --- defaults ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Defaults:
    """The served model's values for the fields whose default comes from the model (``MODEL``)."""

    size: tuple[int, int]
    steps: int
    guidance: float


def model_defaults(native: Defaults, settings: PodSettings, *, model: str, size_multiple: int) -> Defaults:
    """The model's own defaults, overridden by the pod settings named in the table (``--default-*``).

    Raises ValueError (the pod then fails to load, saying why) for a default size the model
    cannot make.
    """
    updates: dict[str, Any] = {}
    for f in FIELDS:
        override = getattr(settings, f.setting) if f.setting else None
        if override is None or f.attr is None:
            continue
        if f.kind is Kind.SIZE:
            width, height = parse_setting_size(override, flag_name(f.setting or ""))
            if width % size_multiple or height % size_multiple:
                raise ValueError(
                    f"{flag_name(f.setting or '')} {override}: {model} needs sides that are multiples "
                    f"of {size_multiple}"
                )
            override = (width, height)
        updates[f.attr] = override
    return replace(native, **updates)


def resolve_defaults(
    request: ImageRequest,
    defaults: Defaults,
    limits: Limits,
    *,
    image_size: tuple[int, int] | None = None,
    rng: random.Random | None = None,
) -> ImageRequest:
    """Fill every field the request left to the server (the one place defaults are resolved).

    ``image_size`` is the size of an edit's upload, its default output size (checked here, since
    the client did not choose it); ``rng`` draws the seed of a request that names none.
    """
    updates: dict[str, Any] = {}
    for f in fields_of(request.task):
        if f.attr is None or getattr(request, f.attr) is not None:
            continue
        if f.default is DefaultFrom.IMAGE_OR_MODEL and request.task == "edit":
            if image_size is None:
                raise ValueError(f"an edit's default {f.name} comes from its image")
            try:
                check_size(*image_size, limits)
            except InvalidRequest as exc:
                raise InvalidRequest(
                    f"{exc.message} Pass `size` to resize the image.", param="image"
                ) from None
            updates[f.attr] = image_size
        elif f.default in (DefaultFrom.MODEL, DefaultFrom.IMAGE_OR_MODEL):
            updates[f.attr] = getattr(defaults, f.attr)
        elif f.default is DefaultFrom.RANDOM:
            assert f.hi is not None
            updates[f.attr] = (rng or random).randrange(int(f.hi.at(limits)))
    return replace(request, **updates)


def check_denoising_steps(request: ImageRequest, pipeline_strength: float | None) -> None:
    """An edit must leave its pipeline at least one denoising step.

    Image-to-image and inpainting run ``int(steps x strength)`` of the steps (diffusers counts
    them so), and a pipeline left with none raises. ``pipeline_strength`` is the edit pipeline's
    own default, used when the request names no ``strength``. Call it once defaults are resolved.
    """
    if request.task != "edit" or request.steps is None:
        return
    strength = request.strength if request.strength is not None else pipeline_strength
    if strength is None or int(request.steps * strength) >= 1:
        return
    given = "strength" if request.strength is not None else "the model's default strength"
    raise InvalidRequest(
        f"num_inference_steps={request.steps} x strength={strength:g} ({given}) leaves no denoising "
        "step: an edit runs int(num_inference_steps x strength) steps, which must be at least 1. "
        "Raise num_inference_steps or strength.",
        param="strength" if request.strength is not None else "num_inference_steps",
    )


# --- the router's lenient view -----------------------------------------------------------------


@dataclass(frozen=True)
class CostView:
    """The pricing fields of a request (``Field.prices``); None means "the pod's default"."""

    n: int = 1
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    strength: float | None = None

    def work_units(self, *, default_width: int, default_height: int, default_steps: int) -> float:
        return work_units(
            self.n,
            self.width or default_width,
            self.height or default_height,
            self.steps or default_steps,
            self.strength,
        )


def cost_view(fields: Any) -> CostView:
    """The pricing fields of a generation (JSON object) or an edit (multipart text), read leniently.

    Nothing is validated: a value that cannot be read, or lies outside the widest bounds any pod
    accepts, is left to the pod's default (the pod rejects it in its own answer). Never raises,
    whatever ``fields`` holds.
    """
    if not isinstance(fields, Mapping):
        return CostView()
    values = {f.attr: _lenient(f, fields.get(f.name)) for f in PRICE_FIELDS if f.attr}
    size = values.pop("size", None)
    n = values.pop("n", None)
    width, height = size if size else (None, None)
    return CostView(n=n or 1, width=width, height=height, **values)


def _lenient(f: Field, value: Any) -> Any:
    if value is None or isinstance(value, bool):
        return None
    if f.kind is Kind.SIZE:
        match = _SIZE.match(value.strip().lower()) if isinstance(value, str) else None
        if match is None:
            return None
        width, height = int(match.group(1)), int(match.group(2))
        return (width, height) if width > 0 and height > 0 else None
    if f.kind is Kind.INTEGER:
        if isinstance(value, str):
            value = read_int(value.strip())
        return value if isinstance(value, int) and _in_bounds(f, value, None) else None
    if f.kind is Kind.NUMBER:
        if isinstance(value, str):
            value = read_number(value.strip())
        number = _finite(value) if isinstance(value, (int, float)) else None
        return number if number is not None and _in_bounds(f, number, None) else None
    raise NotImplementedError(f"no lenient reading of {f.kind.value} fields")


# --- docs --------------------------------------------------------------------------------------


def markdown_table() -> str:
    """The request-field table of docs/api.md, rendered from :data:`FIELDS`."""
    rows = [
        "| field | type | allowed | default | endpoints | batch key | priced | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in FIELDS:
        names = " / ".join(f"`{name}`" for name in (f.name, *f.aliases))
        endpoints = ", ".join(ENDPOINTS[t] for t in f.tasks)
        cells = [
            names,
            _type_text(f),
            _allowed_text(f),
            _default_text(f),
            endpoints,
            "yes" if f.key else "",
            "yes" if f.prices else "",
            f.doc,
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def _type_text(f: Field) -> str:
    if f.kind is Kind.CHOICE:
        return " \\| ".join(f"`{c}`" for c in f.choices)
    if f.kind is Kind.SIZE:
        return '`"WxH"` or `"auto"`'
    return str(f.kind.value)


def _allowed_text(f: Field) -> str:
    if f.attr is None and f.choices:
        values = ", ".join(f"`{str(c).lower() if isinstance(c, bool) else c}`" for c in f.choices)
        return f"only {values}: {f.hint}"
    if f.kind is Kind.SIZE:
        return (
            "sides multiples of the model's `size_multiple` (see `/v1/models`), at most "
            f"{MAX_SIDE.text()}; W*H at most {MAX_PIXELS.text()}"
        )
    if f.kind is Kind.TEXT and f.hi is not None:
        return f"at most {f.hi.text()} characters"
    if f.kind in (Kind.INTEGER, Kind.NUMBER) and f.lo is not None and f.hi is not None:
        return f"({f.lo.text()}, {f.hi.text()}]" if f.open_lo else f"{f.lo.text()} .. {f.hi.text()}"
    return ""


def _default_text(f: Field) -> str:
    if f.default is DefaultFrom.CONSTANT:
        return f"`{str(f.value).lower() if isinstance(f.value, bool) else f.value}`"
    if f.default is DefaultFrom.IMAGE_OR_MODEL:
        return f"the model's (`{flag_name(f.setting or '')}`); edits: the image's"
    if f.default is DefaultFrom.MODEL:
        return f"the model's (`{flag_name(f.setting or '')}`)"
    if f.default is DefaultFrom.NONE:
        return ""
    if f.default is DefaultFrom.PIPELINE:
        return "the pipeline's"
    return str(f.default.value)
