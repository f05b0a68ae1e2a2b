"""The async owner of the queue: admission, batching, dispatch, cancellation and results.

One task (``_loop``) draws batches from the :class:`~.batching.Queue` whenever the GPU frees and
hands each to the GPU thread; handlers only :meth:`Scheduler.submit` and await a
:class:`Job`. Encoding of finished images runs on the CPU pool without holding the loop, so the
next batch starts on the GPU while the last one is encoded.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from imagefleet import metrics as m
from imagefleet.errors import APIError, GenerationFailed, Overloaded, Unavailable
from imagefleet.inference_pod import batching
from imagefleet.inference_pod.batching import CompatKey, Queue, Sample
from imagefleet.inference_pod.costs import ArrivalMeter, BusyMeter, CostModel
from imagefleet.inference_pod.encoding import Encoded, encode
from imagefleet.inference_pod.telemetry import PodMetrics
from imagefleet.inference_pod.worker import BatchRun, Outcome, SampleFailed
from imagefleet.loadreport import LoadReport
from imagefleet.schema import MAX_SEED, ImageRequest
from imagefleet.settings import PodSettings

log = logging.getLogger(__name__)

RECENT_BATCHES = 200


@dataclass(eq=False)
class Job:
    """One request: its samples, and the future its handler awaits."""

    request: ImageRequest
    key: CompatKey
    samples: list[Sample]
    future: asyncio.Future[list[Encoded]]
    created: float
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    outputs: list[Encoded | None] = field(default_factory=list)
    cancelled: bool = False

    @property
    def done(self) -> bool:
        return self.future.done()


@dataclass
class Health:
    """Consecutive failed batches; past the limit the pod quarantines itself for good."""

    limit: int
    consecutive_failures: int = 0
    quarantined: bool = False
    last_error: str | None = None
    error_count: int = 0

    def success(self) -> None:
        self.consecutive_failures = 0

    def failure(self, message: str) -> bool:
        """Record a failed batch; True if this one quarantined the pod."""
        self.consecutive_failures += 1
        self.error_count += 1
        self.last_error = message
        if not self.quarantined and self.consecutive_failures >= self.limit:
            self.quarantined = True
            return True
        return False


@dataclass
class Counters:
    total_requests: int = 0
    completed_requests: int = 0
    failed_requests: int = 0
    total_batches: int = 0
    images_completed: int = 0
    batch_seconds_total: float = 0.0


RunBatch = Callable[[BatchRun], Outcome]


class Scheduler:
    def __init__(
        self,
        settings: PodSettings,
        run_batch: RunBatch,
        gpu: Executor,
        cpu: Executor,
        metrics: PodMetrics,
        *,
        model_id: str,
        default_steps: int,
        default_width: int,
        default_height: int,
    ) -> None:
        self.settings = settings
        self.model_id = model_id
        self.defaults = (default_steps, default_width, default_height)
        self._run_batch = run_batch
        self._gpu = gpu
        self._cpu = cpu
        self.metrics = metrics
        self.queue = Queue()
        self.costs = CostModel()
        self.arrivals = ArrivalMeter()
        self.busy = BusyMeter()
        self.health = Health(settings.quarantine_after)
        self.counters = Counters()
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_BATCHES)
        self.ready = False
        self.draining = False
        self.running: BatchRun | None = None
        self._jobs: dict[str, Job] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._pending_encodes: set[asyncio.Future[Any]] = set()
        self._last_arrival = 0.0

    # --- lifecycle ---

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batch-loop")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for job in list(self._jobs.values()):
            self._fail(job, Unavailable("The pod is shutting down.", retry_after=1))

    async def drain(self, timeout_s: float) -> None:
        """Refuse new work and wait (up to ``timeout_s``) for the accepted work to finish."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self._jobs and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    # --- admission ---

    def submit(self, request: ImageRequest, images: list[Any] | None = None, mask: Any = None) -> Job:
        """Queue a validated request (defaults resolved). Raises Overloaded or Unavailable."""
        self._check_accepting()
        if len(self.queue) + request.n > self.settings.max_queued_images:
            wait = self.expected_wait_seconds()
            raise Overloaded(
                f"The queue is full ({len(self.queue)} images waiting); retry in about {wait:.0f} s.",
                retry_after=max(1.0, wait),
            )
        key = compat_key(request, has_image=images is not None, has_mask=mask is not None)
        now = time.monotonic()
        seed = request.seed if request.seed is not None else random.randrange(MAX_SEED - request.n)
        job = Job(
            request=request,
            key=key,
            samples=[],
            future=asyncio.get_running_loop().create_future(),
            created=now,
        )
        job.samples = [
            Sample(
                key=key,
                job=job,
                index=i,
                prompt=request.prompt,
                negative_prompt=request.negative_prompt,
                seed=seed + i,
                enqueued_at=now,
                image=images[0] if images else None,
                mask=mask,
            )
            for i in range(request.n)
        ]
        job.outputs = [None] * request.n
        self._jobs[job.id] = job
        self.queue.add(job.samples)
        self.arrivals.record(key, request.n, self.costs.seconds(key, 1))
        self.counters.total_requests += 1
        self._last_arrival = now
        self._wake.set()
        return job

    def _check_accepting(self) -> None:
        if self.health.quarantined:
            raise Unavailable("The pod is quarantined after repeated GPU errors.", code="quarantined")
        if self.draining:
            raise Unavailable("The pod is draining.", retry_after=1, code="draining")
        if not self.ready:
            raise Unavailable("The model is still loading.", retry_after=5, code="loading")

    def cancel(self, job: Job, reason: str = "client disconnected") -> None:
        """Forget ``job``: its queued samples never run; a batch of only its samples stops."""
        if job.done or job.cancelled:
            return
        job.cancelled = True
        dropped = self.queue.remove(lambda s: s.job is job)
        self.metrics.images.labels(m.OUTCOME_CANCELLED).inc(len(dropped))
        running = self.running
        if running and all(s.job.cancelled for s in running.samples):
            running.stop.set()
        self._jobs.pop(job.id, None)
        job.future.cancel()
        log.info("Cancelled request %s (%s): %d queued samples dropped", job.id[:8], reason, len(dropped))
        self._wake.set()

    # --- the batch loop ---

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            run = BatchRun(key=batch[0].key, samples=batch)
            self.running = run
            started = time.monotonic()
            for s in batch:
                self.metrics.queue_wait.observe(started - s.enqueued_at)
            self.busy.start()
            try:
                outcome = await loop.run_in_executor(self._gpu, self._run_batch, run)
            except Exception as exc:  # the executor itself failed
                outcome = Outcome(results=[None] * len(batch), error=exc)
            finally:
                self.running = None
                self.busy.stop()
            self._finish(run, outcome, time.monotonic() - started)

    async def _next_batch(self) -> list[Sample]:
        while True:
            group = self.queue.oldest_group(self.settings.max_batch_size)
            if not group:
                self._wake.clear()
                await self._wake.wait()
                continue
            key = group[0].key
            limit = self.costs.max_batch(key, self.settings.max_batch_size)
            queued = self.queue.group_count(key)
            decision = batching.plan(
                queued=queued,
                max_batch=limit,
                oldest_age_s=time.monotonic() - group[0].enqueued_at,
                since_last_arrival_s=time.monotonic() - self._last_arrival,
                max_wait_s=self.settings.max_wait_ms / 1000,
                other_keys_waiting=self.queue.has_other_keys(key),
                batch_seconds=functools.partial(self.costs.seconds, key),
                utilisation=self.utilisation(),
                arrivals_per_s=self.arrivals.rate(key),
                fill=self.settings.batch_policy == "fill",
            )
            if decision.wait_s > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), decision.wait_s)
                continue
            batch = group[: decision.size]
            self.queue.take(batch)
            return batch

    def _finish(self, run: BatchRun, outcome: Outcome, seconds: float) -> None:
        size = len(run.samples)
        self.counters.total_batches += 1
        self.counters.batch_seconds_total += seconds
        self.metrics.batch_size.observe(size)
        self.metrics.batch_seconds.observe(seconds)
        for n, t in outcome.timings:
            self.costs.observe(run.key, n, t)
        if outcome.oom_cap is not None:
            self.costs.cap(run.key, outcome.oom_cap)
            self.metrics.errors.labels("oom").inc()
        status = "cancelled" if outcome.cancelled else "failed" if outcome.error else "ok"
        self.recent.append(
            {
                "size": size,
                "seconds": round(seconds, 4),
                "task": run.key.task,
                "width": run.key.width,
                "height": run.key.height,
                "steps": run.key.steps,
                "steps_done": run.steps_done,
                "status": status,
                "requests": sorted({s.job.id for s in run.samples}),
            }
        )
        log.info(
            "Batch of %d %s %dx%d x%d steps: %s in %.3f s",
            size,
            run.key.task,
            run.key.width,
            run.key.height,
            run.key.steps,
            status,
            seconds,
        )
        if outcome.cancelled:
            self.metrics.images.labels(m.OUTCOME_CANCELLED).inc(size)
            return
        if outcome.error is not None:
            self._batch_failed(run, outcome.error)
            return
        self.health.success()
        for sample, result in zip(run.samples, outcome.results, strict=True):
            job = sample.job
            if job.cancelled or job.done:
                self.metrics.images.labels(m.OUTCOME_CANCELLED).inc()
                continue
            if isinstance(result, SampleFailed):
                self.metrics.images.labels(m.OUTCOME_FAILED).inc()
                self._fail(job, GenerationFailed(str(result), code=result.kind))
                continue
            self._encode(job, sample, result)

    def _batch_failed(self, run: BatchRun, error: BaseException) -> None:
        kind = "injected" if type(error).__name__ == "InjectedFault" else "pipeline"
        self.metrics.errors.labels(kind).inc()
        self.metrics.images.labels(m.OUTCOME_FAILED).inc(len(run.samples))
        message = f"Image generation failed: {type(error).__name__}: {str(error)[:300]}"
        for job in {s.job for s in run.samples}:
            self._fail(job, GenerationFailed(message, code="generation_failed"))
        if self.health.failure(message):
            log.error("Quarantined after %d consecutive failed batches", self.health.consecutive_failures)
            self.metrics.errors.labels("quarantine").inc()
            for job in list(self._jobs.values()):  # let the router place queued work elsewhere
                self._fail(
                    job, Unavailable("The pod is quarantined after repeated GPU errors.", code="quarantined")
                )

    def _encode(self, job: Job, sample: Sample, image: Any) -> None:
        loop = asyncio.get_running_loop()
        req = job.request
        fut = loop.run_in_executor(
            self._cpu,
            encode,
            image,
            req.output_format,
            req.output_compression,
            req.response_format == "b64_json",
        )
        self._pending_encodes.add(fut)

        def done(f: asyncio.Future[Encoded]) -> None:
            self._pending_encodes.discard(f)
            if job.done:
                return
            exc = f.exception()
            if exc is not None:
                self.metrics.errors.labels("encode").inc()
                self._fail(job, GenerationFailed(f"Encoding the image failed: {exc}"))
                return
            job.outputs[sample.index] = f.result()
            self.metrics.images.labels(m.OUTCOME_COMPLETED).inc()
            self.counters.images_completed += 1
            if all(o is not None for o in job.outputs):
                self._jobs.pop(job.id, None)
                self.counters.completed_requests += 1
                job.future.set_result([o for o in job.outputs if o is not None])

        fut.add_done_callback(done)

    def _fail(self, job: Job, error: APIError) -> None:
        if job.done:
            return
        self.queue.remove(lambda s: s.job is job)
        self._jobs.pop(job.id, None)
        self.counters.failed_requests += 1
        job.future.set_exception(error)
        job.future.exception()  # mark retrieved: the handler may be gone

    def utilisation(self) -> float:
        """How loaded the GPU is, for the batch policy: 1.0 means it never gets a rest.

        The larger of the demand that arrived (at batch size 1) and the share of the window the
        GPU actually spent busy. A full queue alone is not load: a one-off burst is served
        fastest on average one by one where batching buys little.
        """
        return max(self.arrivals.utilisation(), self.busy.fraction())

    # --- load ---

    def queued_requests(self) -> int:
        return len({id(s.job) for s in self.queue})

    def queued_seconds(self) -> float:
        total = 0.0
        for key, count in self.queue.groups().items():
            limit = self.costs.max_batch(key, self.settings.max_batch_size)
            full, rest = divmod(count, limit)
            total += full * (self.costs.seconds(key, limit) or 0.0)
            if rest:
                total += self.costs.seconds(key, rest) or 0.0
        return total

    def running_remaining_seconds(self) -> float:
        run = self.running
        if run is None:
            return 0.0
        estimate = self.costs.seconds(run.key, len(run.samples)) or 0.0
        if run.steps_total:
            return max(estimate * (1 - run.steps_done / run.steps_total), 0.0)
        elapsed = time.monotonic() - run.started_at if run.started_at else 0.0
        return max(estimate - elapsed, 0.0)

    def expected_wait_seconds(self) -> float:
        return self.queued_seconds() + self.running_remaining_seconds()

    def load_report(self, limits: dict[str, Any]) -> LoadReport:
        steps, width, height = self.defaults
        return LoadReport(
            model=self.model_id,
            ready=self.ready and not self.health.quarantined and not self.draining,
            quarantined=self.health.quarantined,
            draining=self.draining,
            queued_requests=self.queued_requests(),
            queued_samples=len(self.queue),
            running_samples=len(self.running.samples) if self.running else 0,
            queued_seconds=self.queued_seconds(),
            running_remaining_seconds=self.running_remaining_seconds(),
            unit_seconds=self.costs.unit_seconds(self.settings.max_batch_size),
            max_batch_size=self.settings.max_batch_size,
            default_steps=steps,
            default_width=width,
            default_height=height,
            completed_images=self.counters.images_completed,
            limits=limits,
        )


def compat_key(request: ImageRequest, *, has_image: bool, has_mask: bool) -> CompatKey:
    assert request.width and request.height and request.steps and request.guidance is not None
    task = "generate" if not has_image else "inpaint" if has_mask else "img2img"
    return CompatKey(
        task=task,
        width=request.width,
        height=request.height,
        steps=request.steps,
        guidance=request.guidance,
        strength=request.strength if has_image else None,
    )
