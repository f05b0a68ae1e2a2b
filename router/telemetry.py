"""The router's own Prometheus metrics, named by :mod:`imagefleet.metrics` (a documented contract).

One registry per app, so several routers can live in one test process. The backend gauges read
the load view at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from imagefleet import metrics as m

PICK_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2)
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)

# outcomes of ROUTER_REQUESTS, one per attempt at a backend
OK = "ok"
CLIENT_ERROR = "client_error"
SERVER_ERROR = "server_error"
OVERLOADED = "overloaded"
UNAVAILABLE = "unavailable"
UNREACHABLE = "unreachable"
TIMEOUT = "timeout"
CANCELLED = "cancelled"

# reasons of ROUTER_RETRIES
RETRY_UNREACHABLE = "unreachable"
RETRY_UNAVAILABLE = "unavailable"
RETRY_OVERLOADED = "overloaded"


def outcome_of(status: int) -> str:
    if status == 429:
        return OVERLOADED
    if status == 503:
        return UNAVAILABLE
    if status >= 500:
        return SERVER_ERROR
    if status >= 400:
        return CLIENT_ERROR
    return OK


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            m.ROUTER_REQUESTS,
            "Attempts at a backend by backend and outcome",
            ["backend", "outcome"],
            registry=r,
        )
        self.retries = Counter(
            m.ROUTER_RETRIES, "Requests sent again to another backend, by reason", ["reason"], registry=r
        )
        self.pick_seconds = Histogram(
            m.ROUTER_PICK_SECONDS, "Time to choose a backend", buckets=PICK_BUCKETS, registry=r
        )
        self.backends = Gauge(
            m.ROUTER_BACKENDS, "Backends by state (known, healthy, ready)", ["state"], registry=r
        )
        self.request_seconds = Histogram(
            m.ROUTER_REQUEST_SECONDS,
            "Time from a request's arrival at the router to its response",
            ["endpoint"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        for reason in (RETRY_UNREACHABLE, RETRY_UNAVAILABLE, RETRY_OVERLOADED):
            self.retries.labels(reason)

    def bind(
        self, *, known: Callable[[], float], healthy: Callable[[], float], ready: Callable[[], float]
    ) -> None:
        self.backends.labels("known").set_function(known)
        self.backends.labels("healthy").set_function(healthy)
        self.backends.labels("ready").set_function(ready)
