"""What a request will cost, read leniently from its body before it is sent anywhere.

The router prices a request in work units (:func:`imagefleet.loadreport.work_units`: images x
steps x megapixels) to compare pods by seconds of GPU work. It never validates: the pod does that
fully and answers in the same envelope. Which fields price a request, and how far each may go, is
the request table's (:func:`imagefleet.schema.cost_view`); a field the router cannot read is left
to the pod's default, so a malformed field costs like a default request and the pod rejects it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from imagefleet.errors import InvalidRequest
from imagefleet.loadreport import LoadReport
from imagefleet.schema import CostView, cost_view


@dataclasses.dataclass(frozen=True)
class Shape(CostView):
    """The pricing fields of a request; None means "the pod's default"."""

    def units(self, report: LoadReport) -> float:
        return self.work_units(
            default_width=report.default_width,
            default_height=report.default_height,
            default_steps=report.default_steps,
        )


FREE = Shape(n=0)
"""A request that does no GPU work (model list, file download)."""


def fields_of_json(body: bytes) -> dict[str, Any]:
    """A generation's JSON object ({} for other JSON: the pod says what is wrong with it); a body
    that is not JSON at all is refused here already."""
    try:
        fields = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidRequest(f"The body is not valid JSON: {exc}.") from None
    except ValueError:  # an integer past Python's digit limit (json.loads refuses to read it)
        raise InvalidRequest("The body holds an integer with too many digits.") from None
    return fields if isinstance(fields, dict) else {}


def shape_of_json(body: bytes) -> Shape:
    """The shape of a generation's JSON body."""
    fields = fields_of_json(body)
    return shape_of(fields) if fields else Shape()


def shape_of(fields: Mapping[str, Any]) -> Shape:
    """The shape of a generation (JSON object) or an edit (multipart text fields)."""
    return Shape(**dataclasses.asdict(cost_view(fields)))
