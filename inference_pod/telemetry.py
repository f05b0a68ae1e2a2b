"""The pod's Prometheus metrics, named by :mod:`imagefleet.metrics` (a documented contract).

Each pod app has its own registry, so several pods can live in one test process. Gauges that
mirror the scheduler's state read it at scrape time, so they are never stale.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from imagefleet import metrics as m

BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 12, 20, 30, 45, 60, 90, 120, 180, 300, 600)


class PodMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queued_samples = Gauge(m.POD_QUEUED_SAMPLES, "Samples (images) waiting for the GPU", registry=r)
        self.queued_requests = Gauge(m.POD_QUEUED_REQUESTS, "Requests with samples waiting", registry=r)
        self.queued_seconds = Gauge(
            m.POD_QUEUED_SECONDS, "Estimated GPU seconds of queued and running work", registry=r
        )
        self.running_samples = Gauge(m.POD_RUNNING_SAMPLES, "Samples in the batch on the GPU", registry=r)
        self.quarantined = Gauge(
            m.POD_QUARANTINED, "1 when repeated GPU errors quarantined the pod", registry=r
        )
        self.ready = Gauge(m.POD_READY, "1 when the model is loaded and the pod accepts work", registry=r)
        self.batch_size = Histogram(
            m.POD_BATCH_SIZE, "Samples per pipeline call", buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            m.POD_BATCH_SECONDS, "Duration of one pipeline call", buckets=SECONDS_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            m.POD_QUEUE_WAIT_SECONDS,
            "Time from a sample's arrival to the start of its batch",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            m.POD_REQUEST_SECONDS,
            "Time from a request's arrival to its response",
            ["endpoint"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.images = Counter(m.POD_IMAGES, "Images by outcome", ["outcome"], registry=r)
        self.requests = Counter(
            m.POD_REQUESTS, "Image requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.errors = Counter(m.POD_ERRORS, "Errors by kind", ["kind"], registry=r)
        self.model = Info(m.POD_MODEL_INFO, "The served model", registry=r)
        for outcome in (m.OUTCOME_COMPLETED, m.OUTCOME_FAILED, m.OUTCOME_CANCELLED):
            self.images.labels(outcome)

    def bind(
        self,
        *,
        queued_samples: Callable[[], float],
        queued_requests: Callable[[], float],
        queued_seconds: Callable[[], float],
        running_samples: Callable[[], float],
        quarantined: Callable[[], float],
        ready: Callable[[], float],
    ) -> None:
        """Make the state gauges read the scheduler at scrape time."""
        self.queued_samples.set_function(queued_samples)
        self.queued_requests.set_function(queued_requests)
        self.queued_seconds.set_function(queued_seconds)
        self.running_samples.set_function(running_samples)
        self.quarantined.set_function(quarantined)
        self.ready.set_function(ready)
