"""The load estimate: seconds of GPU work queued, and what remains of the running batch.

Priced with the learned batch costs (:class:`~.costs.CostModel`): queued samples of one key run
in full batches of the largest size that fits, and the running batch is as far along as its steps
say. Routers compare pods by the sum (the expected wait of a new sample), not by request counts.
"""

from __future__ import annotations

from collections.abc import Callable

from imagefleet.inference_pod.batchstate import BatchState
from imagefleet.inference_pod.costs import CostModel
from imagefleet.inference_pod.worker import BatchRun


class LoadEstimator:
    def __init__(self, state: BatchState, costs: CostModel, running: Callable[[], BatchRun | None]) -> None:
        self._state = state
        self._costs = costs
        self._running = running

    def queued_seconds(self) -> float:
        total = 0.0
        for key, count in self._state.queue.groups().items():
            limit = self._costs.max_batch(key, self._state.max_batch_size)
            full, rest = divmod(count, limit)
            total += full * (self._costs.seconds(key, limit) or 0.0)
            if rest:
                total += self._costs.seconds(key, rest) or 0.0
        return total

    def running_remaining_seconds(self, now: float) -> float:
        run = self._running()
        if run is None:
            return 0.0
        estimate = self._costs.seconds(run.key, len(run.samples)) or 0.0
        if run.steps_total:
            return max(estimate * (1 - run.steps_done / run.steps_total), 0.0)
        return max(estimate - (now - run.started_at), 0.0)

    def expected_wait_seconds(self, now: float) -> float:
        return self.queued_seconds() + self.running_remaining_seconds(now)

    def unit_seconds(self) -> float:
        """Seconds per work unit per sample at the full batch size (0 until measured)."""
        return self._costs.unit_seconds(self._state.max_batch_size)
