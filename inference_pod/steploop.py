"""The event loop's side of a step-level batch (``--batch-mode step``; :mod:`.stepbatch` runs it).

The batch loop starts a step-level batch like any other (the fair queue picks the key, the batch
policy its first samples) and hands it to the GPU thread with a :class:`StepSession` as its
channel. After every denoising step the GPU thread calls :meth:`StepSession.exchange`, which
runs :meth:`StepSession.between` on the event loop while the GPU thread waits:

* the samples that left are settled at once, each group of samples leaving together as a batch
  of its own (delivered, counted in the batch metrics, logged in ``/debug/batches``), so a
  finished image never waits for its batchmates;
* members whose request went away (cancelled, or failed by another of its samples) are dropped
  and leave before the next step;
* waiting samples of the running key join, up to the key's batch cap, while the fair queue
  would still serve the key next (:meth:`.batchstate.BatchState.join`);
* the batch ends when it has no member left.

Only the event loop touches the batch state; the GPU thread only waits for the answer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any

from imagefleet.inference_pod.batching import Sample
from imagefleet.inference_pod.batchstate import BatchState
from imagefleet.inference_pod.worker import Admission, BatchRun, Left, Outcome, StepReport

POLL_S = 1.0
"""How often a GPU thread waiting for an answer checks whether the session was closed."""

Settle = Callable[[BatchRun, Outcome, float], None]
"""Settles samples that left as one batch: (the samples as a run, their outcome, its seconds)."""


class StepSession:
    """The channel (:class:`~.worker.StepChannel`) of one step-level batch, and its members."""

    def __init__(
        self,
        run: BatchRun,
        *,
        state: BatchState,
        loop: asyncio.AbstractEventLoop,
        clock: Callable[[], float],
        settle: Settle,
        account: Callable[[Outcome], None],
        joined: Callable[[list[Sample], float], None],
    ) -> None:
        self.run = run
        self.key = run.key
        self._state = state
        self._loop = loop
        self._clock = clock
        self._settle = settle
        self._account = account
        self._joined = joined
        self._closed = threading.Event()
        self.members: list[Sample] = []
        self._since: dict[int, tuple[float, int]] = {}
        """Sample id -> (when it joined, on the loop's clock; the batch step it joined at)."""
        self._peak: dict[int, int] = {}
        """Sample id -> the most samples in a transformer call it was part of."""
        run.steps_total = self.key.steps
        self._admit(list(run.samples), 0)

    # --- the GPU thread ---

    def exchange(self, report: StepReport) -> Admission | None:
        future: concurrent.futures.Future[Admission | None] = concurrent.futures.Future()

        def on_loop() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(self.between(report))
            except BaseException as exc:
                future.set_exception(exc)

        try:
            self._loop.call_soon_threadsafe(on_loop)
        except RuntimeError:  # the loop is closed: nobody is waiting for anything
            return None
        while True:
            try:
                return future.result(timeout=POLL_S)
            except concurrent.futures.TimeoutError:
                if self._closed.is_set() and future.cancel():
                    return None

    # --- the event loop ---

    def close(self) -> None:
        """The batch loop stopped waiting for this batch (it ended, or the pod stops)."""
        self._closed.set()

    def between(self, report: StepReport) -> Admission | None:
        """Settle what the last step did; decide who joins and who is dropped."""
        now = self._clock()
        self._account(report.outcome)
        for sample in self.members:
            self._peak[sample.id] = max(self._peak.get(sample.id, 0), report.size)
        if report.left:
            self._leave(report.left, Outcome(results=[left.result for left in report.left]), report, now)
        gone = [s for s in self.members if s.job_id not in self._state.jobs]
        if gone:
            dropped = [Left(s, None, -1) for s in gone]
            self._leave(dropped, Outcome(results=[None] * len(gone), cancelled=True), report, now)
        self.run.stop.clear()  # whoever is left has a request waiting
        if self._closed.is_set():
            return None
        joined = self._state.join(self.key, self._state.batch_cap(self.key) - len(self.members))
        self._admit(joined, report.steps_run)
        self.run.steps_done = 0 if joined else report.least_done
        if not self.members:
            return None
        return Admission(join=joined, drop=gone)

    def end(self, outcome: Outcome) -> None:
        """The GPU thread is done with the batch: account for the rest; a failure (a device
        fault) fails the members still in it, and members of a batch cut short are cancelled."""
        self._account(
            Outcome(results=[], timings=outcome.timings, oom_cap=outcome.oom_cap, retried=outcome.retried)
        )
        if not self.members:
            return
        rest = [Left(s, None, -1) for s in self.members]
        if outcome.error is not None:
            failed = Outcome(results=[None] * len(rest), error=outcome.error)
        else:
            failed = Outcome(results=[None] * len(rest), cancelled=True)
        self._leave(rest, failed, None, self._clock())

    def _admit(self, samples: list[Sample], step: int) -> None:
        if not samples:
            return
        now = self._clock()
        self.members += samples
        self.run.samples = list(self.members)
        for sample in samples:
            self._since[sample.id] = (now, step)
        self._joined(samples, now)

    def _leave(self, left: list[Left], outcome: Outcome, report: StepReport | None, now: float) -> None:
        samples = [item.sample for item in left]
        ids = {s.id for s in samples}
        self.members = [s for s in self.members if s.id not in ids]
        self.run.samples = list(self.members)
        self._state.leave(samples)
        since = [self._since.pop(s.id, (now, 0)) for s in samples]
        peaks = [self._peak.pop(s.id, 0) for s in samples]
        done = [item.steps_done for item in left if item.steps_done >= 0]
        log: dict[str, Any] = {
            "mode": "step",
            "joined_at_step": min(step for _, step in since),
            "left_at_step": report.steps_run if report is not None else None,
            "peak_batch": max(peaks),
        }
        group = BatchRun(
            self.key,
            samples,
            steps_total=self.key.steps,
            steps_done=max(done, default=0),
            started_at=min(t for t, _ in since),
            log=log,
        )
        self._settle(group, outcome, now - group.started_at)
