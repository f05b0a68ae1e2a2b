"""Step-level (continuous) batching on the GPU thread, for flow-matching pipelines (SD3 family).

A request-level batch runs all its denoising steps in one ``pipe(...)`` call. A step-level batch
is a running set of samples of one compatibility key, each at its own step, that share one
transformer call per step; between steps samples join (the batch loop admits them through the
run's :class:`~.worker.StepChannel`) and leave (finished, failed, or their request went away). It
runs the pipeline's own parts in the pipeline's own order, so a sample's image does not depend
on who shares its batch or when it joined:

* **joining**: ``pipe.encode_prompt`` once for all samples that join at that step, and each
  sample's initial latents from its own CPU generator seeded with its seed, through
  ``pipe.prepare_latents`` (as the pipeline does for a list of generators);
* **a step**: one transformer call for every member, the timestep a ``(b,)`` tensor of each
  member's own timestep, classifier-free guidance doubling the batch as the pipeline does
  (unconditional half first); then each member's Euler update ``x += (sigma_next - sigma) * v``
  with the scheduler's own arithmetic (float32 sample, the sigma difference as a 0-d tensor on
  the schedule's device, cast back to the model's dtype). The schedule (timesteps and sigmas) is
  a copy of the pipeline's scheduler set for the key's steps exactly as ``pipe(...)`` sets it
  (shift, and ``mu`` where the scheduler shifts by resolution);
* **leaving**: the VAE decode of the members that finished at that step, as the pipeline's output
  path does (``latents / scaling_factor + shift_factor``, ``vae.decode``,
  ``image_processor.postprocess`` to ``"np"``), then the worker's NaN check.

Failures keep the worker's policy, per call: out of memory splits the call in halves (and later
steps use calls of at most half the size that failed); any other error that is not the device's
retries the call sample by sample, so a sample whose input fails fails alone and its batchmates
go on; a device fault ends the batch (every member fails, as a request-level batch would). The
run's step hooks run after every transformer call (``(run, batch step, samples in the call)``,
the batch step counted from the batch's start) and its latent hooks once per member and step,
with that member's own steps done and its own latents row.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
    calculate_shift,
    retrieve_timesteps,
)

from imagefleet.inference_pod import worker
from imagefleet.inference_pod.batching import CompatKey, Sample
from imagefleet.inference_pod.models import LoadedModel
from imagefleet.inference_pod.prompts import EmptyNegative, negative_kwargs
from imagefleet.inference_pod.worker import (
    GENERIC_FAILURE,
    BatchRun,
    Left,
    Outcome,
    SampleFailed,
    StepReport,
    device_fault,
    error_kind,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

MAX_SEQUENCE_LENGTH = 256
"""The T5 prompt length ``pipe(...)`` uses by default (the worker passes none)."""


def supports(pipe: Any) -> bool:
    """Whether step-level batching reproduces ``pipe(...)`` for this pipeline: SD3's text-to-image
    pipeline with a deterministic flow-matching Euler scheduler."""
    scheduler = getattr(pipe, "scheduler", None)
    return (
        isinstance(pipe, StableDiffusion3Pipeline)
        and isinstance(scheduler, FlowMatchEulerDiscreteScheduler)
        and not scheduler.config.get("stochastic_sampling", False)
    )


def stepwise_keys(model: LoadedModel) -> Callable[[CompatKey], bool] | None:
    """Which keys the served model runs step-level: text-to-image of the lossless tier (the fast
    tier's step cache assumes one schedule for the whole call); None when the model cannot."""
    if not supports(model.text2img):
        return None

    def stepwise(key: CompatKey) -> bool:
        return key.task == "generate" and (key.get("tier") or "lossless") != "fast"

    return stepwise


def execute(model: LoadedModel, run: BatchRun) -> Outcome:
    """Run ``run``: step-level when it carries a session, else as a request-level batch."""
    if run.session is None:
        return worker.execute(model, run)
    return run_steps(model, run)


@dataclass(frozen=True)
class Schedule:
    """A key's timesteps and sigmas (one more sigma than steps, ending at 0), on the device."""

    timesteps: torch.Tensor
    sigmas: torch.Tensor


def schedule_of(pipe: Any, key: CompatKey, device: torch.device) -> Schedule:
    """The schedule ``pipe(...)`` would set for ``key``: its own scheduler, copied (with any
    shift set on it), set for the key's steps at the key's resolution."""
    scheduler = copy.deepcopy(pipe.scheduler)
    kwargs: dict[str, Any] = {}
    config = scheduler.config
    if config.get("use_dynamic_shifting", None):
        patch = pipe.transformer.config.patch_size
        height, width = key.height // pipe.vae_scale_factor, key.width // pipe.vae_scale_factor
        kwargs["mu"] = calculate_shift(
            (height // patch) * (width // patch),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.16),
        )
    timesteps, _ = retrieve_timesteps(scheduler, key.steps, device, sigmas=None, **kwargs)
    return Schedule(timesteps, scheduler.sigmas)


def euler_update(
    latents: torch.Tensor, velocity: torch.Tensor, sigmas: torch.Tensor, index: int
) -> torch.Tensor:
    """One sample's flow-matching Euler step from step ``index``, with the arithmetic of
    ``FlowMatchEulerDiscreteScheduler.step`` (deterministic sampling)."""
    dt = sigmas[index + 1] - sigmas[index]
    return (latents.to(torch.float32) + dt * velocity).to(velocity.dtype)


@dataclass(eq=False)
class Member:
    """A sample in the running batch: its latents, its prompt's embeddings, its steps done."""

    sample: Sample
    latents: torch.Tensor
    """(1, channels, height / 8, width / 8)"""
    embeds: torch.Tensor
    pooled: torch.Tensor
    negative_embeds: torch.Tensor | None
    negative_pooled: torch.Tensor | None
    steps_done: int = 0


class StepBatch:
    """The running batch of one key on the GPU thread (used by one thread at a time)."""

    def __init__(self, pipe: Any, key: CompatKey, empty_negative: EmptyNegative | None = None) -> None:
        self.pipe = pipe
        self.key = key
        self.empty_negative = empty_negative
        """The empty negative prompt's embeddings, encoded once per model (:mod:`.prompts`)."""
        self.device = pipe._execution_device
        self.guided = key.guidance > 1  # the pipeline's do_classifier_free_guidance
        self.schedule = schedule_of(pipe, key, self.device)
        self.members: list[Member] = []
        self.steps_run = 0
        self.call_cap: int | None = None
        """The largest transformer call after an out-of-memory (None: all members in one)."""

    # --- joining and leaving ---

    def join(self, samples: Sequence[Sample], outcome: Outcome) -> list[Left]:
        """Encode ``samples`` and add them; those that fail to join leave at once."""
        left: list[Left] = []
        for sample, result in zip(samples, guarded(list(samples), self._encode, outcome), strict=True):
            if isinstance(result, SampleFailed):
                left.append(Left(sample, result, 0))
            else:
                self.members.append(result)
        return left

    def drop(self, samples: Sequence[Sample]) -> None:
        """Remove ``samples`` (their requests went away) before the next step."""
        gone = {s.id for s in samples}
        self.members = [m for m in self.members if m.sample.id not in gone]

    def _encode(self, samples: list[Sample]) -> list[Member]:
        pipe = self.pipe
        negatives = negative_kwargs(
            [s.negative_prompt for s in samples], self.empty_negative, pipe, self.guided
        )
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=[s.prompt for s in samples],
            prompt_2=None,
            prompt_3=None,
            **negatives,
            do_classifier_free_guidance=self.guided,
            device=self.device,
            clip_skip=None,
            num_images_per_prompt=1,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
        members = []
        for i, sample in enumerate(samples):
            latents = pipe.prepare_latents(
                1,
                pipe.transformer.config.in_channels,
                self.key.height,
                self.key.width,
                embeds.dtype,
                self.device,
                [torch.Generator("cpu").manual_seed(sample.seed)],
            )
            row = slice(i, i + 1)
            members.append(
                Member(
                    sample,
                    latents,
                    embeds[row],
                    pooled[row],
                    negative[row] if self.guided else None,
                    negative_pooled[row] if self.guided else None,
                )
            )
        return members

    # --- one step ---

    def step(self, run: BatchRun, outcome: Outcome) -> list[Left]:
        """One denoising step for every member; returns those that leave (finished or failed)."""
        members = self.members
        size = self.call_cap or len(members)
        updated: list[torch.Tensor | SampleFailed] = []
        for start in range(0, len(members), size):
            chunk = members[start : start + size]
            updated += guarded(chunk, lambda ms: self._advance(run, ms), outcome)
            if outcome.oom_cap is not None:
                self.call_cap = min(self.call_cap or len(members), outcome.oom_cap)
        self.steps_run += 1
        left: list[Left] = []
        kept: list[Member] = []
        for member, result in zip(members, updated, strict=True):
            if isinstance(result, SampleFailed):
                left.append(Left(member.sample, result, member.steps_done))
                continue
            member.latents = result
            member.steps_done += 1
            kept.append(member)
        for member in kept:
            for hook in run.latent_hooks:
                hook(run, member.steps_done, self.key.steps, [member.sample], member.latents)
        finished = [m for m in kept if m.steps_done >= self.key.steps]
        self.members = [m for m in kept if m.steps_done < self.key.steps]
        if finished:
            images = guarded(finished, self._decode, outcome)
            for member, image in zip(finished, images, strict=True):
                result = (
                    image if isinstance(image, SampleFailed) else worker.image_result(member.sample, image)
                )
                left.append(Left(member.sample, result, member.steps_done))
        return left

    def _advance(self, run: BatchRun, members: list[Member]) -> list[torch.Tensor]:
        """The transformer call and Euler updates for ``members`` (nothing changed until all
        succeeded, the step hooks included)."""
        latents = torch.cat([m.latents for m in members])
        # views of the schedule stacked on its device: indexing with a list would copy an index
        # from the host and wait for the device every step
        timestep = torch.stack([self.schedule.timesteps[m.steps_done] for m in members])
        embeds = torch.cat([m.embeds for m in members])
        pooled = torch.cat([m.pooled for m in members])
        if self.guided:
            latents_in = torch.cat([latents, latents])
            timestep = torch.cat([timestep, timestep])
            embeds = torch.cat(
                [*(m.negative_embeds for m in members if m.negative_embeds is not None), embeds]
            )
            pooled = torch.cat(
                [*(m.negative_pooled for m in members if m.negative_pooled is not None), pooled]
            )
        else:
            latents_in = latents
        velocity = self.pipe.transformer(
            hidden_states=latents_in,
            timestep=timestep,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            joint_attention_kwargs=None,
            return_dict=False,
        )[0]
        if self.guided:
            unconditional, conditional = velocity.chunk(2)
            velocity = unconditional + self.key.guidance * (conditional - unconditional)
        updated = [
            euler_update(m.latents, velocity[i : i + 1], self.schedule.sigmas, m.steps_done)
            for i, m in enumerate(members)
        ]
        run.progress += 1
        for hook in run.hooks:
            hook(run, self.steps_run, len(members))
        return updated

    def _decode(self, members: list[Member]) -> list[Any]:
        vae = self.pipe.vae
        latents = torch.cat([m.latents for m in members])
        latents = (latents / vae.config.scaling_factor) + vae.config.shift_factor
        image = vae.decode(latents, return_dict=False)[0]
        return list(self.pipe.image_processor.postprocess(image, output_type="np"))


def guarded(
    items: list[T], call: Callable[[list[T]], Sequence[R]], outcome: Outcome
) -> list[R | SampleFailed]:
    """``call(items)`` (one result per item) under the worker's failure policy: out of memory
    splits the call in halves (``outcome.oom_cap``), a single item still out of memory fails
    alone; another error that is not the device's is retried item by item (``outcome.retried``),
    and an item that fails alone fails alone. A device fault propagates."""
    if not items:
        return []
    results: list[R | SampleFailed] = []
    try:
        results += call(items)
        return results
    except torch.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(items) // 2
        outcome.oom_cap = min(outcome.oom_cap or len(items), max(half, 1))
        if len(items) == 1:
            log.error("Out of memory for one sample alone in a step-level batch")
            return [SampleFailed("oom", "The GPU ran out of memory for this image.", device=True)]
        log.warning(
            "Out of memory at %d samples in a step-level batch; retrying as %d + %d",
            len(items),
            half,
            len(items) - half,
        )
        return guarded(items[:half], call, outcome) + guarded(items[half:], call, outcome)
    except Exception as exc:
        if device_fault(exc):
            raise
        outcome.retried.append(error_kind(exc))
        if len(items) == 1:
            log.exception("A step-level batch failed on one sample alone")
            return [SampleFailed("pipeline", GENERIC_FAILURE)]
        log.warning(
            "A step-level call of %d failed (%s: %s); retrying its samples one by one",
            len(items),
            type(exc).__name__,
            exc,
        )
        for item in items:
            results += guarded([item], call, outcome)
        return results


class StepMeter:
    """Step times by batch size, turned into batch timings: once a size has run the key's
    number of steps, (size, their summed time) is what a request-level batch of that size would
    have measured (its encode and decode included, as they run between the same steps).

    A step's time is the GPU thread's wall time from one exchange to the next. Nothing
    synchronises the device in between except a decode, so on CUDA a step's kernels may still
    run after its time was taken; over a size's run of steps that evens out to within about a
    step."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self._sums: dict[int, tuple[int, float]] = {}

    def add(self, size: int, seconds: float, timings: list[tuple[int, float]]) -> None:
        count, total = self._sums.get(size, (0, 0.0))
        count, total = count + 1, total + seconds
        if count >= self.steps:
            timings.append((size, total))
            count, total = 0, 0.0
        self._sums[size] = (count, total)


def run_steps(model: LoadedModel, run: BatchRun) -> Outcome:
    """Run a step-level batch until it drains (or its session ends); returns what is left to
    account for: a device fault in ``error``, and timings not yet handed over."""
    assert run.session is not None
    outcome = Outcome(results=[])
    pending: list[Sample] = list(run.samples)
    meter = StepMeter(run.key.steps)
    try:
        with torch.inference_mode():
            batch = StepBatch(model.pipeline("generate"), run.key, model.empty_negative)
            while True:
                started = time.perf_counter()
                left = batch.join(pending, outcome) if pending else []
                size = len(batch.members)
                if size:
                    left += batch.step(run, outcome)
                    if run.stalled:
                        run.stalled = False
                    else:
                        meter.add(size, time.perf_counter() - started, outcome.timings)
                least = min((m.steps_done for m in batch.members), default=0)
                report = StepReport(left, outcome, batch.steps_run, size, least)
                outcome = Outcome(results=[])
                admission = run.session.exchange(report)
                if admission is None:
                    break
                batch.drop(admission.drop)
                pending = admission.join
                if not batch.members and not pending:
                    break
    except Exception as exc:  # a device fault fails every member (the batch loop logs it)
        outcome.error = exc
    return outcome
