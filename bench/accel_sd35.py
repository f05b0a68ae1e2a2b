"""The pod's speed-ups on SD3.5-Medium, each against eager in the same process (GPU only).

Every variant is what :mod:`imagefleet.inference_pod.acceleration` does to a pod's pipeline,
applied in order to one loaded pipeline (synthetic weights, bf16, 1024x1024, 28 steps, guidance
4.5), timed with the device synchronised, best of ``--repeats``:

1. ``eager`` -- the baseline: the pipeline as loaded.
2. ``fused`` -- :func:`fuse_qkv` (one product for Q, K, V per stream), still eager.
3. ``blocks`` -- then :func:`compile_blocks` (default mode): first-call (compile) seconds at
   each batch size, then seconds per image.
4. ``fast-<policy>-<value>`` -- then the fast tier's :class:`StepCache` (``schedule:<interval>``
   or ``threshold:<t>``): seconds per image, the steps that ran all blocks, and the difference
   from the lossless tier.
5. ``vae-compiled`` -- the VAE decoder compiled, against the eager decode.

For each: the max and mean absolute difference of decoded images from eager on the same seeds
(0..255). ``--warm-start`` runs a second process with the same compile-cache directory and
reports its first-call seconds: what a restarted pod pays.

    python -m bench.accel_sd35 [--batch-sizes 1,2,4] [--fast schedule:2,schedule:3,threshold:0.1] [--cache-dir D]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

from bench.profile_sd35 import STEPS, build, decode, emit, latents, timed


def images(pipe: Any, seeds: int) -> list[torch.Tensor]:
    return [decode(pipe, latents(pipe, s)).float() for s in range(seeds)]


def diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict[str, float]:
    d = [(x - y).abs() for x, y in zip(a, b, strict=True)]
    return {
        "max_abs_diff": float(max(t.max() for t in d)),
        "mean_abs_diff": round(float(sum(t.mean() for t in d) / len(d)), 4),
    }


def per_image(pipe: Any, batch: int, repeats: int) -> tuple[float, float]:
    """(first call seconds, best of ``repeats`` seconds per image) for ``batch`` images' latents."""
    _, first = timed(lambda: latents(pipe, 0, batch))
    best = min(timed(lambda: latents(pipe, 0, batch))[1] for _ in range(repeats))
    return first, best / batch


class Counter:
    """Counts calls of the second block: the steps that ran all blocks."""

    def __init__(self, block: Any) -> None:
        self.calls = 0
        inner = block.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return inner(*args, **kwargs)

        block.forward = forward


def warm_start(args: argparse.Namespace) -> int:
    from imagefleet.inference_pod import acceleration as acc

    acc.use_compile_cache(args.cache_dir)
    pipe = build()
    acc.fuse_qkv(pipe.transformer)
    acc.compile_blocks(pipe.transformer)
    _, first = timed(lambda: latents(pipe, 0))
    _, again = timed(lambda: latents(pipe, 0))
    emit({"event": "warm_start", "first_call_s": round(first, 2), "second_call_s": round(again, 3)})
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-sizes", default="1,2,4")
    parser.add_argument("--fast", default="schedule:2,schedule:3,schedule:4,threshold:0.1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--warm-start", action="store_true", help="also time a restarted process")
    parser.add_argument("--warm-start-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cache_dir is None:
        args.cache_dir = tempfile.mkdtemp(prefix="imagefleet-compile-")
    if args.warm_start_only:
        return warm_start(args)
    from imagefleet.inference_pod import acceleration as acc

    acc.use_compile_cache(args.cache_dir)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    rows: list[dict[str, Any]] = []

    def row(variant: str, **fields: Any) -> None:
        record = {"event": "variant", "variant": variant, **fields}
        emit(record)
        rows.append(record)

    start = time.perf_counter()
    pipe = build()
    emit(
        {
            "event": "build",
            "seconds": round(time.perf_counter() - start, 1),
            "card": torch.cuda.get_device_name(),
        }
    )
    latents(pipe, 0)
    reference = images(pipe, args.seeds)
    for b in sizes:
        _, s = per_image(pipe, b, args.repeats)
        row("eager", batch=b, s_per_image=round(s, 4))
    lat = latents(pipe, 0)
    _, eager_decode = timed(lambda: decode(pipe, lat))

    fused = acc.fuse_qkv(pipe.transformer)
    _, s = per_image(pipe, 1, args.repeats)
    row(
        "fused",
        batch=1,
        s_per_image=round(s, 4),
        fused_attentions=fused,
        **diff(images(pipe, args.seeds), reference),
    )

    acc.compile_blocks(pipe.transformer)
    lossless: list[torch.Tensor] = []
    for b in sizes:
        first, s = per_image(pipe, b, args.repeats)
        extra = {}
        if b == 1:
            lossless = images(pipe, args.seeds)
            extra = diff(lossless, reference)
        row("blocks", batch=b, first_call_s=round(first, 1), s_per_image=round(s, 4), **extra)

    counter = Counter(acc.blocks_of(pipe.transformer)[1])
    for variant in args.fast.split(","):
        policy, _, value = variant.partition(":")
        if policy == "schedule":
            cache = acc.StepCache(pipe.transformer, policy=policy, interval=int(value))
        else:
            cache = acc.StepCache(pipe.transformer, policy=policy, threshold=float(value))
        with cache.active():
            latents(pipe, 0)
        counter.calls = 0
        with cache.active():
            _, s = timed(lambda: latents(pipe, 0))
        full_steps = counter.calls
        best = s
        for _ in range(args.repeats - 1):
            with cache.active():
                best = min(best, timed(lambda: latents(pipe, 0))[1])
        fast = []
        for seed in range(args.seeds):
            with cache.active():
                fast.append(decode(pipe, latents(pipe, seed)).float())
        row(
            f"fast-{policy}-{value}",
            batch=1,
            s_per_image=round(best, 4),
            full_steps=full_steps,
            steps=STEPS,
            vs_lossless=diff(fast, lossless),
            **diff(fast, reference),
        )
        cache.remove()

    decoder = pipe.vae.decoder
    decoder.forward = torch.compile(decoder.forward, fullgraph=False, dynamic=False)
    _, first = timed(lambda: decode(pipe, lat))
    best = min(timed(lambda: decode(pipe, lat))[1] for _ in range(args.repeats))
    row(
        "vae-compiled",
        batch=1,
        first_call_s=round(first, 1),
        decode_s=round(best, 4),
        eager_decode_s=round(eager_decode, 4),
    )

    if args.warm_start:
        del pipe
        torch.cuda.empty_cache()
        cmd = [sys.executable, "-m", "bench.accel_sd35", "--warm-start-only", "--cache-dir", args.cache_dir]
        started = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), check=False)
        for line in out.stdout.splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                record["process_s"] = round(time.perf_counter() - started, 1)
                emit(record)
        if out.returncode:
            emit({"event": "warm_start", "error": out.stderr[-2000:]})

    base = {r["batch"]: r["s_per_image"] for r in rows if r["variant"] == "eager"}
    print("variant             batch  first s  s/image   img/h  vs eager  max|d|  mean|d|")
    for r in rows:
        s = r.get("s_per_image")
        if s is None:
            continue
        ratio = base.get(r["batch"], base[1]) / s
        print(
            f"{r['variant']:<19} {r['batch']:>5} {r.get('first_call_s', 0):>8.1f} {s:>8.3f} {3600 / s:>7.0f} "
            f"{ratio:>9.3f} {r.get('max_abs_diff', 0):>7.1f} {r.get('mean_abs_diff', 0):>8.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
