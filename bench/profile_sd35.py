"""Where one SD3.5-Medium image's time goes, and what the first lossless speed-ups buy (GPU only).

One process, one card, every variant measured in the same run against eager:

1. **Stages of one eager image** (batch 1, 1024x1024, 28 steps, guidance 4.5, bf16): prompt
   encoding (CLIP-L, CLIP-G, T5-XXL), the denoising loop (28 CFG transformer calls), VAE decode,
   PNG encode, base64 -- each timed with the device synchronised around it.
2. **Inside the transformer**: ``torch.profiler`` over one CFG step, CUDA time grouped into
   matrix products, attention, normalisation and modulation, elementwise, other.
3. **Variants** of the denoising loop (latents only, then the same decode for all):
   eager; each of the 24 ``transformer_blocks`` compiled (``fullgraph=True, dynamic=False``);
   the same with ``mode="max-autotune-no-cudagraphs"``; the attention backend forced to
   flash / cuDNN / efficient through ``torch.nn.attention.sdpa_kernel``. For each: seconds per
   image at batch 1 (best of 3), first-call (compile) seconds, and the max / mean absolute
   difference of the decoded images from eager on the same seeds (0..255 scale).

    python -m bench.profile_sd35 [--variants eager,blocks,blocks-autotune,flash,cudnn,efficient]

Prints one JSON line per measurement and a table last.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

PROMPT = "a lighthouse at dusk, oil painting"
STEPS, GUIDANCE, SIZE = 28, 4.5, 1024


def sync() -> None:
    torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def build() -> Any:
    from imagefleet.inference_pod import synthetic

    pipe = synthetic.build("sd3.5-medium", "cuda", torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(pipe: Any, seed: int, batch: int = 1) -> torch.Tensor:
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]
    with torch.inference_mode():
        out = pipe(
            prompt=[PROMPT] * batch,
            height=SIZE,
            width=SIZE,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            generator=generators,
            output_type="latent",
        )
    return out.images


def decode(pipe: Any, lat: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        x = (lat / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
        image = pipe.vae.decode(x, return_dict=False)[0]
        return ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def stages(pipe: Any) -> dict[str, float]:
    """One eager image, stage by stage."""
    from PIL import Image

    with torch.inference_mode():
        _embeddings, encode_s = timed(
            lambda: pipe.encode_prompt(
                prompt=PROMPT, prompt_2=None, prompt_3=None, do_classifier_free_guidance=True
            )
        )
    lat, loop_s = timed(lambda: latents(pipe, 0))
    pixels, decode_s = timed(lambda: decode(pipe, lat))
    array = pixels[0].permute(1, 2, 0).cpu().numpy()
    start = time.perf_counter()
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    png_s = time.perf_counter() - start
    start = time.perf_counter()
    b64 = base64.b64encode(buf.getvalue())
    b64_s = time.perf_counter() - start
    return {
        "encode_prompt_s": round(encode_s, 4),
        "denoise_loop_incl_encode_s": round(loop_s, 4),
        "vae_decode_s": round(decode_s, 4),
        "png_encode_s": round(png_s, 4),
        "base64_s": round(b64_s, 4),
        "png_mb": round(len(buf.getvalue()) / 1e6, 2),
        "b64_mb": round(len(b64) / 1e6, 2),
    }


CATEGORIES = (
    ("attention", ("flash", "attention", "fmha", "sdpa", "cudnn_sdp", "efficient")),
    ("matmul", ("gemm", "matmul", "mm", "sm90_xmma", "cutlass", "nvjet", "addmm", "linear")),
    ("norm_modulation", ("layer_norm", "layernorm", "rms", "norm")),
    ("elementwise", ("elementwise", "vectorized", "mul", "add", "silu", "gelu", "copy", "cat")),
)


def transformer_breakdown(pipe: Any) -> dict[str, Any]:
    """CUDA time of one CFG transformer call, grouped by kernel kind."""
    t = pipe.transformer
    dev = "cuda"
    hidden = torch.randn(2, 16, SIZE // 8, SIZE // 8, device=dev, dtype=torch.bfloat16)
    enc = torch.randn(2, 333, 4096, device=dev, dtype=torch.bfloat16)
    pooled = torch.randn(2, 2048, device=dev, dtype=torch.bfloat16)
    step = torch.tensor([500.0, 500.0], device=dev)

    def call() -> Any:
        with torch.inference_mode():
            return t(
                hidden_states=hidden, encoder_hidden_states=enc, pooled_projections=pooled, timestep=step
            )

    for _ in range(3):
        call()
    _, one = timed(call)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        sync()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
        if not us or event.key.startswith("aten::") or event.key.startswith("cuda"):
            continue
        name = event.key.lower()
        kind = next((k for k, words in CATEGORIES if any(w in name for w in words)), "other")
        totals[kind] += us / 1e3
    top = sorted(
        (
            (e.key[:90], round((getattr(e, "device_time_total", 0) or 0) / 1e3, 3))
            for e in prof.key_averages()
        ),
        key=lambda kv: -kv[1],
    )[:12]
    return {"cfg_call_s": round(one, 4), "kernel_ms": {k: round(v, 2) for k, v in totals.items()}, "top": top}


def per_image(pipe: Any, repeats: int = 3) -> tuple[float, float]:
    """(first call seconds, best of ``repeats`` seconds) for one image's latents."""
    _, first = timed(lambda: latents(pipe, 0))
    best = min(timed(lambda: latents(pipe, 0))[1] for _ in range(repeats))
    return first, best


