"""An ImageGenerator's status: counts, per-pod entries and conditions, computed from observations.

Conditions follow the Kubernetes API conventions (``type``, ``status``, ``reason`` in CamelCase,
``message``, ``lastTransitionTime`` kept while the status stays the same, ``observedGeneration``):

* ``Ready``: every desired pod is Ready and a router pod is Ready; requests are served at full
  capacity. Reasons: AllReplicasReady, ReplicasNotReady, RouterNotReady, ScaledToZero, InvalidSpec.
* ``Progressing``: pods are being created, rolled to a new template, scaled, or are loading.
  Reasons: RollingOut, Scaling, PodsStarting; False with reason Complete when nothing moves.
* ``Degraded``: something needs attention that the operator cannot fix by itself (no free GPU,
  a crash-looping container, an image that cannot be pulled, faulty pods being replaced, an
  invalid spec). Reason of the first problem; False with reason AsExpected.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from imagefleet.operator.faults import Problem, Replacement
from imagefleet.operator.podview import PodView
from imagefleet.operator.scrape import PodMetrics

MAX_MESSAGE = 1024
MAX_POD_ENTRIES = 100
"""The status lists at most this many pods (the first by name); the counts cover all."""


def timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Observation:
    """Everything one status pass saw."""

    generation: int
    replicas: int
    current_hash: str
    pods: Sequence[PodView]
    metrics: Mapping[str, PodMetrics | None]
    selector: str
    router_endpoint: str
    router_replicas: int
    router_ready: int
    images_per_minute: float
    problems: Sequence[Problem] = ()
    replacing: Sequence[Replacement] = ()
    invalid: str | None = None
    desired_replicas: int | None = None
    last_scale_time: str | None = None


def pod_phase(p: PodView, metrics: PodMetrics | None, problems: Mapping[str, Problem]) -> str:
    if p.terminating:
        return "Terminating"
    if metrics is not None and metrics.quarantined:
        return "Quarantined"
    problem = problems.get(p.name)
    if problem is not None and problem.reason == "CrashLoop":
        return "CrashLooping"
    if p.phase in ("Failed", "Succeeded"):
        return "Failed"
    if p.ready:
        return "Ready"
    if p.phase == "Pending" and not p.started:
        return "Pending"
    return "Loading"


def pod_entry(p: PodView, metrics: PodMetrics | None, current_hash: str, phase: str) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": p.name,
        "phase": phase,
        "ready": p.ready,
        "updated": p.template_hash == current_hash,
        "restarts": p.restarts,
    }
    if p.node:
        entry["node"] = p.node
    if metrics is not None:
        entry.update(
            queued=metrics.queued,
            completed=metrics.completed,
            errors=metrics.failed,
            avgBatchSeconds=round(metrics.avg_batch_seconds, 4),
            estimatedLoad=round(metrics.queued_seconds, 3),
        )
    return entry


def _condition(type_: str, ok: bool, reason: str, message: str, generation: int) -> dict[str, Any]:
    return {
        "type": type_,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message[:MAX_MESSAGE],
        "observedGeneration": generation,
    }


def conditions(o: Observation) -> list[dict[str, Any]]:
    """Ready, Progressing and Degraded (without lastTransitionTime: see :func:`carry_times`)."""
    live = [p for p in o.pods if not p.terminating]
    ready = sum(1 for p in live if p.ready)
    updated = sum(1 for p in live if p.template_hash == o.current_hash)
    g = o.generation
    if o.invalid is not None:
        return [
            _condition("Ready", False, "InvalidSpec", o.invalid, g),
            _condition("Progressing", False, "InvalidSpec", "the spec cannot be served", g),
            _condition("Degraded", True, "InvalidSpec", o.invalid, g),
        ]
    if o.replicas == 0:
        ready_c = _condition("Ready", False, "ScaledToZero", "replicas is 0", g)
    elif ready < o.replicas:
        ready_c = _condition(
            "Ready", False, "ReplicasNotReady", f"{ready}/{o.replicas} inference pods ready", g
        )
    elif o.router_replicas > 0 and o.router_ready == 0:
        ready_c = _condition("Ready", False, "RouterNotReady", "no router pod is ready", g)
    else:
        ready_c = _condition(
            "Ready", True, "AllReplicasReady", f"{ready}/{o.replicas} inference pods ready", g
        )

    old = sum(1 for p in live if p.template_hash != o.current_hash)
    if old:
        progressing = _condition(
            "Progressing", True, "RollingOut", f"{updated}/{o.replicas} pods updated, {old} out of date", g
        )
    elif len(live) != o.replicas:
        progressing = _condition("Progressing", True, "Scaling", f"{len(live)} pods, want {o.replicas}", g)
    elif ready < len(live) or any(p.terminating for p in o.pods):
        progressing = _condition(
            "Progressing", True, "PodsStarting", f"{len(live) - ready} pods starting or stopping", g
        )
    else:
        progressing = _condition("Progressing", False, "Complete", f"{ready} pods ready and up to date", g)

    if o.problems:
        first = o.problems[0]
        same = [p for p in o.problems if p.reason == first.reason]
        message = f"{len(same)} pod(s) {_problem_words(first.reason, first.message)}"
        others = sorted({p.reason for p in o.problems} - {first.reason})
        if others:
            message += f"; also {', '.join(others)}"
        degraded = _condition("Degraded", True, first.reason, message, g)
    elif o.replacing:
        r = o.replacing[0]
        degraded = _condition("Degraded", True, "ReplacingPods", f"{r.reason}: {r.message}", g)
    else:
        degraded = _condition("Degraded", False, "AsExpected", "no problem seen", g)
    return [ready_c, progressing, degraded]


def _problem_words(reason: str, message: str) -> str:
    if reason == "InsufficientGPU":
        return f"wait for a free GPU (Pending): {message}"
    if reason == "Unschedulable":
        return f"cannot be scheduled: {message}"
    if reason == "CrashLoop":
        return f"crash-looping: {message}; see kubectl logs (not replaced: a new pod would do the same)"
    return f"{reason}: {message}"


def carry_times(
    new: list[dict[str, Any]], old: Sequence[Mapping[str, Any]], now: float
) -> list[dict[str, Any]]:
    """Set lastTransitionTime: kept from ``old`` when a condition's status did not change."""
    before = {c.get("type"): c for c in old}
    out = []
    for c in new:
        prev = before.get(c["type"])
        kept = prev.get("lastTransitionTime") if prev and prev.get("status") == c["status"] else None
        out.append({**c, "lastTransitionTime": kept or timestamp(now)})
    return out


