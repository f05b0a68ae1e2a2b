"""The step-level batch on the GPU side, with the SD3-shaped tiny pipeline on the CPU.

It must make what ``pipe(...)`` makes: the schedule and the Euler update are the scheduler's own,
a sample alone gives ``pipe(...)``'s image bit for bit, and a sample's image does not depend on
who shares its batch or when it joined. That last holds to within 2 levels of 255 rather than
bit for bit: CPU float32 matrix products are not bit-identical across batch sizes (the kernels
block by matrix size), which leaves the images about 1e-6 apart in [0, 1].
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from imagefleet.inference_pod import faults, stepbatch, synthetic
from imagefleet.inference_pod.batching import CompatKey, Sample
from imagefleet.inference_pod.prompts import EmptyNegative
from imagefleet.inference_pod.worker import Admission, BatchRun, Left, Outcome, SampleFailed

STEPS = 6
KEY = CompatKey.of("generate", size=(64, 64), steps=STEPS, guidance=4.5)


@pytest.fixture(scope="module")
def pipe() -> Iterator[Any]:
    pipeline = synthetic.build("sd3-tiny", "cpu", torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    yield pipeline


def sample(seed: int, prompt: str = "a fox") -> Sample:
    return Sample(KEY, f"job{seed}", 0, prompt, None, seed, 0.0)


def stock(pipe: Any, prompts: list[str], seeds: list[int], guidance: float = 4.5) -> np.ndarray:
    with torch.inference_mode():
        images = pipe(
            prompt=prompts,
            num_inference_steps=STEPS,
            guidance_scale=guidance,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            output_type="np",
            height=64,
            width=64,
        ).images
    return np.asarray(images)


def run_plan(
    pipe: Any,
    joins: dict[int, list[Sample]],
    *,
    key: CompatKey = KEY,
    drops: dict[int, list[Sample]] | None = None,
    run: BatchRun | None = None,
    empty_negative: EmptyNegative | None = None,
) -> dict[int, tuple[Any, int]]:
    """Run a step-level batch: ``joins[k]`` join before batch step k, ``drops[k]`` leave
    before it. Returns each leaving sample's (result, batch step it left after) by seed."""
    run = run or BatchRun(key, [])
    outcome = Outcome(results=[])
    left: dict[int, tuple[Any, int]] = {}
    with torch.inference_mode():
        batch = stepbatch.StepBatch(pipe, key, empty_negative)
        step = 0
        while step <= max(joins) or batch.members:
            batch.drop((drops or {}).get(step, []))
            for item in batch.join(joins.get(step, []), outcome):
                left[item.sample.seed] = (item.result, step)
            if batch.members:
                for item in batch.step(run, outcome):
                    left[item.sample.seed] = (item.result, step + 1)
            step += 1
    return left


def pixels(image: Any) -> np.ndarray:
    return np.asarray(image).astype(int)


def close(a: Any, b: Any) -> bool:
    return bool(np.abs(pixels(a) - pixels(b)).max() <= 2)


def test_the_schedule_is_the_pipelines_own(pipe: Any) -> None:
    schedule = stepbatch.schedule_of(pipe, KEY, torch.device("cpu"))
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(STEPS, device="cpu")
    assert torch.equal(schedule.timesteps, scheduler.timesteps) and torch.equal(
        schedule.sigmas, scheduler.sigmas
    )
    assert schedule.sigmas[-1] == 0 and len(schedule.sigmas) == STEPS + 1


def test_a_resolution_shifted_schedule_gets_the_pipelines_mu(pipe: Any) -> None:
    shifted = copy.copy(pipe)
    shifted.scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    small = stepbatch.schedule_of(shifted, KEY, torch.device("cpu"))
    large_key = CompatKey.of("generate", size=(512, 512), steps=STEPS, guidance=4.5)
    large = stepbatch.schedule_of(shifted, large_key, torch.device("cpu"))
    assert not torch.equal(small.sigmas, large.sigmas)  # more tokens shift the schedule further


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_euler_update_is_the_schedulers_step(pipe: Any, dtype: torch.dtype) -> None:
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(STEPS, device="cpu")
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 8, 8, generator=generator).to(dtype)
    velocity = torch.randn(1, 16, 8, 8, generator=generator).to(dtype)
    for index, timestep in enumerate(scheduler.timesteps):
        expected = scheduler.step(velocity, timestep, latents, return_dict=False)[0]
        mine = stepbatch.euler_update(latents, velocity, scheduler.sigmas, index)
        assert mine.dtype == expected.dtype and torch.equal(mine, expected)


def test_a_sample_alone_is_the_pipelines_image_bit_for_bit(
    pipe: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stepbatch.worker, "image_result", lambda sample, image: image)  # keep the floats
    (image, left_at), *_ = run_plan(pipe, {0: [sample(5)]}).values()
    assert left_at == STEPS
    assert np.array_equal(image, stock(pipe, ["a fox"], [5])[0])


