"""SD3.5-Medium's hot kernels alone, at the transformer's shapes: what a lossless rewrite could buy.

Two groups, each timed as the mean of ``--repeats`` calls after one untimed call, device
synchronised, at CFG batch 2 (one image) and 8 (four images):

* ``attention`` -- FlashAttention-4's SM90 forward (the pod's ``--attention fa4``) at its default
  tile (192 x 128, register-held P, intra-warpgroup overlap) and at other tiles it accepts, over
  the 4,429 joint and the 4,096 image-only tokens (24 heads of 64). 4,429 tokens fill 24 tiles of
  192 rows with the last one 13 rows deep, 35 tiles of 128 rows 77 deep: the tile decides how much
  work is padding. TFLOP/s and the largest difference from float32 attention.
* ``mlp`` -- the feed-forward's first matrix product and its tanh GELU (1,536 -> 6,144, bias):
  as two kernels (eager), as Inductor makes it (default mode: cuBLAS, then a fused Triton GELU),
  and as one cuBLASLt call with the GELU in its epilogue (the pod's ``--fuse-gelu``:
  ``acceleration.linear_gelu_tanh``); the matrix product alone as the floor. Differences from the
  float32 result, and which GELU form (tanh or erf) the epilogue computes, in float32.

    python -m bench.kernels_sd35 [--groups attention,mlp] [--batches 2,8]
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import main_guard
from bench.profile_sd35 import emit

HEADS, HEAD_DIM, HIDDEN, MLP = 24, 64, 1536, 6144
TOKENS = (4429, 4096)
FA4_TILES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("default", {}),
    ("128x128", {"tile_mn": (128, 128)}),
    ("128x176", {"tile_mn": (128, 176)}),
    ("128x192", {"tile_mn": (128, 192)}),
    ("192x144", {"tile_mn": (192, 144)}),
    ("192x192", {"tile_mn": (192, 192)}),
    ("192x128-smem-p", {"tile_mn": (192, 128), "mma_pv_is_rs": False}),
    ("192x128-no-overlap", {"tile_mn": (192, 128), "intra_wg_overlap": False}),
)


def mean_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def attention(batches: list[int], repeats: int) -> Iterator[dict[str, Any]]:
    from flash_attn.cute.interface import _flash_attn_fwd

    for batch in batches:
        for tokens in TOKENS:
            g = torch.Generator("cuda").manual_seed(0)
            q, k, v = (
                torch.randn(batch, tokens, HEADS, HEAD_DIM, device="cuda", generator=g, dtype=torch.bfloat16)
                for _ in "qkv"
            )
            exact = F.scaled_dot_product_attention(*(t.transpose(1, 2).float() for t in (q, k, v))).transpose(
                1, 2
            )
            flops = 4 * batch * HEADS * tokens * tokens * HEAD_DIM
            for name, options in FA4_TILES:
                try:
                    out = _flash_attn_fwd(q, k, v, **options)[0]
                    seconds = mean_seconds(functools.partial(_flash_attn_fwd, q, k, v, **options), repeats)
                    yield {
                        "group": "attention",
                        "kernel": f"fa4-{name}",
                        "batch": batch,
                        "tokens": tokens,
                        "ms": round(seconds * 1e3, 3),
                        "tflops": round(flops / seconds / 1e12, 1),
                        "max_abs_diff_fp32": float((out.float() - exact).abs().max()),
                    }
                except Exception as exc:  # a tile the kernel refuses is a result too
                    yield {
                        "group": "attention",
                        "kernel": f"fa4-{name}",
                        "batch": batch,
                        "tokens": tokens,
                        "error": f"{type(exc).__name__}: {str(exc)[:300]}",
                    }


def mlp(batches: list[int], repeats: int) -> Iterator[dict[str, Any]]:
    from imagefleet.inference_pod import acceleration as acc

    g = torch.Generator("cuda").manual_seed(0)
    weight = torch.randn(MLP, HIDDEN, device="cuda", generator=g, dtype=torch.bfloat16) / HIDDEN**0.5
    bias = torch.randn(MLP, device="cuda", generator=g, dtype=torch.bfloat16) * 0.1

    def eager(x: torch.Tensor) -> torch.Tensor:
        return F.gelu(F.linear(x, weight, bias), approximate="tanh")

    compiled = torch.compile(eager, dynamic=False)
    runs: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "linear-alone": lambda x: F.linear(x, weight, bias),
        "eager": eager,
        "compiled": compiled,
        "gelu-epilogue": lambda x: acc.linear_gelu_tanh(x, weight, bias),
    }
    # which GELU the epilogue computes: in float32 the tanh and erf forms differ by up to 5e-4
    x32 = torch.randn(4096, HIDDEN, device="cuda", generator=g)
    w32, b32 = weight.float(), bias.float()
    ours = torch._addmm_activation(b32, x32, w32.t(), use_gelu=True)
    product = F.linear(x32, w32, b32)
    yield {
        "group": "mlp",
        "kernel": "gelu-epilogue-form",
        "max_abs_diff_from_tanh_fp32": float((ours - F.gelu(product, approximate="tanh")).abs().max()),
        "max_abs_diff_from_erf_fp32": float((ours - F.gelu(product)).abs().max()),
    }
    for batch in batches:
        rows = batch * (TOKENS[0])
        x = torch.randn(rows, HIDDEN, device="cuda", generator=g, dtype=torch.bfloat16)
        exact = F.gelu(F.linear(x.float(), weight.float(), bias.float()), approximate="tanh")
        flops = 2 * rows * HIDDEN * MLP
        for name, run in runs.items():
            try:
                out = run(x)
                seconds = mean_seconds(functools.partial(run, x), repeats)
                record: dict[str, Any] = {
                    "group": "mlp",
                    "kernel": name,
                    "batch": batch,
                    "rows": rows,
                    "ms": round(seconds * 1e3, 4),
                    "tflops": round(flops / seconds / 1e12, 1),
                }
                if name != "linear-alone":
                    record["max_abs_diff_fp32"] = float((out.float() - exact).abs().max())
                    record["mean_abs_diff_fp32"] = float((out.float() - exact).abs().mean())
                yield record
            except Exception as exc:
                yield {
                    "group": "mlp",
                    "kernel": name,
                    "batch": batch,
                    "error": f"{type(exc).__name__}: {exc}",
                }


GROUPS = {"attention": attention, "mlp": mlp}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--groups", default="attention,mlp")
    parser.add_argument("--batches", default="2,8", help="CFG batch sizes (2 per image)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    batches = [int(b) for b in args.batches.split(",")]
    emit({"event": "card", "card": torch.cuda.get_device_name(), "torch": torch.__version__})
    for group in args.groups.split(","):
        for record in GROUPS[group](batches, args.repeats):
            emit({"event": "kernel", **record})
    return 0


if __name__ == "__main__":
    main_guard(main)