def build(o: Observation, previous: Mapping[str, Any], now: float) -> dict[str, Any]:
    """The whole status object to write (compare with the current one before patching)."""
    live = [p for p in o.pods if not p.terminating]
    problems = {p.pod: p for p in o.problems}
    entries = []
    for p in sorted(o.pods, key=lambda v: v.name)[:MAX_POD_ENTRIES]:
        m = o.metrics.get(p.name)
        entries.append(pod_entry(p, m, o.current_hash, pod_phase(p, m, problems)))
    scraped = [m for m in (o.metrics.get(p.name) for p in live) if m is not None]
    status: dict[str, Any] = {
        "observedGeneration": o.generation,
        "replicas": len(live),
        "readyReplicas": sum(1 for p in live if p.ready),
        "updatedReplicas": sum(1 for p in live if p.template_hash == o.current_hash),
        "selector": o.selector,
        "queued": sum(m.queued for m in scraped),
        "queuedSeconds": round(sum(m.queued_seconds for m in scraped), 3),
        "imagesCompleted": sum(m.completed for m in scraped),
        "imagesPerMinute": round(o.images_per_minute, 2),
        "pods": entries,
        "routerEndpoint": o.router_endpoint,
        "routerReadyReplicas": o.router_ready,
        "conditions": carry_times(conditions(o), previous.get("conditions") or [], now),
    }
    if o.desired_replicas is not None:
        status["desiredReplicas"] = o.desired_replicas
    if o.last_scale_time is not None:
        status["lastScaleTime"] = o.last_scale_time
    elif previous.get("lastScaleTime"):
        status["lastScaleTime"] = previous["lastScaleTime"]
    return status


def changed(new: Mapping[str, Any], old: Mapping[str, Any]) -> bool:
    """Whether writing ``new`` would change anything a reader sees."""
    return any(new.get(k) != old.get(k) for k in set(new) | set(old))


def images_per_minute(now_counts: Mapping[str, int], before: Mapping[str, int], seconds: float) -> float:
    """Completed images per minute between two scrapes of the same pods (by uid).

    A pod seen only once adds nothing; a counter that went down (the pod restarted) counts from 0.
    """
    if seconds <= 0:
        return 0.0
    done = 0
    for uid, count in now_counts.items():
        if uid in before:
            done += count - before[uid] if count >= before[uid] else count
    return done * 60.0 / seconds