def test_the_reused_empty_negative_gives_the_same_image(pipe: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stepbatch.worker, "image_result", lambda sample, image: image)
    (image, _), *_ = run_plan(pipe, {0: [sample(5)]}, empty_negative=EmptyNegative()).values()
    assert np.array_equal(image, stock(pipe, ["a fox"], [5])[0])


def test_without_guidance_the_batch_is_not_doubled(pipe: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stepbatch.worker, "image_result", lambda sample, image: image)
    key = CompatKey.of("generate", size=(64, 64), steps=STEPS, guidance=1.0)
    (image, _), *_ = run_plan(pipe, {0: [Sample(key, "j", 0, "a fox", None, 5, 0.0)]}, key=key).values()
    assert np.array_equal(image, stock(pipe, ["a fox"], [5], guidance=1.0)[0])


def test_a_sample_joining_at_a_later_step_makes_its_own_image_after_its_own_steps(pipe: Any) -> None:
    alone = run_plan(pipe, {0: [sample(5)]})[5][0]
    others = [sample(s, f"other {s}") for s in (1, 2, 3, 4)]
    left = run_plan(pipe, {0: others, 3: [sample(5)]})
    image, left_at = left[5]
    assert left_at == 3 + STEPS
    assert close(image, alone)
    # the batch it joined is unchanged by it, and finished after its own steps
    for s in others:
        assert left[s.seed][1] == STEPS and close(left[s.seed][0], run_plan(pipe, {0: [s]})[s.seed][0])
    # and so is the image of a seed batched from the start
    assert close(run_plan(pipe, {0: [sample(5), *others]})[5][0], alone)


def test_a_dropped_sample_leaves_and_its_batchmates_finish_unchanged(pipe: Any) -> None:
    stays, goes = sample(1, "stays"), sample(2, "goes")
    left = run_plan(pipe, {0: [stays, goes]}, drops={3: [goes]})
    assert 2 not in left and left[1][1] == STEPS
    assert close(left[1][0], run_plan(pipe, {0: [stays]})[1][0])


def patch(
    pipe: Any, monkeypatch: pytest.MonkeyPatch, fails: Callable[[dict[str, Any]], BaseException | None]
) -> None:
    """Make ``pipe``'s transformer raise ``fails(kwargs)`` (when not None) on a call."""
    forward = pipe.transformer.forward

    def failing(**kwargs: Any) -> Any:
        error = fails(kwargs)
        if error is not None:
            raise error
        return forward(**kwargs)

    monkeypatch.setattr(pipe.transformer, "forward", failing)


