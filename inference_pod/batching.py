"""Batch forming: which queued samples run together, and whether to wait for more.

Pure and synchronous; :class:`~.batchstate.BatchState` owns one :class:`Queue` and asks
:func:`plan` for the next batch whenever the GPU frees. Policy (see docs/api.md, "Batching"):

* a request for ``n`` images is ``n`` samples; samples batch together when their
  :class:`CompatKey` matches (the pipeline task and every request field marked ``key`` in
  :data:`imagefleet.schema.FIELDS`); prompt, negative prompt and seed may differ inside a batch;
* the next batch is the oldest sample's group, up to ``max_batch_size`` samples, FIFO within it;
* its size and any wait come from :func:`plan`: with the GPU busy most of the time (sustained
  load) batches are as large as allowed, since that maximises throughput; under light load a
  batch is formed only where it lowers the mean completion time of the queued samples, and a
  lone request never waits for company that the measured cost curve says buys little.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from imagefleet.loadreport import work_units

# Under sustained load (utilisation at batch size 1 at least this), batches are made as large as
# allowed: the queue will not drain, and larger batches drain it fastest.
SATURATION = 0.9
# Waiting for a batch to fill must promise at least this much more throughput per sample.
MIN_WAIT_GAIN = 0.10
# While waiting, a batch is closed once no sample arrived for this long (at most), or for this
# fraction of the batch's own time, whichever is shorter.
MAX_ARRIVAL_GAP_S = 0.05
GAP_FRACTION = 0.02


@dataclass(frozen=True)
class CompatKey:
    """Samples with equal keys can share one pipeline call.

    ``task`` is the pipeline ("generate", "img2img" or "inpaint"); ``params`` are the values of the
    request's key fields (``Field.key`` in :data:`imagefleet.schema.FIELDS`, by attribute name,
    sorted), so a new key field needs no change here. Build keys with :meth:`of`.
    """

    task: str
    params: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, task: str, **params: Any) -> CompatKey:
        return cls(task, tuple(sorted(params.items())))

    def get(self, attr: str) -> Any:
        """The value of key field ``attr`` (None when this task does not take it)."""
        return next((value for name, value in self.params if name == attr), None)

    @property
    def width(self) -> int:
        return int(self.get("size")[0])

    @property
    def height(self) -> int:
        return int(self.get("size")[1])

    @property
    def steps(self) -> int:
        return int(self.get("steps"))

    @property
    def guidance(self) -> float:
        return float(self.get("guidance"))

    @property
    def strength(self) -> float | None:
        value = self.get("strength")
        return None if value is None else float(value)

    @property
    def units_per_sample(self) -> float:
        """Work units (steps x megapixels) of one sample; img2img runs ``strength`` of the steps."""
        return work_units(1, self.width, self.height, self.steps, self.strength)


_sample_ids = itertools.count()


@dataclass(eq=False)
class Sample:
    """One image to make: image ``index`` of the request ``job_id``."""

    key: CompatKey
    job_id: str
    index: int
    prompt: str
    negative_prompt: str | None
    seed: int
    enqueued_at: float
    image: Any = None
    mask: Any = None
    id: int = field(default_factory=lambda: next(_sample_ids))


@dataclass(frozen=True)
class Plan:
    """What to do with the oldest group now: run ``size`` samples, or wait ``wait_s`` first."""

    size: int
    wait_s: float = 0.0


class Queue:
    """FIFO of samples, drawn as batches of one compatibility key at a time."""

    def __init__(self) -> None:
        self._samples: deque[Sample] = deque()

    def __len__(self) -> int:
        return len(self._samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self._samples)

    def add(self, samples: Iterable[Sample]) -> None:
        self._samples.extend(samples)

    def remove(self, predicate: Callable[[Sample], bool]) -> list[Sample]:
        """Drop (and return) every queued sample for which ``predicate`` is true."""
        kept: deque[Sample] = deque()
        dropped: list[Sample] = []
        for sample in self._samples:
            (dropped if predicate(sample) else kept).append(sample)
        self._samples = kept
        return dropped

    def oldest_group(self, limit: int) -> list[Sample]:
        """The oldest sample and the next samples of its key, in order, up to ``limit``."""
        if not self._samples:
            return []
        key = self._samples[0].key
        return list(itertools.islice((s for s in self._samples if s.key == key), limit))

    def group_count(self, key: CompatKey) -> int:
        return sum(1 for s in self._samples if s.key == key)

    def has_other_keys(self, key: CompatKey) -> bool:
        return any(s.key != key for s in self._samples)

    def take(self, batch: list[Sample]) -> None:
        """Remove the samples of ``batch`` (as returned by :meth:`oldest_group`) from the queue."""
        ids = {s.id for s in batch}
        self._samples = deque(s for s in self._samples if s.id not in ids)

    def groups(self) -> dict[CompatKey, int]:
        """Queued samples per key."""
        counts: dict[CompatKey, int] = {}
        for s in self._samples:
            counts[s.key] = counts.get(s.key, 0) + 1
        return counts


def plan(
    *,
    queued: int,
    max_batch: int,
    oldest_age_s: float,
    since_last_arrival_s: float,
    max_wait_s: float,
    other_keys_waiting: bool,
    batch_seconds: Callable[[int], float | None],
    utilisation: float,
    arrivals_per_s: float,
    fill: bool = False,
) -> Plan:
    """Decide the size of the next batch of one key, and whether to wait for it to fill.

    ``queued`` samples of the key are waiting; ``batch_seconds(b)`` is the learned time of a batch
    of ``b`` (None while unknown); ``utilisation`` is the recent GPU demand at batch size 1 (1.0 =
    the GPU would be busy all the time without batching); ``arrivals_per_s`` counts recent samples
    of this key per second; ``since_last_arrival_s`` is the time since the newest queued sample.
    ``fill`` (the ``fill`` batch policy) always batches as many samples as allowed.
    """
    limit = min(queued, max_batch)
    if limit <= 0:
        return Plan(0)
    t1, tk = batch_seconds(1), batch_seconds(limit)
    size = limit
    busy = fill or utilisation >= SATURATION
    # Light load: batch only where it beats running the samples one after another on mean
    # completion time (all k finish at t(k), versus t(1), 2 t(1), ... k t(1)).
    if not busy and limit > 1 and t1 is not None and tk is not None and tk > t1 * (limit + 1) / 2:
        size = 1
    if size < limit or limit >= max_batch or other_keys_waiting:
        return Plan(size)
    remaining = max_wait_s - oldest_age_s
    tb = batch_seconds(max_batch)
    if remaining <= 0 or t1 is None or tb is None or tk is None:
        return Plan(size)
    gain = (tk / limit) / (tb / max_batch) - 1.0
    if gain < MIN_WAIT_GAIN or not (busy or arrivals_per_s * remaining >= 1.0):
        return Plan(size)
    # Wait while samples keep arriving: a burst (say, clients answered together and sending
    # again) joins one batch; once the stream pauses for `gap`, waiting longer buys nothing.
    gap = min(MAX_ARRIVAL_GAP_S, GAP_FRACTION * tk)
    if since_last_arrival_s >= gap:
        return Plan(size)
    return Plan(size, wait_s=min(remaining, gap - since_last_arrival_s))
