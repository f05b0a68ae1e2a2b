"""Every count the pod keeps, kept once: ``/metrics`` and ``/stats`` both read this object.

:class:`~.telemetry.PodCollector` exposes it to Prometheus at scrape time; :mod:`.reports` reads
it for ``/stats``. All updates happen on the event loop's thread (the batch loop, encode
callbacks, the request middleware), so reads there are consistent without locks.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from dataclasses import dataclass, field

from imagefleet import metrics as m

BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 12, 20, 30, 45, 60, 90, 120, 180, 300, 600)
OUTCOMES = (m.OUTCOME_COMPLETED, m.OUTCOME_FAILED, m.OUTCOME_CANCELLED)


@dataclass
class Buckets:
    """A histogram: how many observations fell at or below each bound, their sum and count."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it), ending with +inf."""
        total, out = 0, []
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += count
            out.append((bound, total))
        return out

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else 0.0


@dataclass
class PodCounters:
    requests_accepted: int = 0
    """Image requests admitted to the queue."""
    requests_completed: int = 0
    requests_failed: int = 0
    images: Counter[str] = field(default_factory=lambda: Counter(dict.fromkeys(OUTCOMES, 0)))
    """Images (samples) by outcome."""
    batch_errors: Counter[str] = field(default_factory=Counter)
    """Failed batches by cause (``pipeline``, ``injected``)."""
    other_errors: Counter[str] = field(default_factory=Counter)
    """Errors that fail no batch: ``oom`` splits, ``encode`` failures, the ``quarantine``."""
    http: Counter[tuple[str, str]] = field(default_factory=Counter)
    """Image requests by (endpoint, HTTP status), 4xx included."""
    batch_size: Buckets = field(default_factory=lambda: Buckets(BATCH_SIZE_BUCKETS))
    batch_seconds: Buckets = field(default_factory=lambda: Buckets(SECONDS_BUCKETS))
    queue_wait: Buckets = field(default_factory=lambda: Buckets(SECONDS_BUCKETS))
    request_seconds: dict[str, Buckets] = field(default_factory=dict)
    """Successful requests' durations, by endpoint."""

    def batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def request_done(self, endpoint: str, seconds: float) -> None:
        self.request_seconds.setdefault(endpoint, Buckets(SECONDS_BUCKETS)).observe(seconds)

    @property
    def errors(self) -> Counter[str]:
        """Every error by kind (the ``kind`` label of the errors metric)."""
        return self.batch_errors + self.other_errors

    @property
    def failed_batches(self) -> int:
        return sum(self.batch_errors.values())
