"""The batch loop: the one task that draws batches from the state and runs them on the GPU thread.

Whenever the GPU frees, the loop asks :meth:`~.batchstate.BatchState.next` what to run (or how
long to wait for a batch to fill), hands the batch to the one-thread GPU executor, and settles
the outcome: it teaches the cost model, keeps the recent-batch log, records health, and passes
each sample's image to :mod:`.delivery` (whose encoding overlaps the next batch on the GPU).

A failure reaches only the requests it belongs to: a sample that failed alone fails its own
request, and a batch fails as a whole only on a device fault (the worker retries other failures
sample by sample). Only the device's failures count toward quarantine: a batch with one (a device
fault, a sample out of memory alone, NaNs in an image) is a failure, a batch that made an image
and had none a success, and a batch whose only failures were its inputs' leaves the count alone.
Clients hear a generic message with their request id; the details are in the log.

Keys that the state's ``stepwise`` names (``--batch-mode step``) run as step-level batches instead
(:mod:`.steploop`): samples join and leave between denoising steps, and each group of samples
leaving together is settled here as a batch of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
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
from imagefleet.inference_pod.steploop import StepSession
from imagefleet.inference_pod.worker import (
    GENERIC_FAILURE,
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


def with_request_id(message: str, job_id: str) -> str:
    """A client's error message, with the id the pod's log names the request by."""
    return f"{message} Request id: {job_id}."


def sample_error(failure: SampleFailed, job_id: str) -> APIError:
    """The answer to a request whose sample failed alone."""
    message = with_request_id(str(failure), job_id)
    if failure.kind == "oom":  # the same image would not fit on another pod of this kind either
        return GenerationFailed(message, code="oom")
    if failure.device:
        return Unavailable(message, retry_after=1, code="device_error")
    return GenerationFailed(message, code="generation_failed")


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
            stepwise = self._state.stepwise
            if stepwise is not None and stepwise(samples[0].key):
                await self._run_steps(samples)
                continue
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

    async def _run_steps(self, samples: list[Sample]) -> None:
        """Run a step-level batch starting with ``samples`` until it drains."""
        loop = asyncio.get_running_loop()
        run = BatchRun(key=samples[0].key, samples=samples, started_at=self._clock())
        session = StepSession(
            run,
            state=self._state,
            loop=loop,
            clock=self._clock,
            settle=self.finish,
            account=functools.partial(self.account, run.key),
            joined=self._joined,
        )
        run.session = session
        self.running = run
        self.busy.start(run.started_at)
        try:
            outcome = await loop.run_in_executor(self._gpu, self._run_batch, run)
        except Exception as exc:  # the executor itself failed
            outcome = Outcome(results=[], error=exc)
        finally:
            session.close()
            self.running = None
            self._state.finish()
            self.busy.stop(self._clock())
        session.end(outcome)

    def _joined(self, samples: list[Sample], now: float) -> None:
        for s in samples:
            self._counters.queue_wait.observe(now - s.enqueued_at)

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

    def account(self, key: CompatKey, outcome: Outcome) -> None:
        """Learn an outcome's timings and out-of-memory cap; count its splits and retries."""
        learn(self._state.costs, key, outcome)
        if outcome.oom_cap is not None:
            self._counters.other_errors["oom"] += 1
        for kind in outcome.retried:
            self._counters.batch_errors[kind] += 1

    def finish(self, run: BatchRun, outcome: Outcome, seconds: float) -> None:
        size = len(run.samples)
        self._counters.batch(size, seconds)
        self.account(run.key, outcome)
        partial = any(isinstance(r, SampleFailed) for r in outcome.results)
        status = (
            "cancelled"
            if outcome.cancelled
            else "failed"
            if outcome.error
            else "partial"
            if partial
            else "ok"
        )
        self._record(run, status, seconds)
        if outcome.cancelled:
            self._counters.images[m.OUTCOME_CANCELLED] += size
            return
        if outcome.error is not None:
            self._failed(run, outcome.error)
            return
        device_failures: list[str] = []
        for sample, result in zip(run.samples, outcome.results, strict=True):
            if isinstance(result, SampleFailed):
                if result.kind == "nan":
                    self._counters.other_errors["nan"] += 1
                if result.device:
                    device_failures.append(f"{result.kind} (request {sample.job_id})")
            ticket = self._delivery.get(sample.job_id)
            if ticket is None or ticket.done:
                self._counters.images[m.OUTCOME_CANCELLED] += 1
            elif isinstance(result, SampleFailed):
                self._counters.images[m.OUTCOME_FAILED] += 1
                self._delivery.fail(ticket, sample_error(result, sample.job_id))
            else:
                self._delivery.encode(ticket, sample.index, result)
        if device_failures:
            self._device_failed(f"a sample failed on the device: {', '.join(device_failures)}")
        elif any(not isinstance(r, SampleFailed) for r in outcome.results):
            self._health.success()

    def _failed(self, run: BatchRun, error: BaseException) -> None:
        """The whole batch failed: each of its requests hears so; a device fault counts."""
        kind = error_kind(error)
        self._counters.batch_errors[kind] += 1
        self._counters.images[m.OUTCOME_FAILED] += len(run.samples)
        job_ids = list(dict.fromkeys(s.job_id for s in run.samples))
        log.error("A batch of %d failed (requests %s)", len(run.samples), ", ".join(job_ids), exc_info=error)
        device = device_fault(error)
        for job_id in job_ids:
            ticket = self._delivery.get(job_id)
            if ticket is None:
                continue
            answer: APIError
            if device:  # not the request's fault: a router retries it on another pod
                message = "The GPU failed while running this request; retry it."
                answer = Unavailable(with_request_id(message, job_id), retry_after=1, code="device_error")
            else:
                answer = GenerationFailed(with_request_id(GENERIC_FAILURE, job_id), code="generation_failed")
            self._delivery.fail(ticket, answer)
        if device:
            self._device_failed(f"{kind} error in a batch (requests {', '.join(job_ids)})")

    def _device_failed(self, message: str) -> None:
        """Count a device failure (``message`` names no exception text: /stats shows it)."""
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
                "mode": "request",
                **run.log,
            }
        )
        log.info(
            "Batch of %d %s %dx%d x%d steps%s: %s in %.3f s",
            len(run.samples),
            key.task,
            key.width,
            key.height,
            key.steps,
            " (left a step-level batch)" if run.log.get("mode") == "step" else "",
            status,
            seconds,
        )
