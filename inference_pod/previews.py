"""Partial images: cheap previews of a streaming request's sample, taken from the running batch.

A request with ``stream: true`` opens a :class:`Watch` (in :class:`Watches`, by job id) that the
batch's :class:`PreviewTap` feeds from the GPU thread after every denoising step:

* **progress** -- the steps done, for every watched sample of the batch (a number, nothing else);
* **partial images** -- at ``partial_images`` evenly spaced steps (:func:`preview_steps`), the
  sample's own latent slice is copied off the GPU (asynchronously, into pinned memory, so the GPU
  thread never waits for it) and the rest happens on the CPU pool: a latent-to-RGB linear
  projection (:class:`Projection`), a resize to the requested size, and the usual encoding. No
  VAE runs and no other sample of the batch is touched, so a preview costs the batch one small
  device-to-host copy.

The projection is the published latent-to-RGB factors of the model family's VAE (SD 1.x, SDXL,
SD3: the numbers ComfyUI's previews use), or, for a VAE without published factors, a least-squares
fit of what the served VAE itself decodes from random latents (:func:`fit_projection`, once at
start-up, milliseconds). A VAE small enough to run on the CPU in milliseconds (the built-in
``tiny`` model's, whose random weights no linear map approximates) is instead copied to the CPU
once and decodes the previews there (:class:`CpuDecoder`): still never on the GPU thread.
Pipelines whose step latents are not spatial (Flux packs them into sequences) stream progress but
no partial images.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from concurrent.futures import Future as ThreadFuture
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from imagefleet.inference_pod.batching import Sample
from imagefleet.inference_pod.encoding import Encoded, encode
from imagefleet.inference_pod.worker import BatchRun, Outcome, RunBatch

log = logging.getLogger(__name__)

# (latent channel -> R, G, B) weights and bias, for latents as the pipeline denoises them
# (scaled by the VAE's scaling factor, shift removed).
_SD15 = (
    (
        (0.3512, 0.2297, 0.3227),
        (0.3250, 0.4974, 0.2350),
        (-0.2829, 0.1762, 0.2721),
        (-0.2120, -0.2616, -0.7177),
    ),
    (0.0, 0.0, 0.0),
)
_SDXL = (
    (
        (0.3651, 0.4232, 0.4341),
        (-0.2533, -0.0042, 0.1068),
        (0.1076, 0.1111, -0.0362),
        (-0.3165, -0.2492, -0.2188),
    ),
    (0.1084, -0.0175, -0.0011),
)
_SD3 = (
    (
        (-0.0922, -0.0175, 0.0749), (0.0311, 0.0633, 0.0954), (0.1994, 0.0927, 0.0458),
        (0.0856, 0.0339, 0.0902), (0.0587, 0.0272, -0.0496), (-0.0006, 0.1104, 0.0309),
        (0.0978, 0.0306, 0.0427), (-0.0042, 0.1038, 0.1358), (-0.0194, 0.0020, 0.0669),
        (-0.0488, 0.0130, -0.0268), (0.0922, 0.0988, 0.0951), (-0.0278, 0.0524, -0.0542),
        (0.0332, 0.0456, 0.0895), (-0.0069, -0.0030, -0.0810), (-0.0596, -0.0465, -0.0293),
        (-0.1448, -0.1463, -0.1189),
    ),
    (0.2394, 0.2135, 0.1925),
)  # fmt: skip
FAMILY_FACTORS: dict[str, tuple[tuple[tuple[float, float, float], ...], tuple[float, float, float]]] = {
    "sd": _SD15,
    "sdxl": _SDXL,
    "sd3": _SD3,
}
"""Published latent-to-RGB factors by model family (:func:`~.models.family_of`)."""

FIT_LATENT_SIDE = 16
FIT_SAMPLES = 4
CPU_DECODER_MAX_PARAMS = 2_000_000
"""VAEs up to this size decode previews themselves, on the CPU pool."""


def preview_steps(total_steps: int, count: int) -> frozenset[int]:
    """After which steps (counted from 1) to send ``count`` previews: evenly spaced, all before the
    last step (the last step's image is the final one). Fewer when there are too few steps."""
    if count <= 0 or total_steps <= 1:
        return frozenset()
    steps = {round(total_steps * (i + 1) / (count + 1)) for i in range(count)}
    return frozenset(s for s in steps if 1 <= s < total_steps)


@dataclass(frozen=True)
class Projection:
    """A per-pixel linear map from latent channels to RGB in [-1, 1]."""

    weight: torch.Tensor
    """(channels, 3), float32 on the CPU."""
    bias: torch.Tensor
    """(3,)"""

    @classmethod
    def of(cls, weight: Sequence[Sequence[float]], bias: Sequence[float]) -> Projection:
        return cls(torch.tensor(weight, dtype=torch.float32), torch.tensor(bias, dtype=torch.float32))

    @property
    def channels(self) -> int:
        return int(self.weight.shape[0])

    def image(self, latent: torch.Tensor) -> Image.Image:
        """The RGB image (latent resolution) of one sample's latent, (channels, h, w)."""
        rgb = torch.einsum("chw,cr->hwr", latent.float(), self.weight) + self.bias
        pixels = ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8)
        return Image.fromarray(pixels.numpy(), "RGB")