def compile_blocks(pipe: Any, mode: str | None) -> None:
    for block in pipe.transformer.transformer_blocks:
        block.compile(fullgraph=True, dynamic=False, mode=mode)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", default="eager,flash,cudnn,efficient,blocks,blocks-autotune")
    parser.add_argument("--seeds", type=int, default=2, help="images compared against eager")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]

    start = time.perf_counter()
    pipe = build()
    emit(
        {
            "event": "build",
            "seconds": round(time.perf_counter() - start, 1),
            "card": torch.cuda.get_device_name(),
        }
    )
    latents(pipe, 0)  # warm-up
    emit({"event": "stages", **stages(pipe)})
    emit({"event": "transformer", **transformer_breakdown(pipe)})

    reference = [decode(pipe, latents(pipe, s)).float() for s in range(args.seeds)]
    rows = []
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}  # fmt: skip
    for variant in variants:
        try:
            if variant in backends:
                with sdpa_kernel([backends[variant]]):
                    first, best = per_image(pipe)
                    images = [decode(pipe, latents(pipe, s)).float() for s in range(args.seeds)]
            else:
                if variant == "blocks":
                    compile_blocks(pipe, None)
                elif variant == "blocks-autotune":
                    torch._dynamo.reset()
                    compile_blocks(pipe, "max-autotune-no-cudagraphs")
                first, best = per_image(pipe)
                images = [decode(pipe, latents(pipe, s)).float() for s in range(args.seeds)]
        except Exception as exc:  # a variant that does not run here is a result too
            emit({"event": "variant", "variant": variant, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            continue
        diffs = [(a - b).abs() for a, b in zip(images, reference, strict=True)]
        row = {
            "event": "variant",
            "variant": variant,
            "first_call_s": round(first, 2),
            "s_per_image_latents": round(best, 4),
            "images_per_hour_latents": round(3600 / best, 1),
            "max_abs_diff": float(max(d.max() for d in diffs)),
            "mean_abs_diff": round(float(sum(d.mean() for d in diffs) / len(diffs)), 4),
        }
        emit(row)
        rows.append(row)
    base = next((r["s_per_image_latents"] for r in rows if r["variant"] == "eager"), None)
    print("variant          first s   s/image   img/h   vs eager  max|d|  mean|d|")
    for r in rows:
        ratio = f"{base / r['s_per_image_latents']:.3f}" if base else "-"
        print(
            f"{r['variant']:<16} {r['first_call_s']:>7.1f} {r['s_per_image_latents']:>9.3f} "
            f"{r['images_per_hour_latents']:>7.0f} {ratio:>9} {r['max_abs_diff']:>7.1f} {r['mean_abs_diff']:>8.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
