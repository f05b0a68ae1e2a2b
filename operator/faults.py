"""Which inference pods are faulty, which to replace now, and what to report: pure decisions.

A pod is *replaced* (deleted; the rollout then recreates its slot) when replacing it can help:

* it reports itself quarantined (repeated GPU failures: ``imagefleet_pod_quarantined``);
* its share of failed images over the last status interval passes ``health.maxErrorRate``
  (with at least :data:`MIN_FINISHED` images finished in that interval);
* it was Ready and has stayed unready for ``health.unreadyTimeoutSeconds``;
* it never became Ready within ``health.startupTimeoutSeconds`` (plus a minute of slack).

At most ``max_replacements`` pods of a generator are being replaced at once (pods still
terminating count), so a fault that hits every pod at once cannot empty the generator.

A pod is only *reported* (the Degraded condition, never replaced in a loop) when a replacement
would fail the same way: a crash-looping container (the same image and arguments crash again),
an image that cannot be pulled, or a pod the scheduler cannot place (no free GPU).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from imagefleet.operator.podview import PodView
from imagefleet.operator.scrape import PodMetrics
from imagefleet.operator.spec import Health

MIN_FINISHED = 4
STARTUP_SLACK_S = 60.0
IMAGE_ERRORS = frozenset(("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"))


@dataclass(frozen=True)
class Replacement:
    pod: PodView
    reason: str
    """CamelCase: Quarantined, ErrorRate, Unready, NeverReady."""
    message: str


@dataclass(frozen=True)
class Problem:
    """Something wrong that replacing pods would not fix: reported in the Degraded condition."""

    reason: str
    """CamelCase: CrashLoop, ImagePullError, InsufficientGPU, Unschedulable."""
    pod: str
    message: str


@dataclass
class Verdict:
    replace: list[Replacement] = field(default_factory=list)
    waiting: list[Replacement] = field(default_factory=list)
    """Faulty pods left for a later pass by the replacement bound."""
    problems: list[Problem] = field(default_factory=list)


def error_rate(now: PodMetrics, before: PodMetrics | None) -> tuple[float, int]:
    """Failed share of the images finished since ``before`` (counters reset: since start)."""
    done, failed = now.completed, now.failed
    if before is not None and before.completed <= done and before.failed <= failed:
        done, failed = done - before.completed, failed - before.failed
    finished = done + failed
    return (failed / finished if finished else 0.0), finished


def judge(
    pods: Sequence[PodView],
    metrics: Mapping[str, PodMetrics | None],
    previous: Mapping[str, PodMetrics],
    ever_ready: set[str],
    health: Health,
    *,
    now: float,
    gpu_resource: str,
    crash_loop_restarts: int,
    max_replacements: int,
) -> Verdict:
    """Decide about ``pods`` (``ever_ready``: uids seen Ready by this operator)."""
    out = Verdict()
    faulty: list[Replacement] = []
    for p in pods:
        if p.terminating:
            continue
        problem = _problem(p, gpu_resource, crash_loop_restarts)
        if problem is not None:
            out.problems.append(problem)
            continue
        fault = _fault(p, metrics.get(p.name), previous.get(p.name), ever_ready, health, now)
        if fault is not None:
            faulty.append(fault)
    busy = sum(1 for p in pods if p.terminating)
    room = max(0, max_replacements - busy)
    out.replace, out.waiting = faulty[:room], faulty[room:]
    return out


def _problem(p: PodView, gpu_resource: str, crash_loop_restarts: int) -> Problem | None:
    if p.unschedulable:
        reason = "InsufficientGPU" if f"Insufficient {gpu_resource}" in p.unschedulable else "Unschedulable"
        return Problem(reason, p.name, p.unschedulable)
    if p.waiting_reason in IMAGE_ERRORS:
        return Problem("ImagePullError", p.name, f"{p.waiting_reason}: cannot pull the image")
    if not p.ready and (p.waiting_reason == "CrashLoopBackOff" or p.restarts >= crash_loop_restarts):
        return Problem("CrashLoop", p.name, f"container restarted {p.restarts} times")
    return None


def _fault(
    p: PodView,
    now_metrics: PodMetrics | None,
    before: PodMetrics | None,
    ever_ready: set[str],
    health: Health,
    now: float,
) -> Replacement | None:
    if now_metrics is not None and now_metrics.quarantined:
        return Replacement(p, "Quarantined", f"pod {p.name} quarantined itself after repeated GPU failures")
    if now_metrics is not None:
        rate, finished = error_rate(now_metrics, before)
        if finished >= MIN_FINISHED and rate > health.max_error_rate:
            return Replacement(
                p,
                "ErrorRate",
                f"pod {p.name} failed {rate:.0%} of {finished} images (threshold {health.max_error_rate:.0%})",
            )
    if p.ready:
        return None
    if p.uid in ever_ready:
        since = p.ready_changed_at or p.created_at
        if now - since > health.unready_timeout_s:
            return Replacement(p, "Unready", f"pod {p.name} has been unready for {now - since:.0f} s")
        return None
    if p.phase != "Pending" or p.started:
        age = now - p.created_at
        if age > health.startup_timeout_s + STARTUP_SLACK_S:
            return Replacement(p, "NeverReady", f"pod {p.name} did not become ready in {age:.0f} s")
    return None
