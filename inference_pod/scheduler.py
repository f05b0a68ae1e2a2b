"""The scheduler: the one object the rest of the pod uses to get images made.

A facade over the parts, each with one job:

* :mod:`.admission` -- whether a request is taken, by its estimated GPU time and the queue's;
* :mod:`.batchstate` -- queues, jobs and the choice of the next batch (synchronous, clockless);
* :mod:`.batchloop` -- the one task that owns the state and runs batches on the GPU thread
  (:mod:`.steploop`: its side of a step-level batch);
* :mod:`.delivery` -- encoding on the CPU pool and settling each request's future;
* :mod:`.health` -- consecutive failures and quarantine;
* :mod:`.estimator` -- seconds of queued and running work.

Outside this file the pod uses only :meth:`Scheduler.start`, :meth:`~Scheduler.stop`,
:meth:`~Scheduler.drain`, :meth:`~Scheduler.submit`, :meth:`~Scheduler.cancel` and
:meth:`~Scheduler.snapshot` and :meth:`~Scheduler.queued_ahead` (plus :meth:`~Scheduler.learn` for the warm-up and
:meth:`~Scheduler.batch_log` for ``/debug/batches``). The clock is injected; all calls come from
the event loop's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from imagefleet import metrics as m
from imagefleet.errors import Unavailable
from imagefleet.inference_pod import admission
from imagefleet.inference_pod.batching import CompatKey, Sample
from imagefleet.inference_pod.batchloop import BatchLoop, learn
from imagefleet.inference_pod.batchstate import BatchState, Job
from imagefleet.inference_pod.costs import CostModel
from imagefleet.inference_pod.counters import PodCounters
from imagefleet.inference_pod.delivery import Delivery, Ticket
from imagefleet.inference_pod.estimator import LoadEstimator
from imagefleet.inference_pod.health import PodHealth, StallWatch
from imagefleet.inference_pod.phase import PodPhase, refusal
from imagefleet.inference_pod.worker import Outcome, RunBatch
from imagefleet.schema import ImageRequest
from imagefleet.settings import PodSettings

__all__ = ["Scheduler", "Snapshot", "Ticket"]

log = logging.getLogger(__name__)

DRAIN_POLL_S = 0.05


@dataclass(frozen=True)
class Snapshot:
    """The scheduler at one moment, in plain numbers."""

    phase: PodPhase
    """SERVING, DRAINING or QUARANTINED (loading is the runtime's business)."""
    queued_requests: int
    queued_samples: int
    running_samples: int
    queued_seconds: float
    running_remaining_seconds: float
    unit_seconds: float
    last_error: str | None

    @property
    def expected_wait_seconds(self) -> float:
        return self.queued_seconds + self.running_remaining_seconds


class Scheduler:
    def __init__(
        self,
        *,
        run_batch: RunBatch,
        gpu: Executor,
        cpu: Executor,
        counters: PodCounters,
        max_batch_size: int,
        max_queued_images: int,
        max_request_gpu_seconds: float,
        max_queued_gpu_seconds: float,
        max_wait_s: float,
        fill: bool,
        quarantine_after: int,
        stall_after_s: float,
        clock: Callable[[], float] = time.monotonic,
        fixed: bool = False,
        stepwise: Callable[[CompatKey], bool] | None = None,
    ) -> None:
        self._clock = clock
        self._counters = counters
        self._costs = CostModel()
        self._state = BatchState(
            max_batch_size=max_batch_size,
            max_wait_s=max_wait_s,
            fill=fill,
            costs=self._costs,
            fixed=fixed,
            stepwise=stepwise,
        )
        self._bounds = admission.Bounds(
            max_request_gpu_seconds=max_request_gpu_seconds,
            max_queued_gpu_seconds=max_queued_gpu_seconds,
            max_queued_images=max_queued_images,
        )
        self._health = PodHealth(quarantine_after)
        self._stall = StallWatch(stall_after_s)
        self._delivery = Delivery(cpu, counters, forget=self._state.remove)
        self._loop = BatchLoop(
            state=self._state,
            delivery=self._delivery,
            health=self._health,
            counters=counters,
            run_batch=run_batch,
            gpu=gpu,
            clock=clock,
        )
        self._estimator = LoadEstimator(self._state, self._costs, lambda: self._loop.running)
        self._draining = False
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(
        cls,
        settings: PodSettings,
        *,
        run_batch: RunBatch,
        gpu: Executor,
        cpu: Executor,
        counters: PodCounters,
        clock: Callable[[], float] = time.monotonic,
        stepwise: Callable[[CompatKey], bool] | None = None,
    ) -> Scheduler:
        """``stepwise``: the keys that run as step-level batches (``--batch-mode step``, for a
        model that can: :func:`.stepbatch.stepwise_keys`); the others batch per request."""
        return cls(
            run_batch=run_batch,
            gpu=gpu,
            cpu=cpu,
            counters=counters,
            max_batch_size=settings.max_batch_size,
            max_queued_images=settings.max_queued_images,
            max_request_gpu_seconds=settings.max_request_gpu_seconds,
            max_queued_gpu_seconds=settings.max_queued_gpu_seconds,
            max_wait_s=settings.max_wait_ms / 1000,
            fill=settings.batch_policy == "fill",
            fixed=settings.batch_policy == "fixed",
            quarantine_after=settings.quarantine_after,
            stall_after_s=settings.stall_after_s,
            clock=clock,
            stepwise=stepwise if settings.batch_mode == "step" else None,
        )

    # --- lifecycle ---

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop.run(), name="batch-loop")

    async def stop(self) -> None:
        """Stop the loop; every request still open gets 503 (send it elsewhere)."""
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._delivery.fail_all(lambda: Unavailable("The pod is shutting down.", retry_after=1))
        self._state.clear()

    async def drain(self, timeout_s: float) -> None:
        """Refuse new work and wait (up to ``timeout_s``) for the accepted work to finish."""
        self._draining = True
        deadline = self._clock() + timeout_s
        while len(self._delivery) and self._clock() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)

    def phase(self) -> PodPhase:
        if self._health.quarantined:
            return PodPhase.QUARANTINED
        if self._stall.stalled(self._loop.running, self._clock()):
            return PodPhase.STALLED
        return PodPhase.DRAINING if self._draining else PodPhase.SERVING

    # --- requests ---

    def submit(
        self, request: ImageRequest, *, pipeline: str = "generate", image: Any = None, mask: Any = None
    ) -> Ticket:
        """Queue a request whose defaults are resolved, for ``pipeline`` (generate, img2img,
        inpaint). Raises Unavailable (draining, quarantined), InvalidRequest (more GPU time than
        one request may take) or Overloaded (the queue is full, in images or in GPU time)."""
        error = refusal(self.phase())
        if error is not None:
            raise error
        if missing := request.unresolved():
            raise ValueError(f"resolve the request's defaults first: {', '.join(missing)}")
        assert request.seed is not None
        key = CompatKey.of(pipeline, **dict(request.key_values()))
        now = self._clock()
        load = admission.Load(
            queued_samples=self._state.queued_samples,
            queued_seconds=self._estimator.queued_seconds(),
            running_remaining_seconds=self._estimator.running_remaining_seconds(now),
        )
        images = f"{request.n} image{'s' if request.n > 1 else ''}"
        refused = admission.check(
            self._bounds,
            load,
            n=request.n,
            cost=self._estimator.request_seconds(key, request.n),
            what=f"{images} of {key.width}x{key.height} at {key.steps} steps",
            measured=self._costs.known,
        )
        if refused is not None:
            raise refused
        job_id = uuid.uuid4().hex
        samples = [
            Sample(
                key, job_id, i, request.prompt, request.negative_prompt, request.seed + i, now, image, mask
            )
            for i in range(request.n)
        ]
        ticket = Ticket(Job(job_id, key, samples, now), request, asyncio.get_running_loop().create_future())
        self._state.add(ticket.job, now)
        self._delivery.add(ticket)
        self._counters.requests_accepted += 1
        self._loop.wake()
        return ticket

    def cancel(self, ticket: Ticket, reason: str = "client disconnected") -> None:
        """Forget ``ticket``: its queued samples never run; a batch of only its samples stops."""
        if ticket.done:
            return
        dropped = self._state.cancel(ticket.id)
        self._delivery.drop(ticket)
        if dropped is None:
            return
        self._counters.images[m.OUTCOME_CANCELLED] += dropped.queued
        if dropped.stop_running:
            self._loop.stop_running()
        log.info(
            "Cancelled request %s (%s): %d queued samples dropped", ticket.id[:8], reason, dropped.queued
        )
        self._loop.wake()

    # --- what it knows ---

    def snapshot(self) -> Snapshot:
        now = self._clock()
        return Snapshot(
            phase=self.phase(),
            queued_requests=self._state.queued_requests,
            queued_samples=self._state.queued_samples,
            running_samples=self._state.running_samples,
            queued_seconds=self._estimator.queued_seconds(),
            running_remaining_seconds=self._estimator.running_remaining_seconds(now),
            unit_seconds=self._estimator.unit_seconds(),
            last_error=self._health.last_error,
        )

    def queued_ahead(self, ticket: Ticket) -> int | None:
        """Queued samples that will start before ``ticket``'s first one (None once none of its
        samples waits): :meth:`.batchstate.BatchState.queued_ahead`."""
        return self._state.queued_ahead(ticket.id)

    def learn(self, key: CompatKey, outcome: Outcome) -> None:
        """Learn batch costs from a batch run outside the queue (the start-up warm-up)."""
        learn(self._costs, key, outcome)

    def estimate(self, key: CompatKey, size: int) -> float | None:
        """The learned time of a batch of ``size`` samples of ``key`` (None while unknown)."""
        return self._costs.seconds(key, size)

    def batch_log(self) -> list[dict[str, Any]]:
        """The most recent batches, oldest first (``/debug/batches``)."""
        return list(self._loop.recent)
