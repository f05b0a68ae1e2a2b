"""Admission on its own: a request's estimated GPU time against the ceiling and the queue's bounds."""

from __future__ import annotations

from imagefleet.errors import InvalidRequest, Overloaded
from imagefleet.inference_pod.admission import Bounds, Load, check

BOUNDS = Bounds(max_request_gpu_seconds=300.0, max_queued_gpu_seconds=480.0, max_queued_images=64)
IDLE = Load(queued_samples=0, queued_seconds=0.0, running_remaining_seconds=0.0)
WHAT = "10 images of 2048x2048 at 150 steps"


def test_a_request_under_every_bound_is_admitted() -> None:
    assert check(BOUNDS, IDLE, n=10, cost=300.0, what=WHAT, measured=True) is None


def test_a_request_over_the_ceiling_is_refused_with_400_whatever_the_queue() -> None:
    error = check(BOUNDS, IDLE, n=10, cost=912.4, what=WHAT, measured=True)
    assert isinstance(error, InvalidRequest) and error.status == 400
    assert error.code == "request_too_expensive"
    assert f"({WHAT}) needs about 912 s of GPU time;" in error.message
    assert "at most 300 s per request" in error.message and "fewer images" in error.message
    prior = check(BOUNDS, IDLE, n=10, cost=912.4, what=WHAT, measured=False)
    assert prior is not None and "priced before any batch was timed" in prior.message


def test_the_image_count_bound_still_holds() -> None:
    load = Load(queued_samples=60, queued_seconds=60.0, running_remaining_seconds=2.0)
    error = check(BOUNDS, load, n=5, cost=1.0, what=WHAT, measured=True)
    assert isinstance(error, Overloaded) and error.status == 429 and error.code == "queue_full"
    assert "60 images waiting" in error.message
    assert check(BOUNDS, load, n=4, cost=1.0, what=WHAT, measured=True) is None


def test_retry_after_on_a_full_queue_is_the_time_until_the_request_fits() -> None:
    """One image too many waits for one queued image's share, not for the whole queue."""
    load = Load(queued_samples=60, queued_seconds=60.0, running_remaining_seconds=2.0)
    one_over = check(BOUNDS, load, n=5, cost=1.0, what=WHAT, measured=True)
    assert isinstance(one_over, Overloaded) and one_over.headers["Retry-After"] == "3"  # 2 + 60 * 1/60
    all_over = check(BOUNDS, load, n=64, cost=1.0, what=WHAT, measured=True)
    assert isinstance(all_over, Overloaded) and all_over.headers["Retry-After"] == "62"  # the whole queue


def test_queued_gpu_time_over_the_bound_is_429_retry_after_the_time_until_it_fits() -> None:
    load = Load(queued_samples=3, queued_seconds=400.0, running_remaining_seconds=20.0)
    error = check(BOUNDS, load, n=1, cost=100.0, what=WHAT, measured=True)
    assert isinstance(error, Overloaded) and error.status == 429 and error.code == "queue_full"
    assert error.headers["Retry-After"] == "40"  # 20 s of the running batch + 20 s of excess
    assert "about 400 s of GPU work" in error.message and "bound of 480 s" in error.message
    assert check(BOUNDS, load, n=1, cost=80.0, what=WHAT, measured=True) is None  # exactly fits


def test_the_queue_bound_never_refuses_a_request_on_an_idle_pod() -> None:
    busy = Load(queued_samples=0, queued_seconds=0.0, running_remaining_seconds=250.0)
    assert check(BOUNDS, busy, n=10, cost=300.0, what=WHAT, measured=True) is None
