"""Fault decisions: what is replaced (bounded), what is only reported."""

from __future__ import annotations

import dataclasses

from imagefleet.operator import faults
from imagefleet.operator.scrape import PodMetrics
from imagefleet.operator.spec import Health
from tests.unit.test_operator_rollout import pod

HEALTH = Health(startup_timeout_s=600, unready_timeout_s=120, max_error_rate=0.5)
NOW = 10_000.0


def metrics(**kw: object) -> PodMetrics:
    base = PodMetrics(
        queued=0,
        queued_seconds=0.0,
        running=0,
        quarantined=False,
        ready=True,
        completed=0,
        failed=0,
        batches=0,
        batch_seconds=0.0,
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def judge(pods, m=None, previous=None, ever_ready=None, max_replacements=1):  # type: ignore[no-untyped-def]
    return faults.judge(
        pods,
        m or {},
        previous or {},
        ever_ready or set(),
        HEALTH,
        now=NOW,
        gpu_resource="nvidia.com/gpu",
        crash_loop_restarts=3,
        max_replacements=max_replacements,
    )


def test_a_quarantined_pod_is_replaced() -> None:
    p = pod(0, ready=False)
    v = judge([p], {p.name: metrics(quarantined=True, ready=False)})
    assert [(r.pod.name, r.reason) for r in v.replace] == [(p.name, "Quarantined")]


def test_an_error_rate_over_the_threshold_in_the_last_interval_is_replaced() -> None:
    p = pod(0)
    before = metrics(completed=100, failed=0)
    now = metrics(completed=102, failed=6)
    v = judge([p], {p.name: now}, {p.name: before})
    assert [r.reason for r in v.replace] == ["ErrorRate"]
    # the same totals, but old failures only: nothing new failed in this interval
    v = judge([p], {p.name: metrics(completed=110, failed=6)}, {p.name: now})
    assert not v.replace


def test_too_few_images_are_no_evidence() -> None:
    p = pod(0)
    assert not judge([p], {p.name: metrics(completed=1, failed=2)}).replace


def test_a_pod_that_was_ready_and_stays_unready_is_replaced_after_the_timeout() -> None:
    p = pod(0, ready=False, ready_changed_at=NOW - 60)
    assert not judge([p], ever_ready={p.uid}).replace
    late = dataclasses.replace(p, ready_changed_at=NOW - 121)
    assert [r.reason for r in judge([late], ever_ready={p.uid}).replace] == ["Unready"]


def test_a_pod_that_never_becomes_ready_is_replaced_after_the_startup_budget() -> None:
    young = pod(0, ready=False, created_at=NOW - 300)
    assert not judge([young]).replace
    old = dataclasses.replace(young, created_at=NOW - 700)
    assert [r.reason for r in judge([old]).replace] == ["NeverReady"]


def test_replacements_are_bounded_and_terminating_pods_count() -> None:
    pods = [pod(i, ready=False) for i in range(3)]
    m = {p.name: metrics(quarantined=True) for p in pods}
    v = judge(pods, m, max_replacements=2)
    assert len(v.replace) == 2 and len(v.waiting) == 1
    busy = [*pods, pod(9, "old", terminating=True, ready=False)]
    v = judge(busy, m, max_replacements=2)
    assert len(v.replace) == 1


def test_crash_loops_and_missing_gpus_are_reported_not_replaced() -> None:
    looping = pod(0, ready=False, waiting_reason="CrashLoopBackOff", restarts=5)
    starving = pod(
        1,
        ready=False,
        phase="Pending",
        started=False,
        unschedulable="0/2 nodes are available: 2 Insufficient nvidia.com/gpu.",
    )
    pulling = pod(2, ready=False, waiting_reason="ImagePullBackOff")
    v = judge([looping, starving, pulling], {looping.name: metrics(quarantined=True)})
    assert not v.replace
    assert sorted(p.reason for p in v.problems) == ["CrashLoop", "ImagePullError", "InsufficientGPU"]
