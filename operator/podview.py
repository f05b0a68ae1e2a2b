"""An inference pod as the operator sees it: the few facts of a Pod object that decisions use.

The operator keeps one :class:`PodView` per pod it owns (from the watch), small enough that a
thousand of them cost little memory; rollout, fault and status decisions read only these.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from imagefleet import wire


def parse_time(text: str | None) -> float | None:
    """An RFC 3339 timestamp from the API as seconds since the epoch."""
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@dataclass(frozen=True)
class PodView:
    name: str
    namespace: str
    uid: str
    generator: str
    slot: int | None
    template_hash: str
    phase: str
    """Kubernetes' pod phase: Pending, Running, Succeeded, Failed, Unknown."""
    ip: str | None
    node: str | None
    created_at: float
    terminating: bool
    ready: bool
    ready_changed_at: float | None
    """When the Ready condition last changed (either way)."""
    started: bool
    """A container has started (the pod is past scheduling, pulling and creating)."""
    restarts: int
    waiting_reason: str | None
    """Why the container waits (CrashLoopBackOff, ImagePullBackOff, ...), if it does."""
    unschedulable: str | None
    """The scheduler's message when it cannot place the pod (e.g. Insufficient nvidia.com/gpu)."""

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.generator)


def pod_view(pod: Mapping[str, Any]) -> PodView | None:
    """The view of a pod (the API's JSON), or None if it is not an inference pod of a generator."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    generator = labels.get(wire.LABEL_GENERATOR)
    if not generator or labels.get(wire.LABEL_COMPONENT) != wire.COMPONENT_POD:
        return None
    status = pod.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    ready = conditions.get("Ready") or {}
    scheduled = conditions.get("PodScheduled") or {}
    containers = status.get("containerStatuses") or []
    waiting = next(
        (c["state"]["waiting"].get("reason") for c in containers if (c.get("state") or {}).get("waiting")),
        None,
    )
    unschedulable = None
    if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        unschedulable = str(scheduled.get("message") or "Unschedulable")
    try:
        slot: int | None = int(labels.get(wire.LABEL_SLOT, ""))
    except ValueError:
        slot = None
    return PodView(
        name=str(meta.get("name", "")),
        namespace=str(meta.get("namespace", "")),
        uid=str(meta.get("uid", "")),
        generator=str(generator),
        slot=slot,
        template_hash=str(labels.get(wire.LABEL_TEMPLATE_HASH, "")),
        phase=str(status.get("phase") or "Pending"),
        ip=status.get("podIP") or None,
        node=(pod.get("spec") or {}).get("nodeName") or None,
        created_at=parse_time(meta.get("creationTimestamp")) or 0.0,
        terminating=bool(meta.get("deletionTimestamp")),
        ready=ready.get("status") == "True",
        ready_changed_at=parse_time(ready.get("lastTransitionTime")),
        started=any((c.get("state") or {}).get("running") for c in containers)
        or any(c.get("restartCount") for c in containers),
        restarts=sum(int(c.get("restartCount") or 0) for c in containers),
        waiting_reason=waiting,
        unschedulable=unschedulable,
    )
