"""The batch loop: the one task that draws batches from the state and runs them on the GPU thread.

Whenever the GPU frees, the loop asks :meth:`~.batchstate.BatchState.next` what to run (or how
long to wait for a batch to fill), hands the batch to the one-thread GPU executor, and settles
the outcome: it teaches the cost model, keeps the recent-batch log, records health, and passes
each sample's image to :mod:`.delivery` (whose encoding overlaps the next batch on the GPU). A
failed batch fails every request in it; repeated failures quarantine the pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from imagefleet import metrics as m
from imagefleet.errors import APIError, GenerationFailed, Unavailable
from imagefleet.inference_pod.batching import CompatKey, Sample
from imagefleet.inference_pod.batchstate import BatchState, Take
from imagefleet.inference_pod.costs import BusyMeter, CostModel
from imagefleet.inference_pod.counters import PodCounters
from imagefleet.inference_pod.delivery import Delivery
from imagefleet.inference_pod.health import PodHealth
from imagefleet.inference_pod.phase import PodPhase, refused
from imagefleet.inference_pod.worker import (
    BatchRun,
    Outcome,
    RunBatch,
    SampleFailed,
    device_fault,
    error_kind,
)

log = logging.getLogger(__name__)

RECENT_BATCHES = 200


def learn(costs: CostModel, key: CompatKey, outcome: Outcome) -> None:
    """Teach the cost model what a batch's outcome measured (times, an out-of-memory cap)."""
    for n, t in outcome.timings:
        costs.observe(key, n, t)
    if outcome.oom_cap is not None:
        costs.cap(key, outcome.oom_cap)


class BatchLoop:
    def __init__(
        self,
        *,
        state: BatchState,
        delivery: Delivery,
        health: PodHealth,
        counters: PodCounters,
        run_batch: RunBatch,
        gpu: Executor,
        clock: Callable[[], float],
    ) -> None:
        self._state = state
        self._delivery = delivery
        self._health = health
        self._counters = counters
        self._run_batch = run_batch
        self._gpu = gpu
        self._clock = clock
        self._wake = asyncio.Event()
        self.busy = BusyMeter()
        self.running: BatchRun | None = None
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_BATCHES)

    def wake(self) -> None:
        """Something changed (work arrived or left): decide again."""
        self._wake.set()

    def stop_running(self) -> None:
        """Stop the running batch at its next denoising step."""
        if self.running is not None:
            self.running.stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            samples = await self._next()
            run = BatchRun(key=samples[0].key, samples=samples, started_at=self._clock())
            self.running = run
            for s in samples:
                self._counters.queue_wait.observe(run.started_at - s.enqueued_at)
            self.busy.start(run.started_at)
            try:
                outcome = await loop.run_in_executor(self._gpu, self._run_batch, run)
            except Exception as exc:  # the executor itself failed
                outcome = Outcome(results=[None] * len(samples), error=exc)
            finally:
                self.running = None
                self._state.finish()
                self.busy.stop(self._clock())
            self.finish(run, outcome, self._clock() - run.started_at)

    async def _next(self) -> list[Sample]:
        while True:
            now = self._clock()
            decision = self._state.next(now, self.busy.fraction(now))
            if isinstance(decision, Take):
                return decision.samples
            self._wake.clear()
            if decision is None:
                await self._wake.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), decision.seconds)

    def finish(self, run: BatchRun, outcome: Outcome, seconds: float) -> None:
        size = len(run.samples)
        self._counters.batch(size, seconds)
        learn(self._state.costs, run.key, outcome)
        if outcome.oom_cap is not None:
            self._counters.other_errors["oom"] += 1
        status = "cancelled" if outcome.cancelled else "failed" if outcome.error else "ok"
        self._record(run, status, seconds)
        if outcome.cancelled:
            self._counters.images[m.OUTCOME_CANCELLED] += size
            return
        if outcome.error is not None:
            self._failed(run, outcome.error)
            return
        self._health.success()
        for sample, result in zip(run.samples, outcome.results, strict=True):
            ticket = self._delivery.get(sample.job_id)
            if ticket is None or ticket.done:
                self._counters.images[m.OUTCOME_CANCELLED] += 1
            elif isinstance(result, SampleFailed):
                self._counters.images[m.OUTCOME_FAILED] += 1
                self._delivery.fail(ticket, GenerationFailed(str(result), code=result.kind))
            else:
                self._delivery.encode(ticket, sample.index, result)

    def _failed(self, run: BatchRun, error: BaseException) -> None:
        self._counters.batch_errors[error_kind(error)] += 1
        self._counters.images[m.OUTCOME_FAILED] += len(run.samples)
        message = f"Image generation failed: {type(error).__name__}: {str(error)[:300]}"
        answer: APIError
        if device_fault(error):  # not the request's fault: a router retries it on another pod
            answer = Unavailable(
                "The GPU failed while running this request; retry it.", retry_after=1, code="device_error"
            )
        else:
            answer = GenerationFailed(message, code="generation_failed")
        for job_id in dict.fromkeys(s.job_id for s in run.samples):
            ticket = self._delivery.get(job_id)
            if ticket is not None:
                self._delivery.fail(ticket, answer)
        if self._health.failure(message):
            log.error("Quarantined after %d consecutive failed batches", self._health.consecutive_failures)
            self._counters.other_errors["quarantine"] += 1
            # Let the router place the queued work elsewhere.
            self._delivery.fail_all(lambda: refused(PodPhase.QUARANTINED))

    def _record(self, run: BatchRun, status: str, seconds: float) -> None:
        key = run.key
        self.recent.append(
            {
                "size": len(run.samples),
                "seconds": round(seconds, 4),
                "task": key.task,
                "width": key.width,
                "height": key.height,
                "steps": key.steps,
                "steps_done": run.steps_done,
                "status": status,
                "requests": sorted({s.job_id for s in run.samples}),
            }
        )
        log.info(
            "Batch of %d %s %dx%d x%d steps: %s in %.3f s",
            len(run.samples),
            key.task,
            key.width,
            key.height,
            key.steps,
            status,
            seconds,
        )
