"""``GET /v1/fleet``: what this router knows of every pod, for the fleet page and for people.

Everything comes from the router's own memory, so the endpoint is cheap enough to poll every
second: each pod's last load report (state, queued images and GPU-seconds, running batch,
images completed), the router's health view of it (ejected, consecutive failures, report age,
requests in flight) and the router's counters (attempts at the pod by outcome: its picks and its
errors). No pod is called.

A pod's *state* is, in this order: ``unreachable`` (ejected after failures, or never answered),
``quarantined``, ``draining``, ``ready``, else ``loading`` (answering but not ready yet).

On Kubernetes ``generator`` carries the ImageGenerator's conditions when the router may read
the resource, else why not (:mod:`.generator`); the rest never depends on it.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import Metric

from imagefleet.router import telemetry as t
from imagefleet.router.loadview import BackendView
from imagefleet.router.state import RouterRuntime

UNREACHABLE = "unreachable"
QUARANTINED = "quarantined"
DRAINING = "draining"
READY = "ready"
LOADING = "loading"
STATES = (READY, LOADING, DRAINING, QUARANTINED, UNREACHABLE)

ERROR_OUTCOMES = frozenset((t.SERVER_ERROR, t.UNAVAILABLE, t.UNREACHABLE, t.TIMEOUT))
"""Attempts that count as a pod's errors (429 ``overloaded`` and client errors do not)."""


def state_of(view: BackendView) -> str:
    report = view.report
    if view.health.ejected or report is None:
        return UNREACHABLE
    if report.quarantined:
        return QUARANTINED
    if report.draining:
        return DRAINING
    return READY if report.ready else LOADING


def attempts_by_backend(families: Iterable[Metric]) -> dict[str, dict[str, int]]:
    """``{backend: {outcome: attempts}}`` from the collected router-requests counter."""
    found: dict[str, dict[str, int]] = defaultdict(dict)
    for family in families:
        for sample in family.samples:
            if sample.name.endswith("_total"):
                backend, outcome = sample.labels.get("backend"), sample.labels.get("outcome")
                if backend is not None and outcome is not None:
                    found[backend][outcome] = int(sample.value)
    return found


def pod_entry(
    view: BackendView, outcomes: Mapping[str, int], fallback_unit_s: float, now: float
) -> dict[str, Any]:
    report = view.report
    return {
        "name": view.name,
        "url": view.backend.url,
        "state": state_of(view),
        "accepting": view.accepting,
        "queued_images": report.queued_samples if report else 0,
        "queued_requests": report.queued_requests if report else 0,
        "queued_seconds": round(report.queued_seconds, 3) if report else 0.0,
        "running_images": report.running_samples if report else 0,
        "running_remaining_seconds": round(report.running_remaining_seconds, 3) if report else 0.0,
        "expected_wait_seconds": round(view.expected_wait(fallback_unit_s), 3),
        "completed_images": report.completed_images if report else 0,
        "max_batch_size": report.max_batch_size if report else None,
        "model": report.model if report else None,
        "in_flight": len(view.inflight),
        "picks": sum(outcomes.values()),
        "errors": sum(v for k, v in outcomes.items() if k in ERROR_OUTCOMES),
        "outcomes": dict(sorted(outcomes.items())),
        "ejected": view.health.ejected,
        "consecutive_failures": view.health.failures,
        "report_age_seconds": round(now - view.report_at, 3) if report is not None else None,
    }


def fleet(
    rt: RouterRuntime,
    *,
    generator: Mapping[str, Any] | None = None,
    now: float | None = None,
    wall: float | None = None,
) -> dict[str, Any]:
    """The body of ``GET /v1/fleet``; ``generator`` is what is known of the ImageGenerator."""
    now = time.monotonic() if now is None else now
    fallback = rt.view.fallback_unit_seconds()
    attempts = attempts_by_backend(rt.metrics.requests.collect())
    pods = [pod_entry(v, attempts.get(v.name, {}), fallback, now) for v in rt.view.views.values()]
    retries = {
        s.labels["reason"]: int(s.value)
        for family in rt.metrics.retries.collect()
        for s in family.samples
        if s.name.endswith("_total")
    }
    settings = rt.settings
    body: dict[str, Any] = {
        "object": "fleet",
        "created": int(time.time() if wall is None else wall),
        "models": sorted({p["model"] for p in pods if p["model"]}),
        "discovery": settings.discovery,
        "pick": settings.pick,
        "pods": pods,
        "totals": {
            "pods": len(pods),
            **{state: sum(1 for p in pods if p["state"] == state) for state in STATES},
            "queued_images": sum(p["queued_images"] for p in pods),
            "queued_seconds": round(sum(p["queued_seconds"] for p in pods), 3),
            "running_images": sum(p["running_images"] for p in pods),
            "completed_images": sum(p["completed_images"] for p in pods),
            "picks": sum(p["picks"] for p in pods),
            "errors": sum(p["errors"] for p in pods),
            "retries": sum(retries.values()),
        },
        "retries": retries,
        "generator": dict(generator) if generator is not None else None,
    }
    return body
