"""The GPU side: run one batch through the pipeline, on the single GPU worker thread.

Everything here blocks and is called through the scheduler's one-thread executor, so the event
loop never waits on torch. A batch:

* gets one ``torch.Generator`` per sample (CPU generators: a seed gives the same image on any
  device and in any batch);
* stops at the next denoising step when its ``stop`` event is set (all its clients left);
* on CUDA out-of-memory is split in halves that run one after the other; a single sample that
  still does not fit fails alone;
* on any other error that is not the device's (:func:`device_fault`) is retried sample by sample,
  so that only the sample that fails alone fails (an input the pipeline cannot take must not cost
  its batchmates their images); a device fault fails the whole batch, which is not retried here;
* checks every image for NaNs (a broken device, or a numerically broken step): such a sample
  fails as the device's fault;
* calls the run's step hooks after every denoising step (the fault-injection test hook of
  :mod:`.faults` is one), then its latent hooks with the step's latents (the partial-image tap of
  :mod:`.previews`); the worker itself knows nothing of what they do.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from imagefleet.inference_pod.batching import CompatKey, Sample
from imagefleet.inference_pod.models import LoadedModel
from imagefleet.inference_pod.prompts import negative_kwargs

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


# What CUDA, cuBLAS and cuDNN failures say when torch raises them as a plain RuntimeError.
_DEVICE_MESSAGE = re.compile(r"CUDA error|CUBLAS_STATUS_|CUDNN_STATUS_|cuDNN error")


def device_fault(error: BaseException) -> bool:
    """Whether the device failed (not the request): a CUDA/accelerator error or an injected one.

    Such a batch's requests are answered 503 so that a router retries them on another pod, and
    the failure counts toward quarantine; no other failure does.
    """
    if isinstance(error, BatchFault):
        return error.device
    accelerator = getattr(torch, "AcceleratorError", None)
    if accelerator is not None and isinstance(error, accelerator):
        return True
    return isinstance(error, RuntimeError) and bool(_DEVICE_MESSAGE.search(str(error)))


class SampleFailed(Exception):
    """One sample's failure; the others of its batch are unaffected.

    ``kind``: ``oom`` (out of memory alone), ``nan`` (the image came out as NaNs) or ``pipeline``
    (the pipeline raised on this sample alone). ``device``: the device's fault, not the input's
    (counts toward quarantine). The message is safe to show a client; details are in the log.
    """

    def __init__(self, kind: str, message: str, *, device: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.device = device


StepHook = Callable[["BatchRun", int, int], None]
"""Called on the GPU thread after each denoising step: (run, step index, samples in this call)."""

LatentHook = Callable[["BatchRun", int, int, list[Sample], Any], None]
"""Called on the GPU thread after each denoising step: (run, steps done, steps this call runs (an
edit runs ``strength`` of them), the samples of this call, their latents: one row per sample, or
None where the pipeline passes none)."""


@dataclass
class BatchRun:
    key: CompatKey
    samples: list[Sample]
    stop: threading.Event = field(default_factory=threading.Event)
    steps_total: int = 0
    steps_done: int = 0
    progress: int = 0
    """Denoising steps completed so far, in either batch mode (:class:`.health.StallWatch` reads it)."""
    started_at: float = 0.0
    """When the batch loop handed it to the GPU thread (the loop's clock)."""
    hooks: list[StepHook] = field(default_factory=list)
    latent_hooks: list[LatentHook] = field(default_factory=list)
    session: StepChannel | None = None
    """Set for a step-level batch (:mod:`.stepbatch`): ``samples`` are its first members, and
    samples join and leave it between denoising steps through this channel."""
    stalled: bool = False
    """A test hook stalled a step (:mod:`.faults`): that step's time says nothing about the GPU."""
    log: dict[str, Any] = field(default_factory=dict)
    """Extra fields of its ``/debug/batches`` entry."""


@dataclass
class Left:
    """A sample leaving a step-level batch: its image (PIL), or why it failed."""

    sample: Sample
    result: Any
    steps_done: int


@dataclass
class StepReport:
    """What a step-level batch did since the last exchange (GPU thread to event loop)."""

    left: list[Left]
    outcome: Outcome
    """Timings (a batch size and the time of the key's number of steps at it), an out-of-memory
    cap and retried errors, as a batch's; its ``results`` are unused."""
    steps_run: int
    """Denoising steps the batch has run since it started (its step counter)."""
    size: int
    """Samples in the last transformer call(s) of this step (0 when no step ran)."""
    least_done: int
    """The fewest steps any remaining member has done (0 without members)."""


@dataclass
class Admission:
    """The event loop's answer between two steps: who joins now, who leaves (its request went)."""

    join: list[Sample]
    drop: list[Sample]


class StepChannel(Protocol):
    def exchange(self, report: StepReport) -> Admission | None:
        """Between two denoising steps, on the GPU thread: hand over ``report`` and wait for who
        joins and who is dropped; None ends the batch (no member is left, or the pod stops)."""


@dataclass
class Outcome:
    """Per-sample images or failures, aligned with ``run.samples``, and what was timed.

    ``error``: the whole batch failed (a device fault); ``retried``: the kinds of the errors
    (:func:`error_kind`) of pipeline calls that failed and were retried sample by sample.
    """

    results: list[Any]
    timings: list[tuple[int, float]] = field(default_factory=list)
    oom_cap: int | None = None
    cancelled: bool = False
    error: BaseException | None = None
    retried: list[str] = field(default_factory=list)


RunBatch = Callable[[BatchRun], Outcome]
"""Runs one batch to its outcome (blocking; on the GPU thread)."""


def execute(model: LoadedModel, run: BatchRun) -> Outcome:
    """Run ``run`` (splitting on out-of-memory) and return per-sample results."""
    outcome = Outcome(results=[None] * len(run.samples))
    try:
        _run_split(model, run, list(range(len(run.samples))), outcome)
    except BatchCancelled:
        outcome.cancelled = True
    except Exception as exc:  # a device fault fails every sample of the batch (the caller logs it)
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
            log.error("Out of memory for one sample alone (request %s)", samples[0].job_id)
            outcome.results[indices[0]] = SampleFailed(
                "oom", "The GPU ran out of memory for this image.", device=True
            )
            return
        half = len(indices) // 2
        log.warning(
            "Out of memory at batch size %d; retrying as %d + %d", len(indices), half, len(indices) - half
        )
        _run_split(model, run, indices[:half], outcome)
        _run_split(model, run, indices[half:], outcome)
        return
    except BatchCancelled:
        raise
    except Exception as exc:
        if device_fault(exc):
            raise
        outcome.retried.append(error_kind(exc))
        if len(indices) == 1:
            log.exception("The pipeline failed on one sample alone (request %s)", samples[0].job_id)
            failed = SampleFailed("pipeline", GENERIC_FAILURE)
            failed.__cause__ = exc  # for the log's readers and the warm-up's report, never a client
            outcome.results[indices[0]] = failed
            return
        log.warning(
            "A batch of %d failed (%s: %s); retrying its samples one by one (requests %s)",
            len(indices),
            type(exc).__name__,
            exc,
            _requests(samples),
        )
        for i in indices:
            _run_split(model, run, [i], outcome)
        return
    outcome.timings.append((len(indices), time.perf_counter() - started))
    for i, sample, image in zip(indices, samples, images, strict=True):
        outcome.results[i] = image_result(sample, image)


def image_result(sample: Sample, image: Any) -> Any:
    """A sample's image out of the pipeline as its result: a PIL image, or a NaN failure (the
    device's). ``image`` is one of :func:`pixels` (8-bit, or ``None`` for NaNs), a float array of
    ``"np"`` output, or an image the pipeline made itself."""
    if image is None or (isinstance(image, np.ndarray) and image.dtype.kind == "f" and np.isnan(image).any()):
        log.error("The pipeline made NaNs for request %s (sample %d)", sample.job_id, sample.index)
        return SampleFailed("nan", "The GPU produced an invalid image.", device=True)
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    return VaeImageProcessor.numpy_to_pil(image)[0] if isinstance(image, np.ndarray) else image


def pixels(images: Any) -> list[Any]:
    """The pipeline's ``"pt"`` output, (batch, channels, height, width) in [0, 1] on its device, as
    8-bit (height, width, channels) arrays, ``None`` for a sample holding a NaN.

    Converted where the images are: on a GPU, the GPU thread copies 1 byte per pixel and channel to
    the host instead of converting floats on the CPU (tens of milliseconds per 1024x1024 image)
    while the GPU waits. The arithmetic is diffusers' ``numpy_to_pil`` (float32, times 255, rounded
    half to even), so the pixels are the ones ``"pil"`` output would give. Anything else (a pipeline
    that ignores ``output_type``) is passed on as it is.
    """
    if not isinstance(images, torch.Tensor):
        return list(images)
    floats = images.float()
    nan = torch.isnan(floats).flatten(1).any(dim=1).tolist()
    eight_bit = (floats * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
    return [None if bad else image for bad, image in zip(nan, eight_bit, strict=True)]


GENERIC_FAILURE = "The image could not be generated: internal error."
"""What a client hears of a failure inside the pipeline; the details go to the log."""


def _requests(samples: list[Sample]) -> str:
    return ", ".join(dict.fromkeys(s.job_id for s in samples))


def run_pipeline(model: LoadedModel, run: BatchRun, samples: list[Sample]) -> list[Any]:
    """One pipeline call for ``samples`` (which share ``run.key``)."""
    key = run.key
    pipe = model.pipeline(key.task)
    run.steps_done = 0
    run.steps_total = key.steps

    def on_step_end(pipe_: Any, step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        run.steps_done = step + 1
        run.progress += 1
        for hook in run.hooks:
            hook(run, step, len(samples))
        if run.latent_hooks:
            runs = int(getattr(pipe_, "_num_timesteps", None) or key.steps)
            for latent_hook in run.latent_hooks:
                latent_hook(run, step + 1, runs, samples, tensors.get("latents"))
        if run.stop.is_set():
            raise BatchCancelled()
        return tensors

    kwargs: dict[str, Any] = {
        "prompt": [s.prompt for s in samples],
        "num_inference_steps": key.steps,
        "guidance_scale": key.guidance,
        "generator": [torch.Generator("cpu").manual_seed(s.seed) for s in samples],
        "callback_on_step_end": on_step_end,
        "output_type": "pt",  # made 8-bit on the device: pixels()
    }
    kwargs.update(
        negative_kwargs([s.negative_prompt for s in samples], model.empty_negative, pipe, key.guidance > 1)
    )
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
        return pixels(result.images)


def _free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
