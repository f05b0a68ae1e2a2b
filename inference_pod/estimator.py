"""The load estimate: seconds of GPU work queued, and what remains of the running batch.

Priced with the learned batch costs (:class:`~.costs.CostModel`, or its conservative prior before
anything was measured): queued samples of one key run in full batches of the key's batch cap,
and the running batch is as far along as its steps say. Routers compare pods by the sum (the
expected wait of a new sample), not by request counts; admission (:mod:`.admission`) bounds it.
"""

from __future__ import annotations

from collections.abc import Callable

from imagefleet.inference_pod.batching import CompatKey
from imagefleet.inference_pod.batchstate import BatchState
from imagefleet.inference_pod.costs import CostModel
from imagefleet.inference_pod.worker import BatchRun


def batched_seconds(costs: CostModel, key: CompatKey, count: int, limit: int) -> float:
    """Estimated GPU-seconds of ``count`` samples of ``key`` run in full batches of ``limit``
    (the prior prices them while nothing has been measured)."""
    full, rest = divmod(count, max(limit, 1))
    return full * costs.estimate(key, limit) + (costs.estimate(key, rest) if rest else 0.0)


class LoadEstimator:
    def __init__(self, state: BatchState, costs: CostModel, running: Callable[[], BatchRun | None]) -> None:
        self._state = state
        self._costs = costs
        self._running = running

    def request_seconds(self, key: CompatKey, n: int) -> float:
        """Estimated GPU-seconds of a request for ``n`` images of ``key``, run on its own."""
        return batched_seconds(self._costs, key, n, self._state.batch_cap(key))

    def queued_seconds(self) -> float:
        return sum(
            batched_seconds(self._costs, key, count, self._state.batch_cap(key))
            for key, count in self._state.queue.groups().items()
        )

    def running_remaining_seconds(self, now: float) -> float:
        run = self._running()
        if run is None:
            return 0.0
        estimate = self._costs.estimate(run.key, len(run.samples))
        if run.steps_total:
            return max(estimate * (1 - run.steps_done / run.steps_total), 0.0)
        return max(estimate - (now - run.started_at), 0.0)

    def expected_wait_seconds(self, now: float) -> float:
        return self.queued_seconds() + self.running_remaining_seconds(now)

    def unit_seconds(self) -> float:
        """Seconds per work unit per sample at the full batch size (0 until measured)."""
        return self._costs.unit_seconds(self._state.max_batch_size)
