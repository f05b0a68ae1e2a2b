"""The router's view of every backend's load: last report + what it sent since.

A pod's load report is a snapshot taken while the router's fetch was in flight. Requests this
router sent *after that fetch began* cannot be in it, so they are added on top, each priced with
the pod's own seconds per work unit. Requests sent before the fetch began are in the report (as
queued or running work) and are not counted twice. A request leaves the view when its response
ends, whatever the outcome.

Reports from other router replicas' requests reach this view through the pods' reports, so
replicas share what they know at the poll interval, and :mod:`.pick` keeps them from herding in
between.

Nothing here does I/O; times are passed in, so every rule is unit-tested with plain numbers.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from imagefleet.loadreport import LoadReport
from imagefleet.router.cost import Shape
from imagefleet.router.discovery import Backend
from imagefleet.router.health import Health
from imagefleet.router.pick import Candidate

log = logging.getLogger(__name__)

NOMINAL_UNIT_SECONDS = 1.0
"""Price of a work unit while no pod has measured one: keeps in-flight work comparable by count."""


@dataclass
class InFlight:
    sent_at: float
    shape: Shape


@dataclass
class BackendView:
    backend: Backend
    health: Health
    report: LoadReport | None = None
    report_started: float = float("-inf")
    """Monotonic time at which the fetch that produced ``report`` began."""
    report_at: float = float("-inf")
    inflight: dict[int, InFlight] = field(default_factory=dict)
    ejection_waiters: set[asyncio.Future[None]] = field(default_factory=set)
    """Requests in flight here that want to know when the backend is ejected (to fail over)."""

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def accepting(self) -> bool:
        return self.report is not None and self.report.accepting and not self.health.ejected

    def unseen(self) -> list[InFlight]:
        """Requests in flight that the last report cannot contain."""
        return [f for f in self.inflight.values() if f.sent_at >= self.report_started]

    def unit_seconds(self, fallback: float) -> float:
        return (
            self.report.unit_seconds if self.report is not None and self.report.unit_seconds > 0 else fallback
        )

    def expected_wait(self, fallback_unit_s: float) -> float:
        """Seconds of work ahead of a new request here."""
        if self.report is None:
            return 0.0
        unit_s = self.unit_seconds(fallback_unit_s)
        return (
            self.report.expected_wait_seconds
            + sum(f.shape.units(self.report) for f in self.unseen()) * unit_s
        )

    def price(self, shape: Shape, fallback_unit_s: float) -> float:
        if self.report is None:
            return 0.0
        return shape.units(self.report) * self.unit_seconds(fallback_unit_s)


class LoadView:
    """Every known backend's view, keyed by backend name."""

    def __init__(self, *, eject_after: int, backoff_s: float, backoff_max_s: float) -> None:
        self._health = (eject_after, backoff_s, backoff_max_s)
        self.views: dict[str, BackendView] = {}
        self._tokens = itertools.count()

    # --- membership ---

    def sync(self, backends: Mapping[str, Backend]) -> tuple[list[BackendView], list[BackendView]]:
        """Adopt a discovery snapshot; returns (added, removed). A backend whose URL changed is both."""
        removed = [v for name, v in self.views.items() if backends.get(name) != v.backend]
        for view in removed:
            del self.views[view.name]
        added = []
        for name, backend in backends.items():
            if name not in self.views:
                eject_after, base, cap = self._health
                self.views[name] = BackendView(backend, Health(eject_after, base, cap))
                added.append(self.views[name])
        return added, removed

    def by_key(self, key: str) -> BackendView | None:
        for view in self.views.values():
            if view.backend.key == key:
                return view
        return None

    # --- reports ---

    @staticmethod
    def reported(view: BackendView, report: LoadReport, started: float, now: float) -> bool:
        """Record a fetched report; True if the backend came back from ejection."""
        view.report = report
        view.report_started = started
        view.report_at = now
        return view.health.succeeded()

    @staticmethod
    def failed(view: BackendView, now: float, reason: str) -> bool:
        """Record a failure (a failed poll or an unreachable attempt); True if it ejected the backend.

        An ejection is logged with ``reason`` and wakes every request waiting on the backend, so
        that they fail over instead of waiting out their time-out on a hung pod.
        """
        if not view.health.failed(now):
            return False
        if view.report is None:
            log.info("Backend %s not reachable yet (%s)", view.name, reason)
        else:
            log.warning(
                "Backend %s ejected for %.1f s: %s",
                view.name,
                max(0.0, view.health.probe_at - now),
                reason,
            )
        waiters, view.ejection_waiters = view.ejection_waiters, set()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        return True

    @staticmethod
    def refused(view: BackendView) -> None:
        """The pod answered 503 (draining, quarantined, loading): out until a report says otherwise."""
        if view.report is not None:
            view.report = replace(view.report, ready=False)

    # --- in flight ---

    def begin(self, view: BackendView, shape: Shape, now: float) -> int:
        token = next(self._tokens)
        view.inflight[token] = InFlight(now, shape)
        return token

    @staticmethod
    def end(view: BackendView, token: int) -> None:
        view.inflight.pop(token, None)

    # --- choosing ---

    def fallback_unit_seconds(self) -> float:
        known = [v.report.unit_seconds for v in self.views.values() if v.report and v.report.unit_seconds > 0]
        return sum(known) / len(known) if known else NOMINAL_UNIT_SECONDS

    def candidates(self, shape: Shape, exclude: Iterable[str] = ()) -> list[Candidate]:
        skip = set(exclude)
        fallback = self.fallback_unit_seconds()
        return [
            Candidate(v.name, v.expected_wait(fallback), v.price(shape, fallback))
            for v in self.views.values()
            if v.accepting and v.name not in skip
        ]

    def ready_count(self) -> int:
        return sum(1 for v in self.views.values() if v.accepting)

    def healthy_count(self) -> int:
        return sum(1 for v in self.views.values() if not v.health.ejected)
