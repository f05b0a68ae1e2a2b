"""What a request will cost, read leniently from its body before it is sent anywhere.

The router prices a request in work units (:func:`imagefleet.loadreport.work_units`: images x
steps x megapixels) to compare pods by seconds of GPU work. It never validates: the pod does that
fully and answers in the same envelope. Any field the router cannot read is left to the pod's
default, so a malformed field costs like a default request and the pod rejects it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from imagefleet.errors import InvalidRequest
from imagefleet.loadreport import LoadReport, work_units

_SIZE = re.compile(r"^\s*(\d{1,6})x(\d{1,6})\s*$", re.IGNORECASE)
MAX_N = 1000
MAX_STEPS = 10_000


@dataclass(frozen=True)
class Shape:
    """The cost-relevant fields of a request; None means "the pod's default"."""

    n: int = 1
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    strength: float | None = None

    def units(self, report: LoadReport) -> float:
        return work_units(
            self.n,
            self.width or report.default_width,
            self.height or report.default_height,
            self.steps or report.default_steps,
            self.strength,
        )


FREE = Shape(n=0)
"""A request that does no GPU work (model list, file download)."""


def _int(value: Any, upper: int) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        value = value.strip()
        if not value.isdigit():
            return None
        value = int(value)
    if isinstance(value, int) and 1 <= value <= upper:
        return value
    return None


def _float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if 0.0 < number <= 1.0 else None


def _size(value: Any) -> tuple[int | None, int | None]:
    match = _SIZE.match(value) if isinstance(value, str) else None
    return (int(match.group(1)), int(match.group(2))) if match else (None, None)


def shape_of_json(body: bytes) -> Shape:
    """The shape of a generation's JSON body; a body that is not JSON at all is refused here already."""
    try:
        fields = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidRequest(f"The body is not valid JSON: {exc}.") from None
    return shape_of(fields) if isinstance(fields, dict) else Shape()


def shape_of(fields: Mapping[str, Any]) -> Shape:
    """The shape of a generation (JSON object) or an edit (multipart text fields)."""
    width, height = _size(fields.get("size"))
    return Shape(
        n=_int(fields.get("n"), MAX_N) or 1,
        width=width,
        height=height,
        steps=_int(fields.get("num_inference_steps"), MAX_STEPS),
        strength=_float(fields.get("strength")),
    )
