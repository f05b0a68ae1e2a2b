"""SD3.5-Medium's VAE decode alone, at 1024x1024: what the pod's decode costs per batch, and what
cuDNN's algorithm search and the channels-last layout buy.

The pod decodes each finished batch on the GPU thread, between two batches' denoising loops: at
batch 4 that is the largest piece of its per-batch work outside the transformer. Each variant
decodes the same random latents (``--batch`` images) and makes 8-bit pixels of them as the pod's
worker does (``VaeImageProcessor.denormalize``, then ``worker.pixels``, which copies them to the
host); each is timed as the best of ``--repeats`` calls after two untimed ones, and its images
(0..255) are compared with eager's:

* ``eager`` -- the decoder as diffusers runs it (NCHW, cuDNN's heuristic algorithm choice)
* ``-cl`` -- the decoder's weights in channels-last (NHWC), the layout Hopper's cuDNN kernels prefer;
  ``-cl-bench`` is the pod's ``--tune-decoder`` (``acceleration.tune_decoder``)
* ``-bench`` -- ``torch.backends.cudnn.benchmark``: cuDNN times its algorithms once per shape
* ``compiled`` -- the decoder's forward through ``torch.compile`` as the pod does
  (``acceleration.compile_decoder``); Inductor may pick channels-last itself

    python -m bench.vae_sd35 [--variants eager,compiled,compiled-bench] [--batch 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch

from bench.common import main_guard
from bench.profile_sd35 import emit

VARIANTS = (
    "eager",
    "eager-cl",
    "eager-bench",
    "eager-cl-bench",
    "compiled",
    "compiled-bench",
    "compiled-cl-bench",
)


def build_vae() -> Any:
    from diffusers import AutoencoderKL

    from imagefleet.inference_pod import synthetic

    with torch.device("meta"):
        vae = AutoencoderKL(**synthetic.SD3_VAE)
    return synthetic.materialise(vae, torch.device("cuda"), torch.bfloat16, seed=0)


def run_variant(name: str, latents: torch.Tensor, repeats: int) -> tuple[dict[str, Any], np.ndarray]:
    from diffusers.image_processor import VaeImageProcessor

    from imagefleet.inference_pod import acceleration, worker

    torch._dynamo.reset()
    torch.backends.cudnn.benchmark = "bench" in name.split("-")
    channels_last = "cl" in name.split("-")
    vae = build_vae()
    if channels_last:
        vae = vae.to(memory_format=torch.channels_last)
    if name.startswith("compiled"):
        acceleration.compile_decoder(vae)
    scaled = latents / vae.config.scaling_factor + vae.config.shift_factor

    def once() -> np.ndarray:
        with torch.inference_mode():
            return np.stack(worker.pixels(VaeImageProcessor.denormalize(vae.decode(scaled).sample)))

    started = time.perf_counter()
    once()
    torch.cuda.synchronize()
    first = time.perf_counter() - started
    once()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        pixels = once()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    record = {
        "variant": name,
        "batch": latents.shape[0],
        "first_s": round(first, 2),
        "best_s": round(min(times), 4),
    }
    record["mean_s"] = round(sum(times) / len(times), 4)
    return record, pixels


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--variants", default="eager,eager-cl-bench,compiled,compiled-bench,compiled-cl-bench"
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=1024, help="image side; the latents are side / 8")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    names = [v for v in args.variants.split(",") if v]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    emit({"event": "env", "torch": torch.__version__, "device": torch.cuda.get_device_name()})
    generator = torch.Generator(device="cuda").manual_seed(0)
    side = args.size // 8
    latents = torch.randn(
        (args.batch, 16, side, side), generator=generator, device="cuda", dtype=torch.bfloat16
    )
    reference = None
    for name in names:
        record, pixels = run_variant(name, latents, args.repeats)
        if reference is None:
            reference = pixels
            record["reference"] = name
        diff = np.abs(pixels.astype(np.int16) - reference.astype(np.int16))
        record["max_abs_diff"] = int(diff.max())
        record["mean_abs_diff"] = round(float(diff.mean()), 4)
        emit(record)


if __name__ == "__main__":
    main_guard(main)
