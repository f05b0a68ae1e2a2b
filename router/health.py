"""Passive and active health of one backend: eject after repeated failures, probe back in.

Failures are counted from both sides: a load-report poll that fails, and a proxied request that
could not reach the pod (refused, reset before the response began). ``eject_after`` consecutive
failures take the backend out of the pool for a backoff; when it ends, the next poll is a probe:
success puts the backend back, failure ejects it again for twice as long, up to the cap.

The backoff doubles once per failed *probe*, never per failed request: when a pod dies with
twenty requests in flight, their twenty failures arrive together, the first ones eject it and
the rest (reported while the backoff runs) change nothing, so a pod that is back after a few
seconds gets traffic again after ``base_s``, not after the cap.

The backoff is a one-line pure function rather than a retry library: retry libraries (tenacity,
backoff) wrap a call and sleep inside it, while here the "retry" is a state the poller and the
picker read, and the delay must be inspectable in tests and in ``/stats``.
"""

from __future__ import annotations

from dataclasses import dataclass


def backoff_delay(ejections: int, base_s: float, cap_s: float) -> float:
    """Seconds out of the pool after the ``ejections``-th consecutive ejection (0-based)."""
    return float(min(cap_s, base_s * 2 ** min(max(ejections, 0), 32)))


@dataclass
class Health:
    eject_after: int
    base_s: float
    cap_s: float
    failures: int = 0
    """Consecutive failures since the last success."""
    ejections: int = 0
    """Consecutive ejections since the backend last served; sets the next backoff."""
    ejected: bool = False
    probe_at: float = 0.0
    """While ejected: the monotonic time from which the next probe may run."""

    def succeeded(self) -> bool:
        """Record a success; True if this brought an ejected backend back."""
        was_out = self.ejected
        self.failures = 0
        self.ejections = 0
        self.ejected = False
        return was_out

    def failed(self, now: float) -> bool:
        """Record a failure at ``now``; True if this ejected the backend.

        A failure while the backoff runs (a request sent before the ejection failing late) is
        not a probe: it neither counts nor lengthens the backoff.
        """
        if self.ejected and now < self.probe_at:
            return False
        self.failures += 1
        if self.failures < self.eject_after:
            return False
        self.probe_at = now + backoff_delay(self.ejections, self.base_s, self.cap_s)
        self.ejections += 1
        first = not self.ejected
        self.ejected = True
        return first

    def may_probe(self, now: float) -> bool:
        return not self.ejected or now >= self.probe_at
