"""Prometheus metric names: a contract between the pod, the router and the operator.

The pod and the router create their collectors from these names, and the operator and the
router read them back, so a rename here is a breaking change for every reader. The meaning of
each metric is documented in docs/metrics.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

PREFIX = "imagefleet_"

# --- inference pod ---
POD_QUEUED_SAMPLES = PREFIX + "pod_queued_samples"
POD_QUEUED_REQUESTS = PREFIX + "pod_queued_requests"
POD_QUEUED_SECONDS = PREFIX + "pod_queued_work_seconds"
POD_RUNNING_SAMPLES = PREFIX + "pod_running_samples"
POD_BATCH_SIZE = PREFIX + "pod_batch_size"
POD_BATCH_SECONDS = PREFIX + "pod_batch_duration_seconds"
POD_QUEUE_WAIT_SECONDS = PREFIX + "pod_queue_wait_seconds"
POD_REQUEST_SECONDS = PREFIX + "pod_request_duration_seconds"
POD_IMAGES = PREFIX + "pod_images"  # counter, label outcome
POD_REQUESTS = PREFIX + "pod_requests"  # counter, labels endpoint, status
POD_ERRORS = PREFIX + "pod_errors"  # counter, label kind
POD_QUARANTINED = PREFIX + "pod_quarantined"
POD_READY = PREFIX + "pod_ready"
POD_CACHED_STEPS = PREFIX + "pod_cached_steps"  # counter: fast-tier steps served from the step cache
POD_MODEL_INFO = PREFIX + "pod_model"  # info: model, family, random_weights, device, dtype, tiers, compiled

# outcomes of POD_IMAGES
OUTCOME_COMPLETED = "completed"
OUTCOME_FAILED = "failed"
OUTCOME_CANCELLED = "cancelled"

# --- router ---
ROUTER_REQUESTS = PREFIX + "router_requests"  # counter, labels backend, outcome
ROUTER_RETRIES = PREFIX + "router_retries"  # counter, label reason
ROUTER_PICK_SECONDS = PREFIX + "router_pick_duration_seconds"
ROUTER_BACKENDS = PREFIX + "router_backends"  # gauge, label state: known, healthy, ready
ROUTER_REQUEST_SECONDS = PREFIX + "router_request_duration_seconds"  # histogram, label endpoint
ROUTER_RESPONSES = PREFIX + "router_responses"  # counter, labels endpoint, status, origin
ROUTER_CONNECTION_ERRORS = PREFIX + "router_connection_errors"  # counter, label kind

# origins of ROUTER_RESPONSES
ORIGIN_ROUTER = "router"
ORIGIN_BACKEND = "backend"

# --- operator ---
OPERATOR_PASSES = PREFIX + "operator_reconcile_passes"  # counter, label result
OPERATOR_PASS_SECONDS = PREFIX + "operator_reconcile_duration_seconds"
OPERATOR_SCRAPE_SECONDS = PREFIX + "operator_scrape_duration_seconds"
OPERATOR_SCRAPE_FAILURES = PREFIX + "operator_scrape_failures"
OPERATOR_STATUS_WRITES = PREFIX + "operator_status_writes"
OPERATOR_POD_CHANGES = PREFIX + "operator_pod_changes"
OPERATOR_REPLACEMENTS = PREFIX + "operator_pod_replacements"  # counter, label reason
OPERATOR_API_REQUESTS = PREFIX + "operator_api_requests"
OPERATOR_GENERATORS = PREFIX + "operator_generators"
OPERATOR_LEADER = PREFIX + "operator_leader"


@dataclass
class Sample:
    name: str
    labels: dict[str, str]
    value: float


@dataclass
class Scrape:
    """A parsed /metrics page, queried by metric name and labels."""

    samples: list[Sample] = field(default_factory=list)

    def value(self, name: str, **labels: str) -> float:
        """Sum of every sample called ``name`` whose labels include ``labels`` (0 if none)."""
        return sum(s.value for s in self.select(name, **labels))

    def select(self, name: str, **labels: str) -> Iterable[Sample]:
        for s in self.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                yield s


def parse(text: str) -> Scrape:
    """Parse Prometheus text exposition with prometheus_client's own parser."""
    samples = [
        Sample(s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]
    return Scrape(samples)
