"""The pod's Prometheus metrics, named by :mod:`imagefleet.metrics` (a documented contract).

One custom collector reads everything at scrape time: the counts from
:class:`~.counters.PodCounters` (the same object ``/stats`` reads, so the two never drift) and
the state gauges from a snapshot of the pod. Each pod app has its own registry, so several pods
can live in one test process.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from imagefleet import metrics as m
from imagefleet.inference_pod.counters import Buckets, PodCounters


@dataclass(frozen=True)
class Gauges:
    """The pod's state as the gauges show it."""

    queued_samples: float = 0.0
    queued_requests: float = 0.0
    queued_seconds: float = 0.0
    running_samples: float = 0.0
    quarantined: float = 0.0
    ready: float = 0.0
    cached_steps: float = 0.0


class PodCollector(Collector):
    def __init__(
        self,
        counters: PodCounters,
        gauges: Callable[[], Gauges],
        model: Callable[[], Mapping[str, str] | None],
    ) -> None:
        self._counters = counters
        self._gauges = gauges
        self._model = model

    def collect(self) -> Iterator[Metric]:
        g = self._gauges()
        yield GaugeMetricFamily(
            m.POD_QUEUED_SAMPLES, "Samples (images) waiting for the GPU", g.queued_samples
        )
        yield GaugeMetricFamily(m.POD_QUEUED_REQUESTS, "Requests with samples waiting", g.queued_requests)
        yield GaugeMetricFamily(
            m.POD_QUEUED_SECONDS, "Estimated GPU seconds of queued and running work", g.queued_seconds
        )
        yield GaugeMetricFamily(m.POD_RUNNING_SAMPLES, "Samples in the batch on the GPU", g.running_samples)
        yield GaugeMetricFamily(
            m.POD_QUARANTINED, "1 when repeated GPU errors quarantined the pod", g.quarantined
        )
        yield GaugeMetricFamily(m.POD_READY, "1 when the model is loaded and the pod accepts work", g.ready)

        yield CounterMetricFamily(
            m.POD_CACHED_STEPS,
            "Fast tier: denoising steps that reused the step cache instead of running every block",
            g.cached_steps,
        )

        c = self._counters
        yield _histogram(m.POD_BATCH_SIZE, "Samples per pipeline call", {(): c.batch_size})
        yield _histogram(m.POD_BATCH_SECONDS, "Duration of one pipeline call", {(): c.batch_seconds})
        yield _histogram(
            m.POD_QUEUE_WAIT_SECONDS,
            "Time from a sample's arrival to the start of its batch",
            {(): c.queue_wait},
        )
        yield _histogram(
            m.POD_REQUEST_SECONDS,
            "Time from a request's arrival to its response",
            {(endpoint,): b for endpoint, b in c.request_seconds.items()},
            ["endpoint"],
        )
        yield _counter(
            m.POD_IMAGES, "Images by outcome", ["outcome"], [((k,), v) for k, v in c.images.items()]
        )
        yield _counter(
            m.POD_REQUESTS, "Image requests by endpoint and status", ["endpoint", "status"], c.http.items()
        )
        yield _counter(m.POD_ERRORS, "Errors by kind", ["kind"], [((k,), v) for k, v in c.errors.items()])
        labels = self._model()
        if labels is not None:
            yield InfoMetricFamily(m.POD_MODEL_INFO, "The served model", value=dict(labels))


def _counter(
    name: str, doc: str, labels: list[str], values: Iterable[tuple[tuple[str, ...], float]]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=labels)
    for label_values, value in values:
        family.add_metric(list(label_values), value)
    return family


def _histogram(
    name: str, doc: str, series: Mapping[tuple[str, ...], Buckets], labels: list[str] | None = None
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=labels or [])
    for label_values, buckets in series.items():
        cumulative = [(_le(bound), float(count)) for bound, count in buckets.cumulative()]
        family.add_metric(list(label_values), cumulative, buckets.sum)
    return family


def _le(bound: float) -> str:
    """A bucket bound as Prometheus' own client writes it (``1.0``, ``0.05``, ``+Inf``)."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def registry(collector: PodCollector) -> CollectorRegistry:
    r = CollectorRegistry()
    r.register(collector)
    return r
