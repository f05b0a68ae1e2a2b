"""``GET /stats`` on the router: every pod's ``/stats`` folded into Aquiles-Image's distributed shape.

Aquiles-Image users know ``{"mode": "distributed", "devices": {...}, "global": {...}}``. Here a
device is a pod, keyed by its backend name (pod name, or URL in local mode); it carries the pod's
own device fields (available, processing, images_completed, avg_batch_time, estimated_load,
error_count, ...) plus ``router``: what this router sees of it (expected wait, requests in flight,
ejected). ``global`` sums the pods' global counters; ``processing`` counts the pods that are.
A pod that did not answer appears with ``available: false`` and the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SUMMED = (
    "total_requests",
    "total_batches",
    "total_images",
    "queued",
    "active_batches",
    "completed",
    "failed",
)


def device_entry(pod_stats: Mapping[str, Any] | None, error: str | None = None) -> dict[str, Any]:
    """One pod's device fields (a pod serves one device)."""
    if pod_stats is None:
        return {"available": False, "processing": False, "error": error or "no answer"}
    devices = pod_stats.get("devices") or {}
    name, fields = next(iter(devices.items()), ("unknown", {}))
    entry: dict[str, Any] = {"device": name, **(fields if isinstance(fields, Mapping) else {})}
    entry["model"] = pod_stats.get("model")
    entry["ready"] = bool(pod_stats.get("ready"))
    return entry


def aggregate(
    pods: Mapping[str, Mapping[str, Any] | None],
    router_view: Mapping[str, Mapping[str, Any]] | None = None,
    errors: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The router's ``/stats`` from each backend's ``/stats`` (None where it did not answer)."""
    devices: dict[str, Any] = {}
    totals: dict[str, Any] = {k: 0 for k in SUMMED}
    totals["processing"] = 0
    models = set()
    for name, stats in pods.items():
        entry = device_entry(stats, (errors or {}).get(name))
        if router_view and name in router_view:
            entry["router"] = dict(router_view[name])
        devices[name] = entry
        if stats is None:
            continue
        if stats.get("model"):
            models.add(str(stats["model"]))
        pod_global = stats.get("global") or {}
        for key in SUMMED:
            value = pod_global.get(key, 0)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                totals[key] += value
        totals["processing"] += 1 if pod_global.get("processing") else 0
    totals["backends"] = len(pods)
    totals["available_backends"] = sum(1 for d in devices.values() if d.get("available"))
    return {
        "mode": "distributed",
        "model": next(iter(models)) if len(models) == 1 else sorted(models),
        "devices": devices,
        "global": totals,
    }
