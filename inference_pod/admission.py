"""Admission: whether the pod takes a request, judged by the GPU time it costs, not by its images.

Ten 2048x2048 images at 150 steps are not worth ten 512x512 ones at 4 steps, so the pod prices a
request in estimated GPU-seconds (its learned batch costs, :mod:`.costs`; a conservative prior
before anything was measured) and checks, in this order:

1. the request alone: beyond ``max_request_gpu_seconds`` it is refused with 400
   (``request_too_expensive``); it would hold the GPU that long wherever it ran, so the message
   gives the estimate, the ceiling and what to lower;
2. queued images: beyond ``max_queued_images`` waiting samples, 429 (``queue_full``), Retry-After
   the estimated time until enough images have left the queue for this request's to fit (what
   remains of the running batch plus that share of the queued work);
3. queued work: when the GPU-seconds already queued plus this request's would pass
   ``max_queued_gpu_seconds``, 429 (``queue_full``), Retry-After the estimated time until it
   fits (what remains of the running batch plus the excess: the queue drains one GPU-second per
   second).

Pure: plain numbers in, an error (or None) out.
"""

from __future__ import annotations

from dataclasses import dataclass

from imagefleet.errors import APIError, InvalidRequest, Overloaded


@dataclass(frozen=True)
class Bounds:
    max_request_gpu_seconds: float
    max_queued_gpu_seconds: float
    max_queued_images: int


@dataclass(frozen=True)
class Load:
    """What the pod holds when a request arrives."""

    queued_samples: int
    queued_seconds: float
    running_remaining_seconds: float

    @property
    def expected_wait_seconds(self) -> float:
        return self.queued_seconds + self.running_remaining_seconds


def check(bounds: Bounds, load: Load, *, n: int, cost: float, what: str, measured: bool) -> APIError | None:
    """The refusal of a request for ``n`` images estimated at ``cost`` GPU-seconds (None: admit).

    ``what`` describes the request for the message ("10 images of 2048x2048 at 150 steps");
    ``measured`` says whether the estimate comes from timed batches or from the prior.
    """
    if cost > bounds.max_request_gpu_seconds:
        basis = "" if measured else ", priced before any batch was timed"
        return InvalidRequest(
            f"This request ({what}) needs about {cost:.0f} s of GPU time{basis}; this server takes "
            f"at most {bounds.max_request_gpu_seconds:.0f} s per request. Ask for fewer images, "
            "fewer steps or a smaller size.",
            code="request_too_expensive",
        )
    if load.queued_samples + n > bounds.max_queued_images:
        # until enough of the queue has drained for these n images to fit, not until all of it
        excess = load.queued_samples + n - bounds.max_queued_images
        share = min(1.0, excess / max(1, load.queued_samples))
        wait = load.running_remaining_seconds + load.queued_seconds * share
        return Overloaded(
            f"The queue is full ({load.queued_samples} images waiting); retry in about {wait:.0f} s.",
            retry_after=max(1.0, wait),
        )
    if load.queued_seconds + cost > bounds.max_queued_gpu_seconds:
        wait = load.running_remaining_seconds + load.queued_seconds + cost - bounds.max_queued_gpu_seconds
        return Overloaded(
            f"The queue holds about {load.queued_seconds:.0f} s of GPU work and this request "
            f"({what}) adds about {cost:.0f} s, beyond this server's bound of "
            f"{bounds.max_queued_gpu_seconds:.0f} s; retry in about {max(1.0, wait):.0f} s.",
            retry_after=max(1.0, wait),
        )
    return None