class CpuDecoder:
    """A small VAE's own decoder, copied to the CPU in float32, decoding one preview at a time."""

    def __init__(self, vae: Any) -> None:
        self.vae = copy.deepcopy(vae).to("cpu", torch.float32).eval().requires_grad_(False)
        config = vae.config
        self.channels = int(config.latent_channels)
        self._scaling = float(getattr(config, "scaling_factor", 1.0) or 1.0)
        self._shift = float(getattr(config, "shift_factor", 0.0) or 0.0)

    @torch.inference_mode()
    def image(self, latent: torch.Tensor) -> Image.Image:
        decoded = self.vae.decode(latent.float()[None] / self._scaling + self._shift).sample[0]
        pixels = ((decoded + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8)
        return Image.fromarray(pixels.permute(1, 2, 0).numpy(), "RGB")


PreviewDecoder = Projection | CpuDecoder


def decoder_for(family: str, pipe: Any) -> PreviewDecoder | None:
    """How to turn the served pipeline's latents into previews (blocking; on the GPU thread).

    None when the pipeline has no VAE (then streams carry no partial images).
    """
    factors = FAMILY_FACTORS.get(family)
    if factors is not None:
        return Projection.of(*factors)
    vae = getattr(pipe, "vae", None)
    if vae is None:
        return None
    try:
        if sum(p.numel() for p in vae.parameters()) <= CPU_DECODER_MAX_PARAMS:
            return CpuDecoder(vae)
        return fit_projection(vae)
    except Exception:  # a VAE of an unexpected shape: stream without previews rather than fail
        log.exception("No latent preview for this VAE; streams will carry no partial images")
        return None


@torch.inference_mode()
def fit_projection(vae: Any) -> Projection:
    """Least squares from latents (as the pipeline denoises them) to what ``vae`` decodes, averaged
    over each latent pixel's footprint; seeded, so every pod of a model fits the same map."""
    config = vae.config
    channels = int(config.latent_channels)
    scaling = float(getattr(config, "scaling_factor", 1.0) or 1.0)
    shift = float(getattr(config, "shift_factor", 0.0) or 0.0)
    generator = torch.Generator("cpu").manual_seed(0)
    latents = torch.randn(FIT_SAMPLES, channels, FIT_LATENT_SIDE, FIT_LATENT_SIDE, generator=generator)
    param = next(vae.parameters())
    decoded = vae.decode((latents / scaling + shift).to(param.device, param.dtype)).sample.float().cpu()
    rgb = F.adaptive_avg_pool2d(decoded, FIT_LATENT_SIDE)
    x = latents.permute(0, 2, 3, 1).reshape(-1, channels)
    x = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)
    y = rgb.permute(0, 2, 3, 1).reshape(-1, 3)
    solution = torch.linalg.lstsq(x, y).solution
    return Projection(solution[:channels].contiguous(), solution[channels].contiguous())


# --- the GPU side --------------------------------------------------------------------------------


def capture(latents: torch.Tensor, row: int) -> Callable[[], torch.Tensor]:
    """Start copying ``latents[row]`` to the CPU; the returned call waits for the copy (CPU pool).

    On CUDA the copy is queued on the current stream into pinned memory and a CUDA event marks its
    end: the GPU thread goes on with the next step at once, and the copy reads the latent before
    any later kernel can change it (stream order). Elsewhere it is a plain copy.
    """
    source = latents[row].detach()
    if source.device.type != "cuda":
        copied = source.to("cpu", torch.float32, copy=True)
        return lambda: copied
    pinned = torch.empty(source.shape, dtype=source.dtype, pin_memory=True)
    pinned.copy_(source, non_blocking=True)
    done = torch.cuda.Event()  # type: ignore[no-untyped-call]
    done.record()

    def wait() -> torch.Tensor:
        done.synchronize()
        return pinned.float()

    return wait


