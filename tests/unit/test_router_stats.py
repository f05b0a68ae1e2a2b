"""/stats aggregation: Aquiles-Image's distributed shape, totals summed over pods."""

from __future__ import annotations

from typing import Any

from imagefleet.router.stats import SUMMED, aggregate


def pod(device: str, **counts: Any) -> dict[str, Any]:
    g = {
        "total_requests": 0,
        "total_batches": 0,
        "total_images": 0,
        "queued": 0,
        "active_batches": 0,
        "completed": 0,
        "failed": 0,
        "processing": False,
        **counts,
    }
    return {
        "mode": "single-device",
        "model": "m",
        "ready": True,
        "devices": {
            device: {
                "id": device,
                "available": True,
                "processing": g["processing"],
                "images_completed": 3,
                "avg_batch_time": 1.5,
                "estimated_load": 2.0,
                "error_count": 1,
            }
        },
        "global": g,
    }


def test_devices_are_keyed_by_pod_and_totals_summed() -> None:
    a = pod(
        "cuda:0",
        total_requests=5,
        total_images=7,
        completed=4,
        failed=1,
        queued=2,
        active_batches=1,
        processing=True,
        total_batches=3,
    )
    b = pod("cuda:0", total_requests=2, total_images=2, completed=2, total_batches=2)
    out = aggregate({"pod-a": a, "pod-b": b})
    assert out["mode"] == "distributed"
    assert out["model"] == "m"
    assert set(out["devices"]) == {"pod-a", "pod-b"}
    dev = out["devices"]["pod-a"]
    assert dev["device"] == "cuda:0"
    for field in (
        "available",
        "processing",
        "images_completed",
        "avg_batch_time",
        "estimated_load",
        "error_count",
    ):
        assert field in dev
    for key in SUMMED:
        assert out["global"][key] == a["global"][key] + b["global"][key]
    assert out["global"]["processing"] == 1
    assert out["global"]["backends"] == 2 and out["global"]["available_backends"] == 2


def test_a_pod_that_did_not_answer_is_shown_unavailable() -> None:
    out = aggregate({"a": pod("cpu", total_requests=1), "b": None}, errors={"b": "ClientConnectorError"})
    assert out["devices"]["b"] == {"available": False, "processing": False, "error": "ClientConnectorError"}
    assert out["global"]["total_requests"] == 1
    assert out["global"]["available_backends"] == 1


def test_router_view_is_attached_per_device() -> None:
    out = aggregate({"a": pod("cpu")}, router_view={"a": {"in_flight": 2}})
    assert out["devices"]["a"]["router"] == {"in_flight": 2}


def test_no_backends() -> None:
    out = aggregate({})
    assert out["devices"] == {} and out["global"]["total_requests"] == 0 and out["model"] == []
