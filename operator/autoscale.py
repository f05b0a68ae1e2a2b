"""Built-in autoscaling: replicas from seconds of queued GPU work, with a scale-down delay.

The recommendation is ``ceil(total queued seconds / target per replica)`` within
``[minReplicas, maxReplicas]``, the rule an HPA applies to an average metric. Going up happens at
once (queued work only grows while capacity is missing); going down takes the *largest*
recommendation of the last ``scaleDownDelaySeconds`` (the HPA's stabilization window), so a
short lull does not shed pods that load for minutes.

The history lives in the operator's memory: after a restart the window starts empty and fills
again, which can only delay a scale-down, never cause one.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from imagefleet.operator.spec import Autoscaling


def recommend(queued_seconds: float, policy: Autoscaling) -> int:
    wanted = math.ceil(max(0.0, queued_seconds) / policy.target_queued_seconds - 1e-9)
    return max(policy.min_replicas, min(policy.max_replicas, wanted))


@dataclass
class Stabilizer:
    """Recommendations of one generator over its scale-down window."""

    history: deque[tuple[float, int]] = field(default_factory=deque)
    started_at: float | None = None

    def desired(self, current: int, queued_seconds: float, policy: Autoscaling, now: float) -> int:
        """The replicas to run now, given ``current`` (spec.replicas) and the queued work."""
        rec = recommend(queued_seconds, policy)
        if self.started_at is None:
            self.started_at = now
        self.history.append((now, rec))
        while self.history and self.history[0][0] < now - policy.scale_down_delay_s:
            self.history.popleft()
        if rec >= current:
            return rec
        if current > policy.max_replicas:
            return policy.max_replicas
        if now - self.started_at < policy.scale_down_delay_s:
            return current  # the window is not full yet: it has not seen a whole delay's worth
        window_max = max(r for _, r in self.history)
        return max(policy.min_replicas, min(current, window_max))
