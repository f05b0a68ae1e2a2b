"""The GPU side: run one batch through the pipeline, on the single GPU worker thread.

Everything here blocks and is called through the scheduler's one-thread executor, so the event
loop never waits on torch. A batch:

* gets one ``torch.Generator`` per sample (CPU generators: a seed gives the same image on any
  device and in any batch);
* stops at the next denoising step when its ``stop`` event is set (all its clients left);
* on CUDA out-of-memory is split in halves that run one after the other; a single sample that
  still does not fit fails alone.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from imagefleet.inference_pod.batching import CompatKey, Sample
from imagefleet.inference_pod.models import LoadedModel

log = logging.getLogger(__name__)


class BatchCancelled(Exception):
    """Every request of the batch went away; the pipeline was stopped between steps."""


class InjectedFault(RuntimeError):
    """A failure asked for through the fault-injection test hook."""


class SampleFailed(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class BatchRun:
    key: CompatKey
    samples: list[Sample]
    stop: threading.Event = field(default_factory=threading.Event)
    steps_total: int = 0
    steps_done: int = 0
    started_at: float = 0.0
    stalled: bool = False  # an injected stall: its timing says nothing about the GPU


@dataclass
class Outcome:
    """Per-sample images or failures, aligned with ``run.samples``, and what was timed."""

    results: list[Any]
    timings: list[tuple[int, float]] = field(default_factory=list)
    oom_cap: int | None = None
    cancelled: bool = False
    error: BaseException | None = None


@dataclass(frozen=True)
class Fault:
    kind: str  # "runtime": the pipeline raises; "oom": CUDA out-of-memory; "stall": a slow step
    min_batch: int = 1
    seconds: float = 0.0


class FaultPlan:
    """The fault-injection test hook: the next ``count`` batches of at least ``min_batch``
    samples fail (``runtime``, ``oom``) or stall for ``seconds`` at their first step (``stall``)."""

    KINDS = ("runtime", "oom", "stall")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[Fault] = []

    def arm(self, kind: str, count: int, min_batch: int = 1, seconds: float = 0.0) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {', '.join(self.KINDS)}")
        with self._lock:
            self._pending.extend([Fault(kind, min_batch, seconds)] * count)

    def clear(self) -> None:
        with self._lock:
            self._pending.clear()

    def take(self, batch_size: int) -> Fault | None:
        with self._lock:
            for i, fault in enumerate(self._pending):
                if batch_size >= fault.min_batch:
                    del self._pending[i]
                    return fault
        return None


def execute(model: LoadedModel, run: BatchRun, faults: FaultPlan | None = None) -> Outcome:
    """Run ``run`` (splitting on out-of-memory) and return per-sample results."""
    outcome = Outcome(results=[None] * len(run.samples))
    run.started_at = time.monotonic()
    try:
        _run_split(model, run, list(range(len(run.samples))), outcome, faults)
    except BatchCancelled:
        outcome.cancelled = True
    except Exception as exc:  # a failed batch fails every sample in it
        log.exception("Batch of %d failed", len(run.samples))
        outcome.error = exc
    return outcome


def _run_split(
    model: LoadedModel, run: BatchRun, indices: list[int], outcome: Outcome, faults: FaultPlan | None
) -> None:
    samples = [run.samples[i] for i in indices]
    started = time.perf_counter()
    try:
        images = run_pipeline(model, run, samples, faults)
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
        _run_split(model, run, indices[:half], outcome, faults)
        _run_split(model, run, indices[half:], outcome, faults)
        return
    if not run.stalled:
        outcome.timings.append((len(indices), time.perf_counter() - started))
    for i, image in zip(indices, images, strict=True):
        outcome.results[i] = image


def run_pipeline(
    model: LoadedModel, run: BatchRun, samples: list[Sample], faults: FaultPlan | None
) -> list[Any]:
    """One pipeline call for ``samples`` (which share ``run.key``)."""
    key = run.key
    pipe = model.pipeline(key.task)
    fault = faults.take(len(samples)) if faults else None
    run.steps_done = 0
    run.steps_total = key.steps

    def on_step_end(_pipe: Any, step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        run.steps_done = step + 1
        if fault is not None and step == 0:
            if fault.kind == "stall":
                run.stalled = True
                run.stop.wait(fault.seconds)
            elif fault.kind == "oom":
                raise torch.OutOfMemoryError("injected out-of-memory")
            else:
                raise InjectedFault("injected pipeline fault")
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
    with torch.inference_mode():
        result = pipe(**kwargs)
    return list(result.images)


def _free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
