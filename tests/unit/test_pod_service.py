"""The image service: support checks, defaults resolved once, uploads, wait-with-cancel."""

from __future__ import annotations

import asyncio
import dataclasses
import io

import pytest
from PIL import Image

from imagefleet.errors import ClientClosed, InvalidRequest
from imagefleet.inference_pod.scheduler import Scheduler
from imagefleet.inference_pod.service import ImageService
from imagefleet.schema import EditFiles, parse_edit, parse_generation
from tests.conftest import InlineExecutor, ManualExecutor
from tests.unit.test_pod_reports import INFO
from tests.unit.test_pod_scheduler import DEFAULTS, LIMITS, FakeGPU, scheduler, seeds


def service(gpu: FakeGPU, executor: object = None, **info: object) -> tuple[ImageService, Scheduler]:
    s = scheduler(gpu, executor=executor)
    svc = ImageService(
        info=dataclasses.replace(INFO, **info),  # type: ignore[arg-type]
        defaults=DEFAULTS,
        limits=LIMITS,
        scheduler=s,
        cpu=InlineExecutor(),
        poll_s=0.01,
    )
    return svc, s


def png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, "PNG")
    return buf.getvalue()


def test_generate_resolves_the_defaults_once_and_returns_them_with_the_images() -> None:
    async def scenario() -> None:
        svc, sched = service(gpu := FakeGPU())
        sched.start()
        result = await svc.generate(
            parse_generation({"prompt": "x", "seed": 5, "n": 2}, LIMITS), lambda: False
        )
        assert (result.request.size, result.request.steps, result.request.guidance) == ((64, 64), 4, 5.0)
        assert seeds(result.images) == [5, 6] and gpu.batches[0][0].key.task == "generate"
        await sched.stop()

    asyncio.run(scenario())


def test_a_negative_prompt_the_model_cannot_take_is_a_400() -> None:
    async def scenario() -> None:
        svc, _ = service(FakeGPU(), supports_negative_prompt=False)
        with pytest.raises(InvalidRequest) as info:
            await svc.generate(
                parse_generation({"prompt": "x", "negative_prompt": "y"}, LIMITS), lambda: False
            )
        assert info.value.param == "negative_prompt"

    asyncio.run(scenario())


def test_a_client_that_leaves_cancels_its_work() -> None:
    async def scenario() -> None:
        svc, sched = service(gpu := FakeGPU(), executor=ManualExecutor())
        sched.start()
        with pytest.raises(ClientClosed):
            await svc.generate(parse_generation({"prompt": "x"}, LIMITS), lambda: True)
        snap = sched.snapshot()
        assert snap.queued_samples == 0 and not gpu.batches  # its batch was stopped before it ran
        await sched.stop()

    asyncio.run(scenario())


def test_an_edit_with_a_mask_inpaints_at_the_images_own_size() -> None:
    async def scenario() -> None:
        svc, sched = service(gpu := FakeGPU())
        sched.start()
        req, _ = parse_edit({"prompt": "x", "seed": "1"}, {"image": [b"."]}, LIMITS)
        result = await svc.edit(req, EditFiles(png((48, 32)), png((48, 32), "L")), lambda: False)
        assert result.request.size == (48, 32) and gpu.batches[0][0].key.task == "inpaint"
        req, _ = parse_edit({"prompt": "x", "size": "64x64", "seed": "2"}, {"image": [b"."]}, LIMITS)
        result = await svc.edit(req, EditFiles(png((48, 32)), None), lambda: False)
        assert gpu.batches[1][0].key.task == "img2img" and gpu.batches[1][0].image.size == (64, 64)
        with pytest.raises(InvalidRequest) as info:
            req, _ = parse_edit({"prompt": "x"}, {"image": [b"."]}, LIMITS)
            await svc.edit(req, EditFiles(png((60, 60)), None), lambda: False)
        assert info.value.param == "image"
        await sched.stop()

    asyncio.run(scenario())
