"""The batch state: queued samples, accepted jobs, the running batch, and the choice of the next.

Synchronous and clockless, as text-generation-inference's ``State``: plain numbers in (the time
``now``, the GPU's busy share), decisions out, no event loop and no futures, so every rule here is
unit-tested directly. The one batch loop (:mod:`.batchloop`) asks :meth:`BatchState.next` for
work whenever the GPU frees; admission and cancellation change the state from the same event-loop
thread, so nothing here needs a lock.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from imagefleet.inference_pod import batching
from imagefleet.inference_pod.batching import CompatKey, Queue, Sample
from imagefleet.inference_pod.costs import ArrivalMeter, CostModel


@dataclass(eq=False)
class Job:
    """One accepted request: ``n`` samples of one key, until each has run or the job is gone."""

    id: str
    key: CompatKey
    samples: list[Sample]
    created: float


@dataclass(frozen=True)
class Take:
    """Run these samples now (already out of the queue; they are the running batch)."""

    samples: list[Sample]


@dataclass(frozen=True)
class Wait:
    """Ask again in ``seconds`` (or as soon as something changes): the batch may still fill."""

    seconds: float


@dataclass(frozen=True)
class Dropped:
    """What cancelling a job did: samples dropped from the queue, and whether the running batch
    has no live request left (so it should stop at its next step)."""

    queued: int
    stop_running: bool


class BatchState:
    def __init__(
        self,
        *,
        max_batch_size: int,
        max_wait_s: float,
        fill: bool,
        costs: CostModel,
        arrivals: ArrivalMeter | None = None,
        fixed: bool = False,
        stepwise: Callable[[CompatKey], bool] | None = None,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.stepwise = stepwise
        """Keys run as step-level batches (:mod:`.steploop`): they start with every waiting
        sample up to the cap and never wait to fill, since later samples can still join."""
        self.max_wait_s = max_wait_s
        self.fill = fill
        self.fixed = fixed
        self.costs = costs
        self.arrivals = arrivals or ArrivalMeter()
        self.queue = Queue()
        self.jobs: dict[str, Job] = {}
        self.running: list[Sample] | None = None
        self._last_arrival = 0.0
        self._since_probe: dict[CompatKey, int] = {}

    # --- arrival and removal ---

    def add(self, job: Job, now: float) -> None:
        """Queue ``job``'s samples (admission is the caller's: :mod:`.admission`)."""
        self.jobs[job.id] = job
        self.queue.add(job.samples)
        self.arrivals.record(now, job.key, len(job.samples), self.costs.seconds(job.key, 1))
        self._last_arrival = now

    def cancel(self, job_id: str) -> Dropped | None:
        """Forget a job whose client left; None if it was already gone."""
        if self.jobs.pop(job_id, None) is None:
            return None
        dropped = self.queue.remove(lambda s: s.job_id == job_id)
        running = self.running
        stop = bool(running) and all(s.job_id not in self.jobs for s in running or ())
        return Dropped(queued=len(dropped), stop_running=stop)

    def remove(self, job_id: str) -> None:
        """Forget a finished or failed job, and any of its samples still queued."""
        if self.jobs.pop(job_id, None) is not None:
            self.queue.remove(lambda s: s.job_id == job_id)

    def clear(self) -> list[Job]:
        """Forget every job (shutdown, quarantine); returns them."""
        jobs = list(self.jobs.values())
        self.jobs.clear()
        self.queue.remove(lambda s: True)
        return jobs

    # --- batches ---

    def next(self, now: float, busy_fraction: float) -> Take | Wait | None:
        """The next batch to run, a wait, or None when nothing is queued."""
        key = self.queue.next_key()
        if key is None:
            return None
        if self.stepwise is not None and self.stepwise(key):
            return self._take(key, min(self.queue.group_count(key), self.batch_cap(key)))
        oldest = self.queue.head(key, 1)[0]
        queued = self.queue.group_count(key)
        decision = batching.plan(
            queued=queued,
            max_batch=self._probing_cap(key, queued),
            oldest_age_s=now - oldest.enqueued_at,
            since_last_arrival_s=now - self._last_arrival,
            max_wait_s=self.max_wait_s,
            other_keys_waiting=self.queue.has_other_keys(key),
            batch_seconds=functools.partial(self.costs.seconds, key),
            utilisation=self.utilisation(now, busy_fraction),
            arrivals_per_s=self.arrivals.rate(key, now),
            fill=self.fill,
            fixed=self.fixed,
        )
        if decision.wait_s > 0:
            return Wait(decision.wait_s)
        return self._take(key, decision.size)

    def _take(self, key: CompatKey, size: int) -> Take:
        batch = self.queue.take(key, size, self.costs.estimate(key, size))
        self.running = batch
        return Take(batch)

    def _probing_cap(self, key: CompatKey, queued: int) -> int:
        """:meth:`batch_cap`, one larger every :data:`~.batching.PROBE_EVERY` batches of a key the
        curve holds below the allowed size while more of it waits: the next size is timed again."""
        cap = self.batch_cap(key)
        if cap >= self.costs.max_batch(key, self.max_batch_size):
            self._since_probe.pop(key, None)
            return cap
        count = self._since_probe.get(key, 0) + 1
        if count >= batching.PROBE_EVERY and queued > cap:
            self._since_probe[key] = 0
            return cap + 1
        self._since_probe[key] = count
        return cap

    def batch_cap(self, key: CompatKey) -> int:
        """The largest batch of ``key`` to form: ``max_batch_size``, lowered after out-of-memory
        and, under the ``auto`` policy, to where the measured cost curve stops paying
        (:func:`~.batching.curve_cap`; the configured size while the curve is still unknown, so
        that it is learned online)."""
        allowed = self.costs.max_batch(key, self.max_batch_size)
        if self.fill or self.fixed or not self.costs.has_curve(key):
            return allowed
        return batching.curve_cap(allowed, functools.partial(self.costs.seconds, key))

    def finish(self) -> None:
        """The running batch is over (whatever its outcome)."""
        self.running = None

    # --- step-level batches (:mod:`.steploop`) ---

    def join(self, key: CompatKey, room: int) -> list[Sample]:
        """Samples of ``key`` that join its running step-level batch now (out of the queue, added
        to the running samples): the oldest, up to ``room``, and only while the fair queue would
        still serve ``key`` next; so a key that has had its share stops taking samples, drains,
        and the next key starts. The key is charged what the joiners add to the batch's
        estimated time."""
        if room <= 0 or self.queue.next_key() != key:
            return []
        running = len(self.running or ())
        size = min(room, self.queue.group_count(key))
        cost = self.costs.estimate(key, running + size) - (
            self.costs.estimate(key, running) if running else 0.0
        )
        joined = self.queue.take(key, size, max(cost, 0.0))
        self.running = [*(self.running or ()), *joined]
        return joined

    def leave(self, samples: list[Sample]) -> None:
        """``samples`` left the running step-level batch."""
        gone = {s.id for s in samples}
        self.running = [s for s in self.running or () if s.id not in gone]

    def utilisation(self, now: float, busy_fraction: float) -> float:
        """How loaded the GPU is, for the batch policy: 1.0 means it never gets a rest.

        The larger of the demand that arrived (at batch size 1) and the share of the window the
        GPU actually spent busy. A full queue alone is not load: a one-off burst is served
        fastest on average one by one where batching buys little.
        """
        return max(self.arrivals.utilisation(now), busy_fraction)

    # --- what is waiting ---

    def queued_ahead(self, job_id: str) -> int | None:
        """Queued samples that will start before ``job_id``'s first one, as the queue would serve
        what waits now (:meth:`~.batching.Queue.ahead`, batches as large as :meth:`batch_cap`);
        None when the job has nothing queued (it runs, is done or gone)."""
        return self.queue.ahead(job_id, self.batch_cap, self.costs.estimate)

    @property
    def queued_samples(self) -> int:
        return len(self.queue)

    @property
    def queued_requests(self) -> int:
        return len({s.job_id for s in self.queue})

    @property
    def running_samples(self) -> int:
        return len(self.running) if self.running else 0
