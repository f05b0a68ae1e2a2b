"""Built-in autoscaling: replicas from seconds of queued GPU work, with a scale-down delay.

The recommendation is ``ceil(total queued seconds / target per replica)`` within
``[minReplicas, maxReplicas]``, the rule an HPA applies to an average metric. Going up happens at
once (queued work only grows while capacity is missing); going down takes the *largest*
recommendation of the last ``scaleDownDelaySeconds`` (the HPA's stabilization window), so a
short lull does not shed pods that load for minutes.

A pod whose ``/metrics`` did not answer the scrape (timed out, refused, nonsense) is not an idle
pod: a pod too busy to answer is the likeliest one to hold work. As the HPA does with pods
missing metrics, such a pod counts as holding nothing when scaling up (no pods are added without
evidence) and as holding one replica's target when scaling down (it keeps its own place), so
unanswered scrapes never shed a pod.

The history lives in the operator's memory: after a restart the window starts empty and fills
again, which can only delay a scale-down, never cause one.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from imagefleet.operator.scrape import PodMetrics
from imagefleet.operator.spec import Autoscaling


@dataclass(frozen=True)
class Demand:
    """What one scrape of a generator's pods says of its queued work."""

    seconds: float
    """Seconds of queued GPU work, summed over the pods that answered."""
    unanswered: int = 0
    """Pods scraped that did not answer."""

    @classmethod
    def of(cls, scraped: Iterable[PodMetrics | None]) -> Demand:
        """The demand of one scrape's results (None: a pod that did not answer)."""
        results = list(scraped)
        return cls(
            seconds=sum(m.queued_seconds for m in results if m is not None),
            unanswered=sum(1 for m in results if m is None),
        )


def recommend(queued_seconds: float, policy: Autoscaling) -> int:
    wanted = math.ceil(max(0.0, queued_seconds) / policy.target_queued_seconds - 1e-9)
    return max(policy.min_replicas, min(policy.max_replicas, wanted))


@dataclass
class Stabilizer:
    """Recommendations of one generator over its scale-down window."""

    history: deque[tuple[float, int]] = field(default_factory=deque)
    started_at: float | None = None
    last: int | None = None
    """What :meth:`desired` last answered (the status's ``desiredReplicas``)."""

    def desired(self, current: int, demand: Demand, policy: Autoscaling, now: float) -> int:
        """The replicas to run now, given ``current`` (spec.replicas) and the queued work."""
        self.last = self._desired(current, demand, policy, now)
        return self.last

    def _desired(self, current: int, demand: Demand, policy: Autoscaling, now: float) -> int:
        up = recommend(demand.seconds, policy)
        kept = recommend(demand.seconds + demand.unanswered * policy.target_queued_seconds, policy)
        if self.started_at is None:
            self.started_at = now
        self.history.append((now, kept))
        while self.history and self.history[0][0] < now - policy.scale_down_delay_s:
            self.history.popleft()
        if up >= current:
            return up
        if current > policy.max_replicas:
            return policy.max_replicas
        if now - self.started_at < policy.scale_down_delay_s:
            return current  # the window is not full yet: it has not seen a whole delay's worth
        window_max = max(r for _, r in self.history)
        return max(policy.min_replicas, min(current, window_max))
