"""The GPU side: run one batch through the pipeline, on the single GPU worker thread.

Everything here blocks and is called through the scheduler's one-thread executor, so the event
loop never waits on torch. A batch:

* gets one ``torch.Generator`` per sample (CPU generators: a seed gives the same image on any
  device and in any batch);
* stops at the next denoising step when its ``stop`` event is set (all its clients left);
* on CUDA out-of-memory is split in halves that run one after the other; a single sample that
  still does not fit fails alone;
* calls the run's step hooks after every denoising step (the fault-injection test hook of
  :mod:`.faults` is one); the worker itself knows nothing of what they do.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from imagefleet.inference_pod.batching import CompatKey, Sample
from imagefleet.inference_pod.models import LoadedModel

log = logging.getLogger(__name__)


class BatchCancelled(Exception):
    """Every request of the batch went away; the pipeline was stopped between steps."""


class BatchFault(Exception):
    """A failure of a whole batch whose cause has a name (``kind``: the errors metric's label).

    Any other exception out of the pipeline counts as kind ``pipeline``.
    """

    kind: ClassVar[str] = "pipeline"
    device: ClassVar[bool] = False
    """The device's fault rather than the request's (see :func:`device_fault`)."""


def error_kind(error: BaseException) -> str:
    """The errors-metric kind of a batch's failure, by its type."""
    return error.kind if isinstance(error, BatchFault) else BatchFault.kind


def device_fault(error: BaseException) -> bool:
    """Whether the device failed (not the request): a CUDA/accelerator error or an injected one.

    Such a batch's requests are answered 503 so that a router retries them on another pod.
    """
    if isinstance(error, BatchFault):
        return error.device
    accelerator = getattr(torch, "AcceleratorError", None)
    return accelerator is not None and isinstance(error, accelerator)


class SampleFailed(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


StepHook = Callable[["BatchRun", int, int], None]
"""Called on the GPU thread after each denoising step: (run, step index, samples in this call)."""


@dataclass
class BatchRun:
    key: CompatKey
    samples: list[Sample]
    stop: threading.Event = field(default_factory=threading.Event)
    steps_total: int = 0
    steps_done: int = 0
    started_at: float = 0.0
    """When the batch loop handed it to the GPU thread (the loop's clock)."""
    hooks: list[StepHook] = field(default_factory=list)


@dataclass
class Outcome:
    """Per-sample images or failures, aligned with ``run.samples``, and what was timed."""

    results: list[Any]
    timings: list[tuple[int, float]] = field(default_factory=list)
    oom_cap: int | None = None
    cancelled: bool = False
    error: BaseException | None = None


RunBatch = Callable[[BatchRun], Outcome]
"""Runs one batch to its outcome (blocking; on the GPU thread)."""


def execute(model: LoadedModel, run: BatchRun) -> Outcome:
    """Run ``run`` (splitting on out-of-memory) and return per-sample results."""
    outcome = Outcome(results=[None] * len(run.samples))
    try:
        _run_split(model, run, list(range(len(run.samples))), outcome)
    except BatchCancelled:
        outcome.cancelled = True
    except Exception as exc:  # a failed batch fails every sample in it
        log.exception("Batch of %d failed", len(run.samples))
        outcome.error = exc
    return outcome


def _run_split(model: LoadedModel, run: BatchRun, indices: list[int], outcome: Outcome) -> None:
    samples = [run.samples[i] for i in indices]
    started = time.perf_counter()
    try:
        images = run_pipeline(model, run, samples)
    except torch.OutOfMemoryError:
        _free_memory()
        outcome.oom_cap = len(indices) // 2 if len(indices) > 1 else 1
        if len(indices) == 1:
            outcome.results[indices[0]] = SampleFailed("oom", "The GPU ran out of memory for this image.")
            return
        half = len(indices) // 2
        log.warning(
            "Out of memory at batch size %d; retrying as %d + %d", len(indices), half, len(indices) - half
        )
        _run_split(model, run, indices[:half], outcome)
        _run_split(model, run, indices[half:], outcome)
        return
    outcome.timings.append((len(indices), time.perf_counter() - started))
    for i, image in zip(indices, images, strict=True):
        outcome.results[i] = image


def run_pipeline(model: LoadedModel, run: BatchRun, samples: list[Sample]) -> list[Any]:
    """One pipeline call for ``samples`` (which share ``run.key``)."""
    key = run.key
    pipe = model.pipeline(key.task)
    run.steps_done = 0
    run.steps_total = key.steps

    def on_step_end(_pipe: Any, step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        run.steps_done = step + 1
        for hook in run.hooks:
            hook(run, step, len(samples))
        if run.stop.is_set():
            raise BatchCancelled()
        return tensors

    kwargs: dict[str, Any] = {
        "prompt": [s.prompt for s in samples],
        "num_inference_steps": key.steps,
        "guidance_scale": key.guidance,
        "generator": [torch.Generator("cpu").manual_seed(s.seed) for s in samples],
        "callback_on_step_end": on_step_end,
        "output_type": "pil",
    }
    if any(s.negative_prompt for s in samples):
        kwargs["negative_prompt"] = [s.negative_prompt or "" for s in samples]
    if key.task == "generate":
        kwargs.update(height=key.height, width=key.width)
    else:
        kwargs["image"] = [s.image for s in samples]
        if key.strength is not None:
            kwargs["strength"] = key.strength
    if key.task == "inpaint":
        kwargs.update(mask_image=[s.mask for s in samples], height=key.height, width=key.width)
    with torch.inference_mode(), model.tier(key.get("tier") or "lossless"):
        result = pipe(**kwargs)
    return list(result.images)


def _free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
