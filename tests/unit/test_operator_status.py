"""Status: counts, pod entries and conditions that follow the Kubernetes conventions."""

from __future__ import annotations

from typing import Any

from imagefleet.operator import status
from imagefleet.operator.faults import Problem
from tests.unit.test_operator_faults import metrics
from tests.unit.test_operator_rollout import NEW, OLD, pod


def observe(pods, m=None, **kw: Any) -> status.Observation:  # type: ignore[no-untyped-def]
    base: dict[str, Any] = dict(
        generation=3,
        replicas=2,
        current_hash=NEW,
        pods=pods,
        metrics=m or {},
        selector="a=b",
        router_endpoint="http://g-router.ns.svc/v1",
        router_replicas=1,
        router_ready=1,
        images_per_minute=12.5,
    )
    base.update(kw)
    return status.Observation(**base)


def cond(st: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in st["conditions"] if c["type"] == type_)


def test_a_settled_generator_is_ready_and_not_progressing() -> None:
    pods = [pod(0), pod(1)]
    m = {
        p.name: metrics(queued=3, queued_seconds=4.5, completed=10, batches=5, batch_seconds=2.5)
        for p in pods
    }
    st = status.build(observe(pods, m), {}, now=1000.0)
    assert (st["replicas"], st["readyReplicas"], st["updatedReplicas"]) == (2, 2, 2)
    assert (st["queued"], st["queuedSeconds"], st["imagesCompleted"]) == (6, 9.0, 20)
    assert st["observedGeneration"] == 3 and st["selector"] == "a=b"
    assert cond(st, "Ready")["status"] == "True" and cond(st, "Ready")["reason"] == "AllReplicasReady"
    assert cond(st, "Progressing")["status"] == "False"
    assert cond(st, "Degraded")["status"] == "False"
    entry = st["pods"][0]
    assert entry["avgBatchSeconds"] == 0.5 and entry["phase"] == "Ready" and entry["completed"] == 10
    assert all(c["observedGeneration"] == 3 for c in st["conditions"])


def test_transition_times_are_kept_while_a_condition_holds() -> None:
    first = status.build(observe([pod(0), pod(1)]), {}, now=1000.0)
    again = status.build(observe([pod(0), pod(1)]), first, now=2000.0)
    assert cond(again, "Ready")["lastTransitionTime"] == cond(first, "Ready")["lastTransitionTime"]
    assert not status.changed(again, first) or again["imagesPerMinute"] != first["imagesPerMinute"]
    down = status.build(observe([pod(0), pod(1, ready=False)]), again, now=3000.0)
    assert cond(down, "Ready")["status"] == "False"
    assert cond(down, "Ready")["lastTransitionTime"] == status.timestamp(3000.0)


def test_a_rollout_is_progressing_and_still_ready_while_old_pods_serve() -> None:
    st = status.build(observe([pod(0, OLD), pod(1, OLD), pod(0, NEW, ready=False)]), {}, now=1.0)
    assert cond(st, "Progressing")["reason"] == "RollingOut"
    assert cond(st, "Ready")["status"] == "True"
    assert st["updatedReplicas"] == 1


def test_gpu_starvation_is_degraded_with_the_schedulers_words() -> None:
    problem = Problem("InsufficientGPU", "g-new-1", "0/2 nodes are available: 2 Insufficient nvidia.com/gpu.")
    st = status.build(
        observe([pod(0), pod(1, ready=False, phase="Pending", started=False)], problems=[problem]),
        {},
        now=1.0,
    )
    degraded = cond(st, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "InsufficientGPU"
    assert "Insufficient nvidia.com/gpu" in degraded["message"] and "1 pod(s)" in degraded["message"]
    assert cond(st, "Ready")["reason"] == "ReplicasNotReady"
    assert st["pods"][1]["phase"] == "Pending"


def test_an_invalid_spec_says_why_in_every_condition() -> None:
    st = status.build(observe([], invalid="spec.defaults.size: not a multiple of 8"), {}, now=1.0)
    assert {c["reason"] for c in st["conditions"]} == {"InvalidSpec"}
    assert "spec.defaults.size" in cond(st, "Ready")["message"]


def test_images_per_minute_counts_only_pods_seen_twice_and_survives_restarts() -> None:
    assert status.images_per_minute({"a": 30, "b": 5}, {"a": 10}, 60.0) == 20.0
    assert status.images_per_minute({"a": 4}, {"a": 10}, 30.0) == 8.0  # counter reset: 4 since
