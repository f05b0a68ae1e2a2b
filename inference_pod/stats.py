"""``GET /stats``: the JSON that Aquiles-Image users know, for one pod (one device).

Field names follow Aquiles-Image's distributed mode (``devices`` keyed by device, ``global``
totals) so dashboards and scripts written for it keep working; ``estimated_load`` here is the
pod's expected wait in seconds of queued and running GPU work.
"""

from __future__ import annotations

from typing import Any

from imagefleet.inference_pod.state import PodRuntime


def pod_stats(rt: PodRuntime) -> dict[str, Any]:
    s = rt.scheduler
    device = rt.model.info.device if rt.model else "unknown"
    if s is None:
        return {
            "mode": "single-device",
            "model": rt.settings.model,
            "ready": False,
            "devices": {device: {"id": device, "available": False, "processing": False}},
            "global": {"total_requests": 0, "queued": 0, "completed": 0, "failed": 0},
        }
    c = s.counters
    running = s.running
    avg = c.batch_seconds_total / c.total_batches if c.total_batches else 0.0
    return {
        "mode": "single-device",
        "model": s.model_id,
        "ready": rt.ready,
        "quarantined": s.health.quarantined,
        "devices": {
            device: {
                "id": device,
                "available": rt.ready and running is None,
                "processing": running is not None,
                "can_accept_batch": rt.ready,
                "batch_size": len(running.samples) if running else 0,
                "max_batch_size": rt.settings.max_batch_size,
                "images_processing": len(running.samples) if running else 0,
                "images_completed": c.images_completed,
                "total_batches_processed": c.total_batches,
                "avg_batch_time": round(avg, 4),
                "estimated_load": round(s.expected_wait_seconds(), 3),
                "error_count": s.health.error_count,
                "last_error": s.health.last_error,
            }
        },
        "global": {
            "total_requests": c.total_requests,
            "total_batches": c.total_batches,
            "total_images": c.images_completed,
            "queued": len(s.queue),
            "active_batches": 1 if running else 0,
            "completed": c.completed_requests,
            "failed": c.failed_requests,
            "processing": running is not None,
        },
    }
