"""The GPU worker with a fake pipeline: a failing batch is retried sample by sample, NaNs are
caught, and only the device's failures are called so; then what the batch loop makes of them."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from imagefleet.errors import GenerationFailed, Unavailable
from imagefleet.inference_pod import tiny, worker
from imagefleet.inference_pod.batching import CompatKey, Sample
from imagefleet.inference_pod.counters import PodCounters
from imagefleet.inference_pod.models import LoadedModel
from imagefleet.inference_pod.phase import PodPhase
from imagefleet.inference_pod.worker import BatchRun, SampleFailed
from tests.unit.test_pod_reports import INFO
from tests.unit.test_pod_scheduler import FakeGPU, request, run, scheduler, seeds, settle

KEY = CompatKey.of("generate", size=(8, 8), steps=2, guidance=5.0)


class FakePipeline:
    """Makes one 8x8 image per prompt (output_type "pt"); a prompt names what goes wrong:
    ``bad`` raises (an input it cannot take), ``nan`` comes out as NaNs, ``cuda`` is a device
    error, ``big`` runs out of memory in any batch."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, *, prompt: list[str], output_type: str, **kwargs: Any) -> Any:
        assert output_type == "pt"
        self.calls.append(prompt)
        if "cuda" in prompt:
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
        if "big" in prompt:
            raise torch.OutOfMemoryError("CUDA out of memory")
        if "bad" in prompt:
            raise ValueError("the tokenizer cannot take this prompt")
        images = torch.full((len(prompt), 3, 8, 8), 0.5)
        for i, p in enumerate(prompt):
            if p == "nan":
                images[i, 0, 0, 0] = torch.nan

        class Result:
            pass

        result = Result()
        result.images = images  # type: ignore[attr-defined]
        return result


def batch(*prompts: str) -> BatchRun:
    return BatchRun(KEY, [Sample(KEY, f"job{i}", 0, p, None, i, 0.0) for i, p in enumerate(prompts)])


def execute(*prompts: str) -> tuple[worker.Outcome, FakePipeline]:
    pipe = FakePipeline()
    return worker.execute(LoadedModel(info=INFO, text2img=pipe), batch(*prompts)), pipe


def test_a_batch_that_succeeds_gives_pil_images() -> None:
    outcome, pipe = execute("a", "b")
    assert outcome.error is None and outcome.retried == [] and pipe.calls == [["a", "b"]]
    assert all(isinstance(r, Image.Image) and r.size == (8, 8) for r in outcome.results)


def test_a_failing_batch_is_retried_sample_by_sample_so_only_the_bad_sample_fails() -> None:
    outcome, pipe = execute("a", "bad", "c")
    assert pipe.calls == [["a", "bad", "c"], ["a"], ["bad"], ["c"]]
    good, failed, other = outcome.results
    assert isinstance(good, Image.Image) and isinstance(other, Image.Image)
    assert isinstance(failed, SampleFailed) and failed.kind == "pipeline" and not failed.device
    assert "tokenizer" not in str(failed)  # the exception's text is for the log
    assert outcome.error is None and outcome.retried == ["pipeline", "pipeline"]


def test_a_device_fault_fails_the_whole_batch_and_is_not_retried() -> None:
    outcome, pipe = execute("a", "cuda")
    assert pipe.calls == [["a", "cuda"]]
    assert outcome.error is not None and worker.device_fault(outcome.error)


def test_nans_in_an_image_fail_that_sample_as_the_devices_fault() -> None:
    outcome, _ = execute("a", "nan")
    assert isinstance(outcome.results[0], Image.Image)
    failed = outcome.results[1]
    assert isinstance(failed, SampleFailed) and failed.kind == "nan" and failed.device


def test_out_of_memory_down_to_one_sample_is_the_devices_fault() -> None:
    outcome, pipe = execute("a", "big")
    assert pipe.calls == [["a", "big"], ["a"], ["big"]]
    assert isinstance(outcome.results[0], Image.Image)
    failed = outcome.results[1]
    assert isinstance(failed, SampleFailed) and failed.kind == "oom" and failed.device


