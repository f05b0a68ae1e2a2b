"""Learned batch costs: how long a batch of ``b`` samples of one key takes on this GPU.

Every finished batch is an observation ``(key, b, seconds)``. A batch's time is close to affine
in its size, ``t(b) = a + c*b`` (fixed per-step work plus per-sample work), both terms scale with
the work ``u`` of one sample (steps x megapixels), and a call may also cost a fixed overhead
``o`` that scales with neither (prompt encoding, scheduler set-up, Python): ``t = o + u*(a + c*b)``.
So:

* a key seen at two or more batch sizes gets its own affine fit;
* across all keys, that three-term model is fitted once two shapes of different work and two
  batch sizes have been timed (the warm-up times both); with less, or where the fit says no
  overhead, the overhead is taken as zero (time proportional to work: an over- not an
  under-estimate for larger shapes);
* a key seen at one size borrows the shape of the model across keys, scaled to its observation;
* an unseen key is priced by the model across keys;
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


@dataclass(frozen=True)
class WorkModel:
    """``t = o + u*(a + c*b)``: a batch of ``b`` samples of ``u`` work units each."""

    o: float
    a: float
    c: float

    def at(self, units: float, b: int) -> float:
        return self.o + units * (self.a + self.c * b)


def fit_work(points: list[tuple[float, int, float]]) -> WorkModel | None:
    """Least-squares :class:`WorkModel` through (units, b, seconds) points: None unless the
    points hold two work sizes and two batch sizes and every term comes out positive."""
    if len({u for u, _, _ in points}) < 2 or len({b for _, b, _ in points}) < 2:
        return None
    rows = [(1.0, u, u * b) for u, b, _ in points]
    xtx = [[sum(r[i] * r[j] for r in rows) for j in range(3)] for i in range(3)]
    xty = [sum(r[i] * t for r, (_, _, t) in zip(rows, points, strict=True)) for i in range(3)]
    solution = _solve3(xtx, xty)
    if solution is None:
        return None
    o, a, c = solution
    if a < 0:  # no per-step work apart from the samples': fit t = o + c*u*b
        (o, c), a = _fit_line([(u * b, t) for u, b, t in points]), 0.0
    if o <= 0 or a < 0 or c <= 0:
        return None
    return WorkModel(o, a, c)


def _fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares intercept and slope through (x, y) points (slope 0 if every x is equal)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / var if var > 0 else 0.0
    return my - slope * mx, slope


def _solve3(m: list[list[float]], y: list[float]) -> tuple[float, float, float] | None:
    """Solve the 3x3 system ``m p = y`` (Gaussian elimination with pivoting; None if singular)."""
    a = [[*row, v] for row, v in zip(m, y, strict=True)]
    scale = max(abs(v) for row in m for v in row) or 1.0
    for col in range(3):
        pivot = max(range(col, 3), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) <= 1e-12 * scale:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(3):
            if r != col:
                f = a[r][col] / a[col][col]
                a[r] = [x - f * p for x, p in zip(a[r], a[col], strict=True)]
    return a[0][3] / a[0][0], a[1][3] / a[1][1], a[2][3] / a[2][2]


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
        model = self._work_model()
        units = key.units_per_sample
        if model is None:
            # One batch size seen anywhere: assume time proportional to batch size and work.
            if own:
                return t0 / b0 * size
            per_sample = self._per_sample_unit_time()
            return None if per_sample is None else per_sample * units * size
        if own:
            return t0 * model.at(units, size) / model.at(units, b0)
        return model.at(units, size)

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

    def _work_model(self) -> WorkModel | None:
        """The model across keys: with a per-call overhead where the data show one, else
        proportional to work."""
        points = [
            (key.units_per_sample, size, seconds)
            for key, sizes in self._times.items()
            for size, seconds in sizes.items()
            if key.units_per_sample > 0
        ]
        model = fit_work(points)
        if model is not None:
            return model
        shape = self._unit_fit()
        return None if shape is None else WorkModel(0.0, shape.a, shape.c)

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
