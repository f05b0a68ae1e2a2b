"""Pod health: consecutive failed batches; past the limit the pod quarantines itself for good.

A quarantined pod refuses work (``/readyz`` 503, the load report says so) so that routers drain it
and the operator replaces it: a GPU that failed this often is not trusted again in this process.

A GPU can also hang without failing: a batch that completes no denoising step for
``--stall-after-s`` (:class:`StallWatch`) makes the pod *stalled*. It refuses work as a
quarantined pod does, and its liveness check fails too, so the kubelet restarts the container,
which nothing inside a process whose GPU thread is stuck can do for itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class Running(Protocol):
    """What the stall watch reads of a running batch (:class:`.worker.BatchRun`)."""

    progress: int
    started_at: float


@dataclass
class PodHealth:
    limit: int
    """Consecutive failed batches that quarantine the pod (``--quarantine-after``)."""
    consecutive_failures: int = 0
    quarantined: bool = False
    last_error: str | None = None

    def success(self) -> None:
        self.consecutive_failures = 0

    def failure(self, message: str) -> bool:
        """Record a failed batch; True if this one quarantined the pod."""
        self.consecutive_failures += 1
        self.last_error = message
        if not self.quarantined and self.consecutive_failures >= self.limit:
            self.quarantined = True
            return True
        return False


@dataclass
class StallWatch:
    """Whether the running batch has made no progress for ``after_s`` seconds.

    Progress is the batch's count of completed denoising steps, read whenever the pod's phase is
    asked for (probes, load reports, requests). A count that has not moved since it was last seen
    has not moved in between, so the time since that reading bounds the stall from below; a batch
    first seen without a step done has made none since it started.
    """

    after_s: float
    _run: Running | None = None
    _progress: int = 0
    _since: float = 0.0

    def stalled(self, run: Running | None, now: float) -> bool:
        """Whether ``run`` (the batch on the GPU, None when idle) is stalled at ``now``."""
        if run is None:
            self._run = None
            return False
        if run is not self._run or run.progress != self._progress:
            first = run is not self._run
            self._run, self._progress = run, run.progress
            self._since = run.started_at if first and run.progress == 0 else now
        return now - self._since > self.after_s