@pytest.mark.parametrize(
    ("error", "device"),
    [
        (RuntimeError("CUDA error: device-side assert triggered"), True),
        (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemmEx"), True),
        (torch.AcceleratorError("CUDA error: unspecified launch failure"), True),
        (RuntimeError("expected scalar type Float but found Half"), False),
        (ValueError("CUDA error"), False),
        (KeyError("x"), False),
    ],
)
def test_which_failures_are_the_devices(error: BaseException, device: bool) -> None:
    assert worker.device_fault(error) is device


# --- what the batch loop makes of it ---


def test_a_sample_that_fails_alone_never_counts_toward_quarantine() -> None:
    async def scenario() -> None:
        gpu = FakeGPU()
        gpu.sample_failures.add(0)  # FakeGPU's SampleFailed: not the device's fault
        s = scheduler(gpu, max_batch_size=1, quarantine_after=2)
        tickets = [s.submit(request(0)) for _ in range(4)]
        s.start()
        outcomes = [await settle(t) for t in tickets]
        assert all(isinstance(o, GenerationFailed) for o in outcomes)
        assert s.phase() is PodPhase.SERVING
        await s.stop()

    run(scenario)


class DeviceSampleGPU(FakeGPU):
    """Fails the samples of chosen seeds as a device would (NaNs)."""

    def __init__(self, seeds: set[int]) -> None:
        super().__init__()
        self.device_seeds = seeds

    def __call__(self, run: BatchRun) -> worker.Outcome:
        outcome = super().__call__(run)
        for i, sample in enumerate(run.samples):
            if sample.seed in self.device_seeds:
                outcome.results[i] = SampleFailed("nan", "The GPU produced an invalid image.", device=True)
        return outcome


def test_nans_answer_503_and_count_toward_quarantine_and_a_good_batch_resets_the_count() -> None:
    async def scenario() -> None:
        counters = PodCounters()
        s = scheduler(DeviceSampleGPU({0}), counters=counters, max_batch_size=1, quarantine_after=2)
        first, good, second, third = (s.submit(request(seed)) for seed in (0, 10, 0, 0))
        s.start()
        error = await settle(first)
        assert isinstance(error, Unavailable) and error.code == "device_error" and first.id in error.message
        assert seeds(await good.future) == [10]  # resets the count
        assert isinstance(await settle(second), Unavailable) and s.phase() is PodPhase.SERVING
        await settle(third)
        assert s.phase() is PodPhase.QUARANTINED
        assert "invalid" not in (s.snapshot().last_error or "x")
        assert counters.other_errors["nan"] == 3
        await s.stop()

    run(scenario)


def test_a_batch_mates_device_failure_does_not_cost_the_others_their_images() -> None:
    async def scenario() -> None:
        s = scheduler(DeviceSampleGPU({0}), max_batch_size=4, quarantine_after=5)
        bad, good = s.submit(request(0)), s.submit(request(10))
        s.start()
        assert isinstance(await settle(bad), Unavailable)
        assert seeds(await good.future) == [10]
        await s.stop()

    run(scenario)


def test_the_pixels_made_on_the_device_are_the_ones_pil_output_gives() -> None:
    pipe = tiny.build()
    pipe.set_progress_bar_config(disable=True)

    def made(output_type: str) -> Any:
        return pipe(
            prompt=["a cat", "a dog"],
            num_inference_steps=2,
            generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
            output_type=output_type,
        ).images

    expected = [np.asarray(image) for image in made("pil")]
    got = worker.pixels(made("pt"))
    assert len(got) == 2 and all(g.dtype == np.uint8 for g in got)
    assert all(np.array_equal(g, e) for g, e in zip(got, expected, strict=True))
    assert np.asarray(worker.image_result(batch("a").samples[0], got[0])).tobytes() == expected[0].tobytes()
    # values half-way between two levels round as numpy_to_pil rounds them
    values = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    values.view(-1)[:256] = (torch.arange(256) + 0.5) / 255
    reference = VaeImageProcessor.numpy_to_pil(values.permute(0, 2, 3, 1).numpy())[0]
    assert np.array_equal(worker.pixels(values)[0], np.asarray(reference))
    nan = torch.zeros(2, 3, 4, 4)
    nan[1, 2, 3, 3] = torch.nan
    first, second = worker.pixels(nan)
    assert first is not None and second is None
