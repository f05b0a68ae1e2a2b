"""Which inference pods to create and delete: a pure plan from the desired count and observed pods.

Pods live in *slots* 0..replicas-1. A slot is up to date when it holds a pod of the current
template hash. The plan, recomputed from scratch on every pass (level-based):

* a slot with no pod at all gets one at once (missing capacity);
* a slot past ``replicas`` loses its pods (scale down);
* a slot whose pod is out of date is rolled one slot at a time: *surge* first, creating the new
  pod beside the old one (the old one keeps serving); once the new one is Ready the old one is
  deleted. When the new pod cannot be scheduled (no free GPU), the old one is deleted first,
  but only while every other desired pod is Ready, so capacity never drops by more than one pod
  (the PodDisruptionBudget's ``maxUnavailable: 1``);
* a pod of the current template whose name is still held by a terminating pod waits for it.

Fault replacement is planned separately (:mod:`.faults`) and bounded there.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from imagefleet.operator.podview import PodView

MAX_SURGE = 1
MAX_UNAVAILABLE = 1


@dataclass(frozen=True)
class Delete:
    pod: PodView
    reason: str
    """CamelCase: ScaleDown, Replaced, Outdated, Duplicate, Faulty."""
    message: str


@dataclass
class Plan:
    create: list[int] = field(default_factory=list)
    """Slots that get a pod of the current template."""
    delete: list[Delete] = field(default_factory=list)
    rolling: bool = False
    """Some slot still holds an out-of-date pod."""

    @property
    def empty(self) -> bool:
        return not self.create and not self.delete


NameFn = Callable[[int], str]
"""The pod name of a slot at the current template."""


def plan(replicas: int, current_hash: str, pods: Iterable[PodView], name_of: NameFn) -> Plan:
    """The creates and deletes that move ``pods`` toward ``replicas`` pods of ``current_hash``."""
    out = Plan()
    pods = list(pods)
    held = {p.name for p in pods if p.terminating}  # a name is free again once its pod is gone
    by_slot: dict[int, list[PodView]] = defaultdict(list)
    for p in pods:
        if p.terminating:
            continue
        if p.slot is None or p.slot >= replicas:
            out.delete.append(Delete(p, "ScaleDown", f"scaled down to {replicas} replicas"))
        else:
            by_slot[p.slot].append(p)

    in_flight: list[tuple[int, PodView]] = []  # slots whose new pod is not Ready yet
    candidates: list[int] = []  # slots still served by an old pod, not being rolled yet
    for slot in range(replicas):
        here = by_slot.get(slot, [])
        new = next((p for p in here if p.template_hash == current_hash), None)
        old = [p for p in here if p.template_hash != current_hash]
        if not here:
            if name_of(slot) not in held:
                out.create.append(slot)
            continue
        if not old:
            continue
        out.rolling = True
        serving = [p for p in old if p.ready]
        if new is not None and new.ready:
            out.delete += [Delete(p, "Replaced", f"replaced by updated pod {new.name}") for p in old]
            continue
        # an out-of-date pod that does not serve holds a GPU for nothing
        out.delete += [Delete(p, "Outdated", "out of date and not ready") for p in old if not p.ready]
        if new is not None:
            in_flight.append((slot, new))
        elif serving:
            candidates.append(slot)
        elif name_of(slot) not in held:
            out.create.append(slot)

    # Surge: start rolling another slot while fewer than MAX_SURGE new pods are on their way.
    for slot in candidates[: max(0, MAX_SURGE - len(in_flight))]:
        if name_of(slot) not in held:
            out.create.append(slot)

    # A surged pod that finds no free GPU: make room by deleting its old pod, one slot at a time
    # and only while every other desired slot serves.
    ready_slots = sum(1 for ps in by_slot.values() if any(p.ready for p in ps))
    unavailable = replicas - ready_slots
    for slot, new in in_flight:
        if not new.unschedulable or unavailable >= MAX_UNAVAILABLE:
            continue
        old_ready = [p for p in by_slot[slot] if p.template_hash != current_hash and p.ready]
        if old_ready:
            out.delete += [
                Delete(p, "Replaced", "making room: no free GPU for its update") for p in old_ready
            ]
            unavailable += 1
    return out
