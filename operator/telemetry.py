"""The operator's own Prometheus metrics (served with /healthz on the operator's health port)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from imagefleet import metrics as m

SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.passes = Counter(
            m.OPERATOR_PASSES, "Reconcile passes by result (ok, error)", ["result"], registry=r
        )
        self.pass_seconds = Histogram(
            m.OPERATOR_PASS_SECONDS, "Duration of one reconcile pass", buckets=SECONDS_BUCKETS, registry=r
        )
        self.scrape_seconds = Histogram(
            m.OPERATOR_SCRAPE_SECONDS,
            "Duration of scraping every pod of one generator",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.scrape_failures = Counter(
            m.OPERATOR_SCRAPE_FAILURES, "Pod /metrics scrapes that failed or timed out", registry=r
        )
        self.status_writes = Counter(m.OPERATOR_STATUS_WRITES, "Status patches written", registry=r)
        self.pod_changes = Counter(m.OPERATOR_POD_CHANGES, "Inference pods created or deleted", registry=r)
        self.replacements = Counter(
            m.OPERATOR_REPLACEMENTS, "Faulty pods replaced, by reason", ["reason"], registry=r
        )
        self.api_requests = Counter(
            m.OPERATOR_API_REQUESTS, "API calls made outside kopf's watches", registry=r
        )
        self.generators = Gauge(m.OPERATOR_GENERATORS, "ImageGenerators this operator runs", registry=r)
        self.leader = Gauge(m.OPERATOR_LEADER, "1 while this replica holds the leader Lease", registry=r)