def test_a_sample_failing_alone_fails_alone_and_its_batchmates_go_on(
    pipe: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    first_timestep = float(stepbatch.schedule_of(pipe, KEY, torch.device("cpu")).timesteps[0])
    armed = {"on": False}

    def fails(kwargs: dict[str, Any]) -> BaseException | None:
        # once armed, any call with a sample at its first step fails: the late joiner, whoever
        # it is batched with
        hit = armed["on"] and bool((kwargs["timestep"] == first_timestep).any())
        return ValueError("this input cannot be taken") if hit else None

    runners = [sample(1, "one"), sample(2, "two")]
    alone = {s.seed: run_plan(pipe, {0: [s]})[s.seed][0] for s in runners}
    patch(pipe, monkeypatch, fails)
    outcome = Outcome(results=[])
    run = BatchRun(KEY, [])
    with torch.inference_mode():
        batch = stepbatch.StepBatch(pipe, KEY)
        batch.join(runners, outcome)
        batch.step(run, outcome)
        armed["on"] = True
        batch.join([sample(3, "late")], outcome)
        left: list[Left] = []
        while batch.members:
            left += batch.step(run, outcome)
    by_seed = {item.sample.seed: item for item in left}
    failed = by_seed[3].result
    assert isinstance(failed, SampleFailed) and failed.kind == "pipeline" and not failed.device
    assert by_seed[3].steps_done == 0
    assert outcome.retried == ["pipeline", "pipeline"]  # the batched call, then the sample alone
    for s in runners:
        assert close(by_seed[s.seed].result, alone[s.seed])


def test_out_of_memory_splits_the_step_and_later_steps_stay_small(
    pipe: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def fails(kwargs: dict[str, Any]) -> BaseException | None:
        calls.append(kwargs["hidden_states"].shape[0] // 2)
        return torch.OutOfMemoryError("out of memory") if calls[-1] > 2 else None

    members = [sample(s, f"p{s}") for s in (1, 2, 3, 4)]
    alone = {s.seed: run_plan(pipe, {0: [s]})[s.seed][0] for s in members}
    patch(pipe, monkeypatch, fails)
    left = run_plan(pipe, {0: members})
    assert calls[:3] == [4, 2, 2] and set(calls[3:]) == {2}  # no further call of 4
    for s in members:
        assert close(left[s.seed][0], alone[s.seed])


def test_a_device_fault_ends_the_batch_with_the_error(pipe: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def fails(kwargs: dict[str, Any]) -> BaseException | None:
        return RuntimeError("CUDA error: an illegal memory access was encountered")

    class Channel:
        def exchange(self, report: Any) -> None:
            raise AssertionError("no step completed")

    patch(pipe, monkeypatch, fails)
    model = type("Model", (), {"pipeline": lambda self, task: pipe, "empty_negative": None})()
    run = BatchRun(KEY, [sample(1)], session=Channel())
    outcome = stepbatch.run_steps(model, run)  # type: ignore[arg-type]
    assert isinstance(outcome.error, RuntimeError)


def test_latent_hooks_see_each_sample_at_its_own_step(pipe: Any) -> None:
    seen: list[tuple[int, int, int, tuple[int, ...]]] = []

    def hook(run: BatchRun, done: int, total: int, samples: list[Sample], latents: Any) -> None:
        (one,) = samples
        seen.append((one.seed, done, total, tuple(latents.shape)))

    run = BatchRun(KEY, [], latent_hooks=[hook])
    run_plan(pipe, {0: [sample(1)], 2: [sample(2)]}, run=run)
    assert [d for s, d, _, _ in seen if s == 1] == list(range(1, STEPS + 1))
    assert [d for s, d, _, _ in seen if s == 2] == list(range(1, STEPS + 1))
    assert {(total, shape) for _, _, total, shape in seen} == {(STEPS, (1, 16, 8, 8))}
    # batch step 2 was sample 1's third step and sample 2's first
    assert seen[2:4] == [(1, 3, STEPS, (1, 16, 8, 8)), (2, 1, STEPS, (1, 16, 8, 8))]


def test_step_times_become_batch_timings_once_a_size_ran_the_keys_steps() -> None:
    meter = stepbatch.StepMeter(3)
    timings: list[tuple[int, float]] = []
    for size, seconds in [(1, 0.5), (2, 1.0), (1, 0.5), (2, 1.0), (1, 0.5)]:
        meter.add(size, seconds, timings)
    assert timings == [(1, 1.5)]
    meter.add(2, 1.0, timings)
    assert timings == [(1, 1.5), (2, 3.0)]


def test_only_sd3_text_to_image_of_the_lossless_tier_runs_step_level(pipe: Any) -> None:
    from imagefleet.inference_pod import tiny
    from imagefleet.inference_pod.models import LoadedModel, describe

    info = describe(
        pipe, model_id="x", source="synthetic", random_weights=True, device="cpu", dtype=torch.float32
    )
    stepwise = stepbatch.stepwise_keys(LoadedModel(info=info, text2img=pipe))
    assert stepwise is not None
    assert stepwise(KEY) and stepwise(
        CompatKey.of("generate", size=(64, 64), steps=2, guidance=1.0, tier="lossless")
    )
    assert not stepwise(CompatKey.of("generate", size=(64, 64), steps=2, guidance=1.0, tier="fast"))
    assert not stepwise(CompatKey.of("img2img", size=(64, 64), steps=2, guidance=1.0, strength=0.5))
    unet = tiny.build()
    assert stepbatch.stepwise_keys(LoadedModel(info=info, text2img=unet)) is None
    stochastic = copy.copy(pipe)
    stochastic.scheduler = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
    assert not stepbatch.supports(stochastic)


class Recorder:
    """A channel that lets nobody join and keeps every report."""

    def __init__(self) -> None:
        self.reports: list[Any] = []

    def exchange(self, report: Any) -> Any:
        self.reports.append(report)
        return Admission(join=[], drop=[])


@pytest.mark.parametrize("stall", [False, True])
def test_a_batch_runs_to_its_end_through_its_channel_and_a_stalled_step_teaches_nothing(
    pipe: Any, stall: bool
) -> None:
    plan = faults.FaultPlan()
    if stall:
        plan.arm("stall", 1, seconds=0.0, step=2)
    channel = Recorder()
    run = BatchRun(KEY, [sample(1), sample(2)], session=channel)
    model = type("Model", (), {"pipeline": lambda self, task: pipe, "empty_negative": None})()
    outcome = faults.wrap(functools.partial(stepbatch.execute, model), plan)(run)
    assert outcome.error is None
    assert [r.steps_run for r in channel.reports] == list(range(1, STEPS + 1))
    assert [len(r.left) for r in channel.reports] == [0] * (STEPS - 1) + [2]
    timings = [t for r in channel.reports for t in r.outcome.timings]
    assert [size for size, _ in timings] == ([] if stall else [2])  # one step short of a batch's time
