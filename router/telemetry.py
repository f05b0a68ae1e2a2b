"""The router's own Prometheus metrics, named by :mod:`imagefleet.metrics` (a documented contract).

One registry per app, so several routers can live in one test process. The backend gauges read
the load view at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

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
EJECTED = "ejected"

# reasons of ROUTER_RETRIES
RETRY_UNREACHABLE = "unreachable"
RETRY_UNAVAILABLE = "unavailable"
RETRY_OVERLOADED = "overloaded"
RETRY_EJECTED = "ejected"
RETRY_STREAM_FAILED = "stream_failed"
"""A streamed answer that ended (an error event, or cut off) before its first event."""


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
        self.responses = Counter(
            m.ROUTER_RESPONSES,
            "Responses to clients by endpoint, status and origin (router: the router's own answer; "
            "backend: a pod's answer relayed)",
            ["endpoint", "status", "origin"],
            registry=r,
        )
        for reason in (
            RETRY_UNREACHABLE,
            RETRY_UNAVAILABLE,
            RETRY_OVERLOADED,
            RETRY_EJECTED,
            RETRY_STREAM_FAILED,
        ):
            self.retries.labels(reason)

    def bind_connection_errors(self, counts: Callable[[], Mapping[str, int]]) -> None:
        """Expose the HTTP server's connection-level answers (parse errors, caps, time-outs)."""
        self.registry.register(_ConnectionErrors(counts))

    def bind(
        self, *, known: Callable[[], float], healthy: Callable[[], float], ready: Callable[[], float]
    ) -> None:
        self.backends.labels("known").set_function(known)
        self.backends.labels("healthy").set_function(healthy)
        self.backends.labels("ready").set_function(ready)


class _ConnectionErrors(Collector):
    def __init__(self, counts: Callable[[], Mapping[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            m.ROUTER_CONNECTION_ERRORS,
            "Requests answered or connections closed by the HTTP server itself, by kind",
            labels=["kind"],
        )
        for kind, count in sorted(self._counts().items()):
            family.add_metric([kind], count)
        yield family
