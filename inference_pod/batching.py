"""Batch forming: which queued samples run together, and whether to wait for more.

Pure and synchronous; :class:`~.batchstate.BatchState` owns one :class:`Queue` and asks
:func:`plan` for the next batch whenever the GPU frees. Policy (see docs/api.md, "Batching"):

* a request for ``n`` images is ``n`` samples; samples batch together when their
  :class:`CompatKey` matches (the pipeline task and every request field marked ``key`` in
  :data:`imagefleet.schema.FIELDS`); prompt, negative prompt and seed may differ inside a batch;
* each key has its own FIFO; the next batch comes from the key :class:`Queue` chooses by fair
  queueing on estimated GPU-seconds (so large shapes cannot starve small ones), oldest first
  within it, up to ``max_batch_size`` samples or the smaller cap :func:`curve_cap` reads from the
  measured cost curve;
* its size and any wait come from :func:`plan`: with the GPU busy most of the time, or more
  samples of the key queued than a full batch (sustained load), batches are as large as allowed,
  since that maximises throughput; under light load a batch is formed only where it lowers the
  mean completion time of the queued samples, and a lone request never waits for company that
  the measured cost curve says buys little.
"""

from __future__ import annotations

import heapq
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
# Batches are capped where the next larger sizes buy less than this much time per image.
CAP_GAIN = 0.03
# A key whose curve caps its batches below the allowed size runs one batch a size larger every this
# many of its batches while more samples wait than the cap takes, so that a curve measured badly
# once (a shared or still warming GPU) is measured again rather than believed for ever.
PROBE_EVERY = 16
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
    """Queued samples: one FIFO per compatibility key, and the fair choice between the keys.

    Keys share the GPU by start-time fair queueing on estimated GPU-seconds (the sorted form of
    deficit round robin weighted by cost): every batch a key runs is *charged* to it at its
    estimated time, and the next batch comes from the waiting key charged least, ties going to
    the key with the oldest waiting sample (so with one key, or equal charges, it is plain FIFO).
    A key that starts waiting is lifted to the charge the latest batch started from (the
    *virtual time*): idle time banks no credit, and a key that just ran a large batch keeps its
    debt. So a stream of 2048x2048 requests cannot starve 512x512 ones: while both wait, each
    gets about half of the GPU time, and a small sample that arrives behind a flood of large ones
    waits for the batch already running and at most about one batch of each other waiting key
    (plus the batches of its own key ahead of it). Within a key, samples run oldest first.
    """

    def __init__(self) -> None:
        self._fifos: dict[CompatKey, deque[Sample]] = {}
        self._charged: dict[CompatKey, float] = {}
        self._virtual = 0.0
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Sample]:
        """Every queued sample, oldest first."""
        return heapq.merge(*self._fifos.values(), key=lambda s: (s.enqueued_at, s.id))

    def add(self, samples: Iterable[Sample]) -> None:
        for sample in samples:
            fifo = self._fifos.get(sample.key)
            if fifo is None:
                self._activate(sample.key)
                fifo = self._fifos[sample.key] = deque()
            fifo.append(sample)
            self._count += 1

    def _activate(self, key: CompatKey) -> None:
        """``key`` starts waiting: lift its charge to the virtual time."""
        if not self._fifos:  # nobody waits: start afresh
            self._charged.clear()
            self._virtual = 0.0
        self._charged[key] = max(self._charged.get(key, 0.0), self._virtual)

    def remove(self, predicate: Callable[[Sample], bool]) -> list[Sample]:
        """Drop (and return) every queued sample for which ``predicate`` is true."""
        dropped: list[Sample] = []
        for key, fifo in list(self._fifos.items()):
            kept: deque[Sample] = deque()
            for sample in fifo:
                (dropped if predicate(sample) else kept).append(sample)
            if kept:
                self._fifos[key] = kept
            else:
                del self._fifos[key]
        self._count -= len(dropped)
        return dropped

    def next_key(self) -> CompatKey | None:
        """The key whose batch runs next: least charged, then oldest waiting sample."""
        if not self._fifos:
            return None
        return min(
            self._fifos, key=lambda k: (self._charged[k], self._fifos[k][0].enqueued_at, self._fifos[k][0].id)
        )

    def head(self, key: CompatKey, limit: int) -> list[Sample]:
        """The oldest ``limit`` samples of ``key``, in order."""
        return list(itertools.islice(self._fifos.get(key, ()), limit))

    def group_count(self, key: CompatKey) -> int:
        return len(self._fifos.get(key, ()))

    def has_other_keys(self, key: CompatKey) -> bool:
        return any(k != key for k in self._fifos)

    def take(self, key: CompatKey, size: int, cost: float) -> list[Sample]:
        """Remove the oldest ``size`` samples of ``key`` as a batch and charge ``key`` its ``cost``
        (estimated GPU-seconds)."""
        fifo = self._fifos.get(key)
        if not fifo:
            return []
        batch = [fifo.popleft() for _ in range(min(size, len(fifo)))]
        self._count -= len(batch)
        start = self._charged.get(key, 0.0)
        self._virtual = max(self._virtual, start)
        self._charged[key] = start + max(cost, 0.0)
        if not fifo:
            del self._fifos[key]
        # A key not waiting whose charge is at or below the virtual time would be lifted to it
        # anyway when it comes back: forget it (the virtual time never falls while keys wait).
        for k in [k for k, c in self._charged.items() if k not in self._fifos and c <= self._virtual]:
            del self._charged[k]
        return batch

    def ahead(
        self,
        job_id: str,
        batch_size: Callable[[CompatKey], int],
        cost: Callable[[CompatKey, int], float],
    ) -> int | None:
        """Queued samples that start before ``job_id``'s first queued sample, as the queue would
        serve what it holds now: batches of ``batch_size(key)`` (fewer when fewer wait), each
        charged its ``cost``, taken by the same rule as :meth:`next_key` and :meth:`take`.
        Samples in the same batch as the job's start with it and are not counted; nothing that
        arrives later is foreseen. None when none of the job's samples is queued."""
        fifos = {k: list(f) for k, f in self._fifos.items()}
        taken = dict.fromkeys(fifos, 0)
        charged = {k: self._charged.get(k, 0.0) for k in fifos}
        ahead = 0
        while fifos:

            def order(k: CompatKey) -> tuple[float, float, int]:
                head = fifos[k][taken[k]]
                return charged[k], head.enqueued_at, head.id

            key = min(fifos, key=order)
            fifo, start = fifos[key], taken[key]
            size = max(1, min(batch_size(key), len(fifo) - start))
            if any(s.job_id == job_id for s in fifo[start : start + size]):
                return ahead
            ahead += size
            taken[key] = start + size
            charged[key] += max(cost(key, size), 0.0)
            if taken[key] >= len(fifo):
                del fifos[key]
        return None

    def groups(self) -> dict[CompatKey, int]:
        """Queued samples per key."""
        return {key: len(fifo) for key, fifo in self._fifos.items()}

    def charged(self, key: CompatKey) -> float:
        """The GPU-seconds ``key`` has been charged (relative: only differences between keys count)."""
        return self._charged.get(key, 0.0)


