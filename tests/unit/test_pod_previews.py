"""Partial images: which steps, which sample's latent, and how latents become pictures."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from imagefleet.inference_pod import previews
from imagefleet.inference_pod.batching import CompatKey, Sample
from imagefleet.inference_pod.previews import PreviewTap, Projection, Watch, Watches, preview_steps
from imagefleet.inference_pod.worker import BatchRun
from tests.conftest import InlineExecutor


@pytest.mark.parametrize(
    ("total", "count", "expected"),
    [(12, 3, {3, 6, 9}), (20, 2, {7, 13}), (30, 1, {15}), (4, 3, {1, 2, 3}), (2, 3, {1}), (1, 2, set()),
     (20, 0, set())],
)  # fmt: skip
def test_preview_steps_are_evenly_spaced_and_before_the_last(
    total: int, count: int, expected: set[int]
) -> None:
    assert preview_steps(total, count) == expected


def test_a_projection_maps_each_latent_pixel_to_rgb() -> None:
    identity_ish = Projection.of([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]], [0, 0, 0])
    latent = torch.zeros(4, 2, 3)
    latent[0] = 1.0  # red channel at +1 -> 255; the others at 0 -> the middle grey
    image = identity_ish.image(latent)
    assert image.size == (3, 2)
    assert np.asarray(image)[0, 0].tolist() == [255, 128, 128]


def test_every_published_projection_has_the_familys_channels() -> None:
    channels = {family: Projection.of(*f).channels for family, f in previews.FAMILY_FACTORS.items()}
    assert channels == {"sd": 4, "sdxl": 4, "sd3": 16}


class LinearVae(torch.nn.Module):
    """A VAE whose decoder is exactly linear per pixel (upsampled by 2): the fit must recover it."""

    class config:  # diffusers names it so
        latent_channels = 4
        scaling_factor = 0.5
        shift_factor = None

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor([[0.5, -0.2, 0.1], [0.0, 0.3, 0.0], [0.2, 0.2, 0.2], [-0.4, 0.1, 0.3]]))  # fmt: skip
        self.bias = torch.nn.Parameter(torch.tensor([0.1, -0.1, 0.05]))

    def decode(self, z: torch.Tensor) -> Any:
        rgb = (
            torch.einsum("bchw,cr->brhw", z * self.config.scaling_factor, self.weight)
            + self.bias[:, None, None]
        )
        return type("Out", (), {"sample": torch.nn.functional.interpolate(rgb, scale_factor=2)})()


def test_fitting_recovers_a_linear_decoder() -> None:
    vae = LinearVae()
    fitted = previews.fit_projection(vae)
    assert torch.allclose(fitted.weight, vae.weight.detach(), atol=1e-4)
    assert torch.allclose(fitted.bias, vae.bias.detach(), atol=1e-4)


def samples(*jobs: str) -> list[Sample]:
    key = CompatKey.of("generate", size=(16, 16), steps=4, guidance=1.0, strength=None)
    return [Sample(key, job, i, "p", None, i, 0.0, None, None) for i, job in enumerate(jobs)]


def test_the_tap_previews_only_the_watched_samples_own_latent() -> None:
    async def run() -> tuple[Watch, list[Any]]:
        watches = Watches()
        watch = watches.open(Watch("b", 1, (4, 4), "png", None))
        decoded: list[torch.Tensor] = []

        class Spy:
            channels = 4

            def image(self, latent: torch.Tensor) -> Image.Image:
                decoded.append(latent)
                return Image.new("RGB", (2, 2))

        tap = PreviewTap(watches, Spy(), InlineExecutor())  # type: ignore[arg-type]
        batch = samples("a", "b", "c")
        latents = torch.stack([torch.full((4, 2, 2), float(i)) for i in range(3)])
        run = BatchRun(key=batch[0].key, samples=batch)
        for step in range(1, 5):
            tap(run, step, 4, batch, latents)
        await asyncio.sleep(0)  # the loop takes the hand-overs from the "GPU thread"
        await asyncio.sleep(0)
        return watch, decoded

    watch, decoded = asyncio.run(run())
    assert [float(t.mean()) for t in decoded] == [1.0]  # row 1 is job b's; one preview at step 2
    assert (watch.steps_done, watch.steps_total) == (4, 4)
    assert len(watch.partials) == 1 and watch.partials[0].result().format == "png"


def test_a_step_rerun_after_an_out_of_memory_split_is_previewed_once() -> None:
    async def run() -> list[bool]:
        watch = Watch("a", 1, (4, 4), "png", None)
        return [watch.wants_preview(2, 4), watch.wants_preview(2, 4), watch.wants_preview(3, 4)]

    assert asyncio.run(run()) == [True, False, False]


def test_packed_latents_give_progress_but_no_preview() -> None:
    async def run() -> Watch:
        watches = Watches()
        watch = watches.open(Watch("a", 3, (4, 4), "png", None))
        tap = PreviewTap(watches, Projection.of(*previews.FAMILY_FACTORS["sd"]), InlineExecutor())
        batch = samples("a")
        for step in range(1, 5):
            tap(BatchRun(key=batch[0].key, samples=batch), step, 4, batch, torch.zeros(1, 64, 16))
        await asyncio.sleep(0)
        return watch

    watch = asyncio.run(run())
    assert watch.steps_done == 4 and not watch.partials


def test_the_capture_is_a_copy_the_pipeline_cannot_change() -> None:
    latents = torch.ones(2, 4, 2, 2)
    taken = previews.capture(latents, 1)
    latents.mul_(5)
    assert float(taken().mean()) == 1.0
