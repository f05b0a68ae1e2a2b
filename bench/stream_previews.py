"""What streaming a sample's partial images costs the batch it runs in.

Runs the pod's own batch runner (:func:`imagefleet.inference_pod.worker.execute`, with the pod's
preview tap on every batch) on one GPU thread, as the pod does, alternating two kinds of batch of
``--batch`` samples:

* **plain** -- no sample is streamed (the tap looks and finds no watch);
* **streamed** -- the first sample streams ``--partial-images`` previews: the tap reports its
  progress after every step and copies its latent slice off the GPU at the preview steps.

The batch's pipeline time, plain against streamed, is what the other samples of the batch pay for
one streaming neighbour. Rendering a preview (projection, resize to the image size, PNG, base64)
happens on the CPU pool, off the GPU thread; its time is reported separately.

GPU run (figures in docs/reliability.md)::

    python -m bench.stream_previews --model synthetic:sd3.5-medium --batch 4 --repeats 5

CPU smoke test::

    python -m bench.stream_previews --model tiny --size 64x64 --steps 8 --batch 2 --repeats 2
"""

from __future__ import annotations

import argparse
import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from bench import common
from imagefleet import settings
from imagefleet.inference_pod import models, previews, worker
from imagefleet.inference_pod.batching import CompatKey, Sample
from imagefleet.inference_pod.previews import PreviewTap, Watch, Watches
from imagefleet.inference_pod.worker import BatchRun
from imagefleet.settings import PodSettings


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_model_args(parser)
    parser.add_argument("--batch", type=int, default=4, help="samples per batch")
    parser.add_argument("--partial-images", type=int, default=3, help="previews of the streamed sample")
    parser.add_argument("--repeats", type=int, default=5, help="batches of each kind (after one warm-up)")
    return parser.parse_args()


async def run(args: argparse.Namespace) -> int:
    results = common.Results("stream_previews")
    results.emit(common.environment(args.model))
    pod_settings = settings.load(PodSettings, env={}, model=args.model)
    gpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu")
    cpu = ThreadPoolExecutor(max_workers=2, thread_name_prefix="encode")
    loop = asyncio.get_running_loop()
    model = await loop.run_in_executor(gpu, models.load, pod_settings)
    decoder = await loop.run_in_executor(gpu, previews.decoder_for, model.info.family, model.text2img)
    watches = Watches()
    tap = PreviewTap(watches, decoder, cpu)
    key = CompatKey.of("generate", size=args.size, steps=args.steps, guidance=args.guidance)
    times: dict[str, list[float]] = {"plain": [], "streamed": []}
    partials = 0
    for i in range(args.repeats + 1):
        for kind in ("plain", "streamed"):
            job = f"{kind}-{i}"
            samples = [
                Sample(key, f"{job}-{s}", s, common.PROMPTS[s % 4], None, s, 0.0) for s in range(args.batch)
            ]
            watch = None
            if kind == "streamed":
                watch = watches.open(Watch(samples[0].job_id, args.partial_images, args.size, "png", None))
            batch = BatchRun(key=key, samples=samples)
            batch.latent_hooks.append(tap)
            outcome = await loop.run_in_executor(gpu, worker.execute, model, batch)
            assert outcome.error is None and outcome.timings, outcome.error
            if watch is not None:
                rendered = [await f for f in watch.partials]
                partials += len(rendered) if i else 0
                watches.close(watch.job_id)
            if i:  # the first round warms up
                times[kind].append(sum(t for _, t in outcome.timings))
    render_s: list[float] = []
    if decoder is not None:
        latent = previews.capture(torch.randn(1, decoder.channels, args.size[1] // 8, args.size[0] // 8), 0)
        for _ in range(5):
            started = time.perf_counter()
            previews.render(latent, decoder, args.size, "png", None)
            render_s.append(time.perf_counter() - started)
    plain, streamed = common.summary(times["plain"]), common.summary(times["streamed"])
    record = {
        "event": "result",
        "model": args.model,
        "size": common.size_text(args.size),
        "steps": args.steps,
        "batch": args.batch,
        "partial_images": args.partial_images,
        "partials_per_streamed_batch": partials / args.repeats,
        "plain_batch_s": plain,
        "streamed_batch_s": streamed,
        "overhead": round(streamed["median"] / plain["median"] - 1, 4),
        "render_s_on_cpu": common.summary(render_s) if render_s else None,
        "decoder": type(decoder).__name__ if decoder is not None else None,
    }
    results.emit(record)
    print(
        common.table(
            ["batch", "plain s (median)", "streamed s (median)", "overhead", "render s (cpu)"],
            [
                [
                    args.batch,
                    plain["median"],
                    streamed["median"],
                    f"{record['overhead']:+.2%}",
                    record["render_s_on_cpu"]["median"] if render_s else "-",
                ]
            ],
        )
    )
    gpu.shutdown()
    cpu.shutdown()
    return 0


def main() -> int:
    return asyncio.run(run(parse()))


if __name__ == "__main__":
    common.main_guard(main)