def curve_cap(max_batch: int, batch_seconds: Callable[[int], float | None]) -> int:
    """The batch size beyond which the cost curve says larger batches no longer pay.

    The smallest batch whose time per image is within :data:`CAP_GAIN` of the best time per
    image at any size up to ``max_batch``; ``max_batch`` while the curve is unknown. Larger
    batches than that would buy at most that much throughput, and every image in them would
    wait for the whole batch.
    """
    per_image: dict[int, float] = {}
    for b in range(1, max_batch + 1):
        t = batch_seconds(b)
        if t is None:
            return max_batch
        per_image[b] = t / b
    best = min(per_image.values())
    return min(b for b, p in per_image.items() if p <= best * (1 + CAP_GAIN))


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
    fixed: bool = False,
) -> Plan:
    """Decide the size of the next batch of one key, and whether to wait for it to fill.

    ``queued`` samples of the key are waiting (more than ``max_batch`` counts as sustained load,
    whatever ``utilisation`` says); ``batch_seconds(b)`` is the learned time of a batch of ``b``
    (None while unknown); ``utilisation`` is the recent GPU demand at batch size 1 (1.0 = the GPU
    would be busy all the time without batching); ``arrivals_per_s`` counts recent samples
    of this key per second; ``since_last_arrival_s`` is the time since the newest queued sample.
    ``fill`` (the ``fill`` batch policy) always batches as many samples as allowed; ``fixed`` (the
    ``fixed`` policy, classic dynamic batching) also waits for a full batch until the oldest sample
    has waited ``max_wait_s``, unless another key has work.
    """
    limit = min(queued, max_batch)
    if limit <= 0:
        return Plan(0)
    if fixed:
        remaining = max_wait_s - oldest_age_s
        if limit < max_batch and remaining > 0 and not other_keys_waiting:
            return Plan(limit, wait_s=remaining)
        return Plan(limit)
    t1, tk = batch_seconds(1), batch_seconds(limit)
    size = limit
    # Sustained load: the recent demand says so, or the queue already holds more than a full
    # batch (a burst the demand windows, which still hold the idle time before it, lag behind).
    busy = fill or utilisation >= SATURATION or queued > max_batch
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