def render(
    latent: Callable[[], torch.Tensor],
    decoder: PreviewDecoder,
    size: tuple[int, int],
    fmt: str,
    compression: int | None,
) -> Encoded:
    """One partial image, encoded (on the CPU pool)."""
    image = decoder.image(latent())
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    return encode(image, fmt, compression, True)


class Watch:
    """What a streaming request sees of its sample while it runs: progress and partial images.

    Created on the event loop; :meth:`step` and :meth:`partial` are called from the GPU thread and
    hand over to the loop; ``changed`` is set whenever there is something new.
    """

    def __init__(
        self, job_id: str, partial_images: int, size: tuple[int, int], fmt: str, compression: int | None
    ) -> None:
        self.job_id = job_id
        self.partial_images = partial_images
        self.size = size
        self.format = fmt
        self.compression = compression
        self.steps_done = 0
        self.steps_total = 0
        self.partials: deque[asyncio.Future[Encoded]] = deque()
        self.changed = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._previewed: set[int] = set()

    def wants_preview(self, steps_done: int, steps_total: int) -> bool:
        """Whether to take a preview now (once per step, even if an out-of-memory split reruns it)."""
        if steps_done not in preview_steps(steps_total, self.partial_images) or steps_done in self._previewed:
            return False
        self._previewed.add(steps_done)
        return True

    # --- from the GPU thread ---

    def step(self, steps_done: int, steps_total: int) -> None:
        self._soon(self._stepped, steps_done, steps_total)

    def partial(self, rendering: ThreadFuture[Encoded]) -> None:
        self._soon(self._partial, rendering)

    def _soon(self, fn: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            self._loop.call_soon_threadsafe(fn, *args)

    # --- on the loop ---

    def _stepped(self, steps_done: int, steps_total: int) -> None:
        self.steps_done, self.steps_total = steps_done, steps_total
        self.changed.set()

    def _partial(self, rendering: ThreadFuture[Encoded]) -> None:
        future = asyncio.wrap_future(rendering, loop=self._loop)
        self.partials.append(future)
        future.add_done_callback(lambda _: self.changed.set())


class Watches:
    """The open watches by job id (changed on the loop, read from the GPU thread: plain dict
    operations, atomic in CPython)."""

    def __init__(self) -> None:
        self._by_job: dict[str, Watch] = {}

    def open(self, watch: Watch) -> Watch:
        self._by_job[watch.job_id] = watch
        return watch

    def close(self, job_id: str) -> None:
        self._by_job.pop(job_id, None)

    def get(self, job_id: str) -> Watch | None:
        return self._by_job.get(job_id)

    def __len__(self) -> int:
        return len(self._by_job)


class PreviewTap:
    """The latent hook (:data:`~.worker.LatentHook`) that feeds the watches of a batch's samples."""

    def __init__(self, watches: Watches, decoder: PreviewDecoder | None, cpu: Executor) -> None:
        self.watches = watches
        self.decoder = decoder
        self.cpu = cpu

    def __call__(
        self, run: BatchRun, steps_done: int, steps_total: int, samples: Sequence[Sample], latents: Any
    ) -> None:
        if not len(self.watches):
            return
        for row, sample in enumerate(samples):
            watch = self.watches.get(sample.job_id)
            if watch is None:
                continue
            watch.step(steps_done, steps_total)
            if self.decoder is None or not watch.wants_preview(steps_done, steps_total):
                continue
            if not self._fits(latents, len(samples)):
                continue
            rendering = self.cpu.submit(
                render, capture(latents, row), self.decoder, watch.size, watch.format, watch.compression
            )
            watch.partial(rendering)

    def _fits(self, latents: Any, samples: int) -> bool:
        """Spatial latents, one row per sample, with the decoder's channels (not, e.g., Flux's
        packed sequences)."""
        assert self.decoder is not None
        return (
            isinstance(latents, torch.Tensor)
            and latents.dim() == 4
            and latents.shape[0] == samples
            and latents.shape[1] == self.decoder.channels
        )


def wrap(run_batch: RunBatch, tap: PreviewTap) -> RunBatch:
    """``run_batch`` with ``tap`` on every batch."""

    def run(batch: BatchRun) -> Outcome:
        batch.latent_hooks.append(tap)
        return run_batch(batch)

    return run
