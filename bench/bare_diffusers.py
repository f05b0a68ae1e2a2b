"""The baseline every serving benchmark is compared with: bare diffusers, no HTTP, no queue.

The pipeline is built by the pod's own loader (:func:`imagefleet.inference_pod.models.load`, which
calls :func:`imagefleet.inference_pod.synthetic.build` for ``synthetic:<arch>``), so bare and
served runs use the same weights, dtype, device and attention kernels. Each call mirrors what the
pod's GPU worker does for a batch -- the same prompts, one CPU ``torch.Generator`` per sample,
``output_type="pil"``, inference mode -- but without the serving layer around it: no queue,
no step callback, no PNG encoding, no HTTP. The time of one batch is the wall time of the call
with the device synchronised at both ends.

Importable (``load``, ``measure``, ``run``) and runnable::

    python -m bench.bare_diffusers --model synthetic:sd3.5-medium --batch-sizes 1,2,4,8 --batches 2
"""

from __future__ import annotations

import argparse
import gc
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from bench import common


@dataclass(frozen=True)
class BareResult:
    """Timed pipeline calls of one batch size."""

    batch: int
    steps: int
    size: str
    seconds: list[float]

    @property
    def mean_s(self) -> float:
        return sum(self.seconds) / len(self.seconds)

    @property
    def images_per_hour(self) -> float:
        return 3600.0 * self.batch / self.mean_s

    def record(self) -> dict[str, Any]:
        return {
            "event": "bare",
            **asdict(self),
            "seconds": [round(s, 4) for s in self.seconds],
            "mean_s": round(self.mean_s, 4),
            "best_s": round(min(self.seconds), 4),
            "images_per_hour": round(self.images_per_hour, 1),
        }


def load(model: str, device: str = "auto", dtype: str = "auto") -> Any:
    """The text-to-image pipeline exactly as a pod with these settings would load it."""
    from imagefleet.inference_pod import models
    from imagefleet.settings import PodSettings

    return models.load(
        PodSettings(
            model=model,
            device=device,
            dtype=dtype,
            warmup=False,
            compile="off",
            fuse_projections=False,
            attention="sdpa",
        )
    ).text2img


def _synchronize(pipe: Any) -> None:
    device = getattr(pipe, "device", torch.device("cpu"))
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_batch(
    pipe: Any,
    batch: int,
    *,
    steps: int,
    size: tuple[int, int],
    guidance: float,
    seed: int = 0,
    output_type: str = "pil",
) -> Any:
    """One pipeline call of ``batch`` samples, as the pod's worker makes it; returns its images."""
    prompts = [common.PROMPTS[i % len(common.PROMPTS)] for i in range(batch)]
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]
    width, height = size
    with torch.inference_mode():
        result = pipe(
            prompt=prompts,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=height,
            width=width,
            generator=generators,
            output_type=output_type,
        )
    _synchronize(pipe)
    return result.images


def measure(
    pipe: Any,
    batch: int,
    *,
    steps: int,
    size: tuple[int, int],
    guidance: float,
    batches: int,
    warmup_steps: int = 2,
) -> BareResult:
    """Warm up once (a short call of the same shapes), then time ``batches`` full calls."""
    run_batch(pipe, batch, steps=min(steps, warmup_steps), size=size, guidance=guidance)
    seconds = []
    for i in range(batches):
        started = time.perf_counter()
        run_batch(pipe, batch, steps=steps, size=size, guidance=guidance, seed=1000 * (i + 1))
        seconds.append(time.perf_counter() - started)
    return BareResult(batch=batch, steps=steps, size=common.size_text(size), seconds=seconds)


def check_output(pipe: Any, *, size: tuple[int, int], guidance: float) -> dict[str, Any]:
    """A two-step image as numbers: finite, not constant (random weights must not give NaNs)."""
    images = run_batch(pipe, 1, steps=2, size=size, guidance=guidance, output_type="np")
    array = torch.from_numpy(images)
    return {
        "event": "output_check",
        "finite": bool(torch.isfinite(array).all()),
        "std": round(float(array.std()), 4),
        "mean": round(float(array.mean()), 4),
        "shape": list(array.shape),
    }


def release_memory() -> None:
    """Return freed device memory to the driver, so pod processes get the whole card.

    Call it after the last reference to the pipeline is gone (``del pipe``).
    """
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(
    results: common.Results,
    *,
    model: str,
    batch_sizes: list[int],
    steps: int,
    size: tuple[int, int],
    guidance: float,
    batches: int,
    check: bool = True,
) -> dict[int, BareResult]:
    """Load, optionally check the output, time every batch size, free the card; emit each result."""
    started = time.perf_counter()
    pipe = load(model)
    memory = torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else None
    results.emit(
        {"event": "bare_loaded", "seconds": round(time.perf_counter() - started, 1), "gpu_gib": memory}
    )
    if check:
        results.emit(check_output(pipe, size=size, guidance=guidance))
    measured = {}
    for batch in batch_sizes:
        measured[batch] = measure(pipe, batch, steps=steps, size=size, guidance=guidance, batches=batches)
        results.emit(measured[batch].record())
    del pipe
    release_memory()
    return measured


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_model_args(parser)
    parser.add_argument("--batch-sizes", type=common.parse_int_list, default=[1, 2, 4, 8])
    parser.add_argument(
        "--batches", type=int, default=2, help="timed calls per batch size (after one warm-up)"
    )
    args = parser.parse_args(argv)
    results = common.Results("bare_diffusers")
    results.emit(common.environment(args.model))
    measured = run(
        results,
        model=args.model,
        batch_sizes=args.batch_sizes,
        steps=args.steps,
        size=args.size,
        guidance=args.guidance,
        batches=args.batches,
    )
    rows = [(b, r.mean_s, min(r.seconds), r.mean_s / b, r.images_per_hour) for b, r in measured.items()]
    print(common.table(["batch", "s/batch", "best s", "s/image", "img/h"], rows))
    return 0


if __name__ == "__main__":
    common.main_guard(main)
