"""What the pod says about itself: the load report, ``/stats``, the state gauges and ``/v1/models``.

All of them read the one phase (:meth:`.state.PodRuntime.phase`), the scheduler's snapshot and
the one counters object, so they always agree with each other.

``/stats`` keeps the field names of Aquiles-Image's distributed mode (``devices`` keyed by
device, ``global`` totals) so dashboards and scripts written for it keep working;
``estimated_load`` here is the pod's expected wait in seconds of queued and running GPU work.
"""

from __future__ import annotations

from typing import Any

from imagefleet import metrics as m
from imagefleet.inference_pod.phase import PodPhase
from imagefleet.inference_pod.state import PodRuntime, Serving
from imagefleet.inference_pod.telemetry import Gauges
from imagefleet.loadreport import LoadReport


def load_report(rt: PodRuntime) -> LoadReport:
    phase = rt.phase()
    status = rt.status
    if not isinstance(status, Serving):
        return LoadReport(
            model=rt.settings.model,
            ready=False,
            phase=phase.value,
            max_batch_size=rt.settings.max_batch_size,
            instance_id=rt.settings.instance_id,
        )
    snap = status.scheduler.snapshot()
    width, height = status.defaults.size
    return LoadReport(
        model=status.model.info.id,
        ready=phase is PodPhase.SERVING,
        quarantined=phase is PodPhase.QUARANTINED,
        phase=phase.value,
        draining=phase is PodPhase.DRAINING,
        queued_requests=snap.queued_requests,
        queued_samples=snap.queued_samples,
        running_samples=snap.running_samples,
        queued_seconds=snap.queued_seconds,
        running_remaining_seconds=snap.running_remaining_seconds,
        unit_seconds=snap.unit_seconds,
        max_batch_size=rt.settings.max_batch_size,
        default_steps=status.defaults.steps,
        default_width=width,
        default_height=height,
        completed_images=rt.counters.images[m.OUTCOME_COMPLETED],
        limits=status.limits.to_json(),
        instance_id=rt.settings.instance_id,
    )


def gauges(rt: PodRuntime) -> Gauges:
    phase = rt.phase()
    status = rt.status
    if not isinstance(status, Serving):
        return Gauges()
    snap = status.scheduler.snapshot()
    return Gauges(
        queued_samples=snap.queued_samples,
        queued_requests=snap.queued_requests,
        queued_seconds=snap.expected_wait_seconds,
        running_samples=snap.running_samples,
        quarantined=float(phase is PodPhase.QUARANTINED),
        ready=float(phase is PodPhase.SERVING),
        cached_steps=float(status.model.step_cache.cached_steps if status.model.step_cache else 0),
    )


def model_labels(rt: PodRuntime) -> dict[str, str] | None:
    """The labels of the model-info metric (None until the model has loaded)."""
    if not isinstance(rt.status, Serving):
        return None
    info = rt.status.model.info
    return {
        "model": info.id,
        "family": info.family,
        "random_weights": str(info.random_weights).lower(),
        "device": info.device,
        "dtype": info.dtype,
        "tiers": ",".join(rt.status.limits.tiers),
        "compiled": str(rt.status.model.acceleration.compiled_blocks > 0).lower(),
    }


def model_entry(rt: PodRuntime) -> dict[str, Any]:
    """The served model as ``GET /v1/models`` lists it."""
    entry: dict[str, Any] = {
        "id": rt.settings.model,
        "object": "model",
        "created": int(rt.started_at),
        "owned_by": "imagefleet",
    }
    if isinstance(rt.status, Serving):
        info, defaults = rt.status.model.info, rt.status.defaults
        entry.update(
            random_weights=info.random_weights,
            family=info.family,
            source=info.source,
            default_size=f"{defaults.size[0]}x{defaults.size[1]}",
            default_steps=defaults.steps,
            default_guidance_scale=defaults.guidance,
            size_multiple=info.size_multiple,
            tiers=list(rt.status.limits.tiers),
            acceleration={**rt.status.model.acceleration.to_json(), "warmup_s": round(rt.status.warmup_s, 1)},
        )
    return entry


def pod_stats(rt: PodRuntime) -> dict[str, Any]:
    c = rt.counters
    status = rt.status
    if not isinstance(status, Serving):
        return {
            "mode": "single-device",
            "model": rt.settings.model,
            "ready": False,
            "devices": {"unknown": {"id": "unknown", "available": False, "processing": False}},
            "global": {
                "total_requests": c.requests_accepted,
                "queued": 0,
                "completed": c.requests_completed,
                "failed": c.requests_failed,
            },
        }
    device = status.model.info.device
    phase = rt.phase()
    ready = phase is PodPhase.SERVING
    snap = status.scheduler.snapshot()
    running = snap.running_samples
    return {
        "mode": "single-device",
        "model": status.model.info.id,
        "ready": ready,
        "quarantined": phase is PodPhase.QUARANTINED,
        "devices": {
            device: {
                "id": device,
                "available": ready and not running,
                "processing": bool(running),
                "can_accept_batch": ready,
                "batch_size": running,
                "max_batch_size": rt.settings.max_batch_size,
                "images_processing": running,
                "images_completed": c.images[m.OUTCOME_COMPLETED],
                "total_batches_processed": c.batch_seconds.count,
                "avg_batch_time": round(c.batch_seconds.mean, 4),
                "estimated_load": round(snap.expected_wait_seconds, 3),
                "error_count": c.failed_batches,
                "last_error": snap.last_error,
            }
        },
        "global": {
            "total_requests": c.requests_accepted,
            "total_batches": c.batch_seconds.count,
            "total_images": c.images[m.OUTCOME_COMPLETED],
            "queued": snap.queued_samples,
            "active_batches": 1 if running else 0,
            "completed": c.requests_completed,
            "failed": c.requests_failed,
            "processing": bool(running),
        },
    }
