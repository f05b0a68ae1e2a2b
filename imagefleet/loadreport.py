"""The load report: what a pod publishes at ``GET /v1/load`` and a router polls.

Routers compare pods by *expected wait in seconds of GPU work*, not by request counts: a
2048x2048 50-step request is not worth the same as a 512x512 4-step one. A pod knows its own
costs (it times every batch); it reports the seconds of work already queued and a unit cost so
that a router can price the requests it has sent since the last report.

Work is counted in *units*: one sample (image) x one denoising step x one megapixel.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

PRIOR_UNIT_SECONDS = 1.0
"""Seconds of GPU time per work unit assumed before anything has been measured: conservative on
purpose (a Flux-class model on an A100 takes about 0.5, SD3.5-Medium on an H100 about 0.08), so
that a pod that has timed nothing yet over-, not under-estimates the work it admits."""


def work_units(n: int, width: int, height: int, steps: int, strength: float | None = None) -> float:
    """Units of work of ``n`` images at ``width`` x ``height`` with ``steps`` denoising steps.

    Image-to-image runs ``strength`` of the steps, so it costs that fraction.
    """
    fraction = 1.0 if strength is None else max(0.0, min(1.0, strength))
    return n * steps * fraction * (width * height) / 1e6


@dataclass(frozen=True)
class LoadReport:
    """One pod's load, as of the moment it answered."""

    model: str
    ready: bool
    quarantined: bool = False
    """Repeated device failures: the pod refuses work for good and waits to be replaced."""
    phase: str = ""
    """The pod's phase: loading, load_failed, serving, draining, quarantined or stalled ("" if unsaid)."""
    draining: bool = False
    queued_requests: int = 0
    queued_samples: int = 0
    running_samples: int = 0
    queued_seconds: float = 0.0
    running_remaining_seconds: float = 0.0
    unit_seconds: float = 0.0
    """Seconds of GPU time per work unit at the pod's usual batch size (0 until measured)."""
    max_batch_size: int = 1
    default_steps: int = 28
    default_width: int = 1024
    default_height: int = 1024
    completed_images: int = 0
    limits: dict[str, Any] = field(default_factory=dict)
    instance_id: str = ""
    """The identity the pod was started with (``--instance-id``; empty when none was given)."""

    @property
    def expected_wait_seconds(self) -> float:
        """Seconds until a newly queued sample would start, were it at the end of the queue."""
        return self.queued_seconds + self.running_remaining_seconds

    @property
    def accepting(self) -> bool:
        return self.ready and not self.quarantined and not self.draining

    def estimate_seconds(self, units: float) -> float:
        """Price ``units`` of new work with this pod's measured unit cost."""
        return units * self.unit_seconds

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["expected_wait_seconds"] = self.expected_wait_seconds
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LoadReport:
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in known})
