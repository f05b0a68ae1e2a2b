"""Pod health: consecutive failed batches; past the limit the pod quarantines itself for good.

A quarantined pod refuses work (``/readyz`` 503, the load report says so) so that routers drain it
and the operator replaces it: a GPU that failed this often is not trusted again in this process.
"""

from __future__ import annotations

from dataclasses import dataclass


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
