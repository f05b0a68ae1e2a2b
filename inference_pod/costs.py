"""Learned batch costs: how long a batch of ``b`` samples of one key takes on this GPU.

Every finished batch is an observation ``(key, b, seconds)``. A batch's time is close to affine
in its size, ``t(b) = a + c*b`` (fixed per-step work plus per-sample work), and both terms scale
with the work of one sample (steps x megapixels). So:

* a key seen at two or more batch sizes gets its own affine fit;
* a key seen at one size borrows the shape (a/c) learned across all keys;
* an unseen key is priced from the per-unit fit across all keys;
* before any batch has run, :meth:`CostModel.estimate` prices work with the conservative prior
  :data:`imagefleet.loadreport.PRIOR_UNIT_SECONDS` (per unit, no batching gain assumed).

Observations are smoothed per (key, size) with an exponential moving average, so the model
follows a GPU that warms up, throttles or is shared.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from imagefleet.inference_pod.batching import CompatKey
from imagefleet.loadreport import PRIOR_UNIT_SECONDS

EWMA_ALPHA = 0.3
RATE_WINDOW_S = 30.0


@dataclass(frozen=True)
class Affine:
    a: float
    c: float

    def at(self, b: int) -> float:
        return self.a + self.c * b


def fit(points: list[tuple[int, float]]) -> Affine | None:
    """Least-squares ``t = a + c*b`` through (b, t) points with at least two distinct b."""
    if len({b for b, _ in points}) < 2:
        return None
    n = len(points)
    mb = sum(b for b, _ in points) / n
    mt = sum(t for _, t in points) / n
    var = sum((b - mb) ** 2 for b, _ in points)
    c = sum((b - mb) * (t - mt) for b, t in points) / var
    a = mt - c * mb
    if c <= 0:  # noise or a GPU far from full: treat the batch as free per sample
        c = max(mt / max(mb, 1.0), 1e-9) * 1e-3
        a = max(mt - c * mb, 0.0)
    return Affine(max(a, 0.0), c)


class CostModel:
    """Per-key batch times, learned online."""

    def __init__(self) -> None:
        self._times: dict[CompatKey, dict[int, float]] = {}
        self._max_ok: dict[CompatKey, int] = {}

    def observe(self, key: CompatKey, size: int, seconds: float) -> None:
        if size <= 0 or not math.isfinite(seconds) or seconds <= 0:
            return
        sizes = self._times.setdefault(key, {})
        old = sizes.get(size)
        sizes[size] = seconds if old is None else (1 - EWMA_ALPHA) * old + EWMA_ALPHA * seconds

    def cap(self, key: CompatKey, size: int) -> None:
        """Remember that batches of ``key`` larger than ``size`` ran out of memory."""
        self._max_ok[key] = max(1, min(size, self._max_ok.get(key, size)))

    def max_batch(self, key: CompatKey, configured: int) -> int:
        return min(configured, self._max_ok.get(key, configured))

    @property
    def known(self) -> bool:
        return bool(self._times)

    def seconds(self, key: CompatKey, size: int) -> float | None:
        """Estimated time of a batch of ``size`` samples of ``key`` (None while nothing is known)."""
        if size <= 0:
            return 0.0
        own = self._times.get(key, {})
        line = fit(list(own.items()))
        if line is not None:
            return line.at(size)
        b0, t0 = next(iter(own.items())) if own else (0, 0.0)
        shape = self._unit_fit()
        if shape is None:
            # One batch size seen anywhere: assume time proportional to batch size and work.
            if own:
                return t0 / b0 * size
            per_sample = self._per_sample_unit_time()
            return None if per_sample is None else per_sample * key.units_per_sample * size
        if own:
            ratio = shape.a / shape.c
            c = t0 / (ratio + b0)
            return ratio * c + c * size
        return shape.at(size) * key.units_per_sample

    def estimate(self, key: CompatKey, size: int) -> float:
        """:meth:`seconds`, or the conservative prior while nothing at all has been measured."""
        seconds = self.seconds(key, size)
        return PRIOR_UNIT_SECONDS * key.units_per_sample * size if seconds is None else seconds

    def has_curve(self, key: CompatKey) -> bool:
        """Whether the batch curve of ``key`` is known (its own at two sizes or more, or the
        shape learned across all keys), so that batch sizes can be chosen from it."""
        own = self._times.get(key, {})
        return len(own) >= 2 or self._unit_fit() is not None

    def unit_seconds(self, batch: int) -> float:
        """Seconds per work unit per sample at batch size ``batch`` (0 while unknown)."""
        shape = self._unit_fit()
        if shape is not None:
            return shape.at(batch) / batch
        per_sample = self._per_sample_unit_time()
        return per_sample or 0.0

    def _normalised(self) -> list[tuple[int, float]]:
        return [
            (size, seconds / key.units_per_sample)
            for key, sizes in self._times.items()
            for size, seconds in sizes.items()
            if key.units_per_sample > 0
        ]

    def _unit_fit(self) -> Affine | None:
        return fit(self._normalised())

    def _per_sample_unit_time(self) -> float | None:
        points = self._normalised()
        if not points:
            return None
        return sum(t / b for b, t in points) / len(points)


class ArrivalMeter:
    """Recent arrivals: samples per second per key, and demand in GPU-seconds at batch size 1.

    Clockless: every call says what time it is (seconds, any monotonic origin).
    """

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._events: deque[tuple[float, CompatKey, int, float]] = deque()

    def record(self, now: float, key: CompatKey, samples: int, solo_seconds: float | None) -> None:
        self._events.append((now, key, samples, solo_seconds or 0.0))
        self._trim(now)

    def _trim(self, now: float) -> None:
        horizon = now - self.window_s
        while self._events and self._events[0][0] < horizon:
            self._events.popleft()

    def rate(self, key: CompatKey, now: float) -> float:
        self._trim(now)
        return sum(n for _, k, n, _ in self._events if k == key) / self.window_s

    def utilisation(self, now: float) -> float:
        """GPU-seconds of work (at batch size 1) that arrived per second, over the window."""
        self._trim(now)
        return sum(n * solo for _, _, n, solo in self._events) / self.window_s


class BusyMeter:
    """The fraction of the recent window the GPU spent running batches (clockless, as above).

    Arrivals come in bursts (closed-loop clients resubmit together), so demand measured from
    arrivals swings around its mean; the GPU's own busy time is smooth, and near 1 exactly when
    the queue never drains.
    """

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._spans: deque[tuple[float, float]] = deque()
        self._running_since: float | None = None

    def start(self, now: float) -> None:
        self._running_since = now

    def stop(self, now: float) -> None:
        if self._running_since is not None:
            self._spans.append((self._running_since, now))
            self._running_since = None

    def fraction(self, now: float) -> float:
        horizon = now - self.window_s
        while self._spans and self._spans[0][1] < horizon:
            self._spans.popleft()
        busy = sum(end - max(start, horizon) for start, end in self._spans)
        if self._running_since is not None:
            busy += now - max(self._running_since, horizon)
        return busy / self.window_s
