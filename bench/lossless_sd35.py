"""Beyond compiled blocks: what else buys lossless speed on SD3.5-Medium (GPU; CPU smoke).

Every variant is measured in one process against eager (the baseline, same run) and against the
pod's current lossless tier (fused QKV + the 24 blocks compiled one by one), at batch 1 (and the
batch sizes of ``--batch-sizes``), latents only, best of ``--repeats``, device synchronised. For
each, the max / mean absolute difference of the decoded images from eager on the same seeds
(0..255). Variants, each from a clean compile (``torch._dynamo.reset()``):

* ``blocks`` -- the pod's lossless tier today (the reference for the others);
* ``blocks-flash`` / ``blocks-cudnn`` -- the same with SDPA forced to one fused kernel *inside the
  transformer only* (the text encoders' masked attention takes neither);
* ``blocks-fa4`` / ``whole-fa4`` -- the same with the fused joint attentions on FlashAttention-4
  (``flash-attn-4`` installed), as the pod's ``--attention fa4`` does; ``-gelu``: the
  feed-forwards' GELU in the epilogue of their first product (the pod's ``--fuse-gelu``);
  suffixes combine (``whole-graphs-fa4``, ``blocks-fa4-gelu``);
* ``whole`` -- the whole transformer compiled as one graph instead of block by block (fusion
  across block boundaries, no Python between blocks);
* ``whole-graphs`` / ``blocks-graphs`` -- the same in ``mode="reduce-overhead"`` (CUDA graphs:
  one replay per step or per block instead of hundreds of kernel launches);
* ``whole-freeze`` -- ``whole`` with Inductor's ``freezing`` (weights folded as constants) and
  coordinate-descent tuning of its generated kernels.

Then the text encoders (CLIP-L, CLIP-G, T5-XXL), which run once per request: eager, with the
empty negative prompt's embeddings computed once and reused (they never change), replayed as CUDA
graphs (the pod's ``--encoder-graphs``; GPU only), and with the encoders compiled
(``--encoders-only``: all but the compiled ones, and nothing else). Last, ``torch.profiler`` over one compiled CFG call, CUDA time by kernel kind
(``--profile-attention fa4``: with FlashAttention-4).

``--kernels`` first times the attention kernels alone at the transformer's two shapes (CFG batch 2,
24 heads of 64, 4,429 joint and 4,096 image tokens): each SDPA backend, and FlashAttention-4 where
installed, in TFLOP/s, with each one's largest difference from float32 attention.

    python -m bench.lossless_sd35 [--variants blocks,whole,...] [--batch-sizes 1,4]
    python -m bench.lossless_sd35 --arch sd3-tiny --device cpu --size 64 --steps 2 --repeats 1  # smoke
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from bench import profile_sd35 as prof

PROMPT = prof.PROMPT


class Setup:
    def __init__(self, args: argparse.Namespace) -> None:
        self.arch, self.device, self.size, self.steps = args.arch, args.device, args.size, args.steps
        self.graphs = False

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        self.sync()
        start = time.perf_counter()
        out = fn()
        self.sync()
        return out, time.perf_counter() - start

    def build(self) -> Any:
        from imagefleet.inference_pod import synthetic

        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        pipe = synthetic.build(self.arch, self.device, dtype)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def latents(self, pipe: Any, seed: int, batch: int = 1, **extra: Any) -> torch.Tensor:
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]
        callback = None
        if self.graphs:

            def callback(_pipe: Any, _step: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
                torch.compiler.cudagraph_mark_step_begin()
                return tensors

            torch.compiler.cudagraph_mark_step_begin()
        with torch.inference_mode():
            out = pipe(
                prompt=[PROMPT] * batch,
                height=self.size,
                width=self.size,
                num_inference_steps=self.steps,
                guidance_scale=prof.GUIDANCE,
                generator=generators,
                output_type="latent",
                callback_on_step_end=callback,
                **extra,
            )
        return out.images.clone()

    def per_image(self, pipe: Any, batch: int, repeats: int) -> tuple[float, float]:
        """(first call seconds, best of ``repeats`` seconds per image) at ``batch``."""
        _, first = self.timed(lambda: self.latents(pipe, 0, batch))
        best = min(self.timed(lambda: self.latents(pipe, 0, batch))[1] for _ in range(repeats))
        return first, best / batch

    def decode(self, pipe: Any, lat: torch.Tensor) -> torch.Tensor:
        return prof.decode(pipe, lat)

    def images(self, pipe: Any, seeds: int) -> list[torch.Tensor]:
        return [self.decode(pipe, self.latents(pipe, s)).float() for s in range(seeds)]


def diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict[str, float]:
    d = [(x - y).abs() for x, y in zip(a, b, strict=True)]
    return {
        "max_abs_diff": float(max(t.max() for t in d)),
        "mean_abs_diff": round(float(sum(t.mean() for t in d) / len(d)), 4),
    }


@contextmanager
def attention(transformer: Any, backend: str | None) -> Iterator[None]:
    """SDPA forced to ``backend`` around the transformer's calls only; ``fa4``: the fused joint
    attentions on FlashAttention-4, as the pod's ``--attention fa4`` does."""
    from imagefleet.inference_pod import acceleration as acc

    if backend is None:
        yield
        return
    if backend == "fa4":
        acc.use_attention(transformer, "fa4")
        try:
            yield
        finally:
            acc.use_attention(transformer, "sdpa")
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
    inner = transformer.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        with sdpa_kernel([chosen]):
            return inner(*args, **kwargs)

    transformer.forward = forward
    try:
        yield
    finally:
        del transformer.forward


def uncompile(transformer: Any) -> None:
    from imagefleet.inference_pod import acceleration as acc

    torch._dynamo.reset()
    for block in acc.blocks_of(transformer):
        block.__dict__.pop("forward", None)
    transformer.__dict__.pop("forward", None)


def gelu(transformer: Any, epilogue: bool) -> None:
    """The feed-forwards' GELU in the product's epilogue (the pod's ``--fuse-gelu``) or not."""
    from diffusers.models.activations import GELU

    from imagefleet.inference_pod import acceleration as acc

    if epilogue:
        acc.fuse_gelu(transformer)
        return
    for module in transformer.modules():
        if isinstance(module, GELU):
            module.__class__ = GELU


def apply(variant: str, transformer: Any) -> tuple[str | None, bool]:
    """Compile ``transformer`` for ``variant``; returns (attention backend, uses CUDA graphs)."""
    from imagefleet.inference_pod import acceleration as acc

    uncompile(transformer)
    import torch._inductor.config as inductor

    inductor.freezing = False
    inductor.coordinate_descent_tuning = False
    base, *extras = variant.split("-")
    # A backend forced from outside the compiled blocks is not part of their graphs: with the FX
    # graph cache on, a forced variant would get the code compiled for the default backend.
    inductor.fx_graph_cache = not {"flash", "cudnn"} & set(extras)
    graphs = "graphs" in extras
    mode = "reduce-overhead" if graphs else None
    if "freeze" in extras:
        inductor.freezing = True
        inductor.coordinate_descent_tuning = True
    gelu(transformer, "gelu" in extras)
    unknown = set(extras) - {"graphs", "freeze", "flash", "cudnn", "fa4", "gelu"}
    if unknown or base not in ("blocks", "whole"):
        raise ValueError(f"unknown variant {variant!r}")
    if base == "blocks":
        acc.compile_blocks(transformer, graphs=graphs)
    else:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        transformer.forward = torch.compile(transformer.forward, dynamic=False, mode=mode)
    backend = next((e for e in extras if e in ("flash", "cudnn", "fa4")), None)
    return backend, graphs


def kernels(device: str, repeats: int = 20) -> Iterator[dict[str, Any]]:
    """Each attention kernel alone at the transformer's shapes: TFLOP/s and difference from fp32."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from imagefleet.inference_pod import acceleration as acc

    F = torch.nn.functional

    def sdpa(backend: SDPBackend) -> Callable[..., torch.Tensor]:
        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)

        return run

    def fa4(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return acc.attend_fa4(q, k, v).transpose(1, 2)

    runs: dict[str, Callable[..., torch.Tensor]] = {
        "cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
        "flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
        "fa4": fa4,
    }
    for tokens in (4429, 4096):
        g = torch.Generator(device).manual_seed(0)
        q, k, v = (
            torch.randn(2, 24, tokens, 64, device=device, generator=g, dtype=torch.bfloat16) for _ in "qkv"
        )
        exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        flops = 4 * 2 * 24 * tokens * tokens * 64
        for name, run in runs.items():
            # FlashAttention-4 takes tokens before heads
            args = tuple(t.transpose(1, 2).contiguous() for t in (q, k, v)) if name == "fa4" else (q, k, v)
            try:
                out = run(*args)
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(repeats):
                    run(*args)
                torch.cuda.synchronize()
                seconds = (time.perf_counter() - start) / repeats
                yield {
                    "kernel": name,
                    "tokens": tokens,
                    "ms": round(seconds * 1e3, 3),
                    "tflops": round(flops / seconds / 1e12, 1),
                    "max_abs_diff_fp32": float((out.float() - exact).abs().max()),
                }
            except Exception as exc:  # a kernel that does not run here is a result too
                yield {"kernel": name, "tokens": tokens, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def graphed_encoders(
    setup: Setup, pipe: Any, batches: list[int], encode: Any, best: Any, reference: Any
) -> list[dict[str, Any]]:
    """The pod's ``--encoder-graphs``: each encoder replayed as a CUDA graph per batch size; the
    encoders' own forwards are put back afterwards."""
    from imagefleet.inference_pod import encodergraphs

    rows: list[dict[str, Any]] = []
    graphed = encodergraphs.graph_encoders(pipe, setup.device)
    if not graphed:
        return rows
    out = encode(1, None)
    with torch.inference_mode():
        empty = pipe.encode_prompt(
            prompt=[""], prompt_2=None, prompt_3=None, do_classifier_free_guidance=False
        )
    negative = (empty[0], empty[2])
    for batch in batches:
        _, first = setup.timed(functools.partial(encode, batch, negative))
        rows.append(
            {
                "variant": "encode-graphed-negative-reused",
                "batch": batch,
                "first_call_s": round(first, 2),
                "seconds": round(best(batch, negative), 4),
            }
        )
    captured = sum(
        len(getattr(pipe, name).forward.graphs)
        for name in encodergraphs.ENCODERS
        if getattr(pipe, name, None)
    )
    rows.append(
        {
            "variant": "encode-graphed",
            "graphs": captured,
            "identical_to_eager": encodergraphs.identical(out, reference),
        }
    )
    for name in encodergraphs.ENCODERS:
        module = getattr(pipe, name, None)
        if module is not None and isinstance(module.forward, encodergraphs.GraphedForward):
            module.forward = module.forward.eager
    return rows


def encoders(
    setup: Setup, pipe: Any, batches: list[int], repeats: int, compiled: bool = True
) -> list[dict[str, Any]]:
    """Prompt encoding per request: eager, with the negative prompt's embeddings reused, graphed,
    compiled."""
    rows = []

    def encode(batch: int, negative: tuple[torch.Tensor, torch.Tensor] | None) -> Any:
        kwargs: dict[str, Any] = {}
        if negative is not None:
            kwargs = {
                "negative_prompt_embeds": negative[0].expand(batch, -1, -1),
                "negative_pooled_prompt_embeds": negative[1].expand(batch, -1),
            }
        with torch.inference_mode():
            return pipe.encode_prompt(
                prompt=[PROMPT] * batch,
                prompt_2=None,
                prompt_3=None,
                do_classifier_free_guidance=True,
                **kwargs,
            )

    def best(batch: int, negative: Any) -> float:
        encode(batch, negative)
        return min(setup.timed(lambda: encode(batch, negative))[1] for _ in range(repeats))

    with torch.inference_mode():
        out = pipe.encode_prompt(prompt=[""], prompt_2=None, prompt_3=None, do_classifier_free_guidance=False)
    negative = (out[0], out[2])
    reference = encode(1, None)
    for batch in batches:
        rows.append({"variant": "encode-eager", "batch": batch, "seconds": round(best(batch, None), 4)})
        rows.append(
            {"variant": "encode-negative-reused", "batch": batch, "seconds": round(best(batch, negative), 4)}
        )
    reused = encode(1, negative)
    same = all(torch.equal(a, b) for a, b in zip(reference, reused, strict=True))
    rows.append({"variant": "encode-negative-reused", "identical_to_eager": same})
    rows.extend(graphed_encoders(setup, pipe, batches, encode, best, reference))
    if not compiled:
        return rows
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.forward = torch.compile(module.forward, dynamic=False)
    for batch in batches:
        _, first = setup.timed(functools.partial(encode, batch, negative))
        rows.append(
            {
                "variant": "encode-compiled-negative-reused",
                "batch": batch,
                "first_call_s": round(first, 1),
                "seconds": round(best(batch, negative), 4),
            }
        )
    compiled = encode(1, None)
    rows.append(
        {
            "variant": "encode-compiled",
            "prompt_embeds_max_abs_diff": float((compiled[0] - reference[0]).abs().max()),
            "pooled_max_abs_diff": float((compiled[2] - reference[2]).abs().max()),
        }
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--variants", default="blocks,blocks-cudnn,blocks-flash,whole,whole-graphs,blocks-graphs,whole-freeze"
    )
    parser.add_argument("--batch-sizes", default="1", help="batch sizes timed for every variant")
    parser.add_argument("--encoder-batches", default="1,4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--arch", default="sd3.5-medium")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=prof.SIZE)
    parser.add_argument("--steps", type=int, default=prof.STEPS)
    parser.add_argument("--no-encoders", action="store_true")
    parser.add_argument(
        "--encoders-only", action="store_true", help="only the text encoders: eager, reused negative, graphed"
    )
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--profile-attention", choices=("sdpa", "fa4"), default="sdpa")
    parser.add_argument("--kernels", action="store_true", help="time the attention kernels alone first")
    args = parser.parse_args(argv)
    from imagefleet.inference_pod import acceleration as acc

    setup = Setup(args)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    rows: list[dict[str, Any]] = []

    def row(record: dict[str, Any]) -> None:
        record = {"event": "variant", **record}
        prof.emit(record)
        rows.append(record)

    if args.kernels and args.device == "cuda":
        for record in kernels(args.device):
            prof.emit({"event": "kernel", **record})
    start = time.perf_counter()
    pipe = setup.build()
    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    prof.emit({"event": "build", "seconds": round(time.perf_counter() - start, 1), "card": card})
    if args.encoders_only:
        for record in encoders(
            setup, pipe, [int(b) for b in args.encoder_batches.split(",")], args.repeats, False
        ):
            prof.emit({"event": "encoder", **record})
        return 0
    transformer = pipe.transformer
    setup.latents(pipe, 0)
    reference = setup.images(pipe, args.seeds)
    for b in sizes:
        _, best = setup.per_image(pipe, b, args.repeats)
        row({"variant": "eager", "batch": b, "s_per_image": round(best, 4)})
    acc.fuse_qkv(transformer)
    for variant in [v for v in args.variants.split(",") if v]:
        try:
            backend, setup.graphs = apply(variant, transformer)
            with attention(transformer, backend):
                for b in sizes:
                    first, best = setup.per_image(pipe, b, args.repeats)
                    extra = diff(setup.images(pipe, args.seeds), reference) if b == sizes[0] else {}
                    row(
                        {
                            "variant": variant,
                            "batch": b,
                            "first_call_s": round(first, 1),
                            "s_per_image": round(best, 4),
                            **extra,
                        }
                    )
        except Exception as exc:  # a variant that does not run here is a result too
            prof.emit(
                {"event": "variant", "variant": variant, "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
            )
        finally:
            setup.graphs = False
    uncompile(transformer)
    acc.compile_blocks(transformer)
    if not args.no_encoders:
        for record in encoders(setup, pipe, [int(b) for b in args.encoder_batches.split(",")], args.repeats):
            prof.emit({"event": "encoder", **record})
    if not args.no_profile and args.device == "cuda":
        backend = "fa4" if args.profile_attention == "fa4" else None
        with attention(transformer, backend):
            setup.latents(pipe, 0)
            breakdown = prof.transformer_breakdown(pipe)
        prof.emit({"event": "transformer_compiled_blocks", "attention": args.profile_attention, **breakdown})

    eager = {r["batch"]: r["s_per_image"] for r in rows if r["variant"] == "eager"}
    blocks = {r["batch"]: r["s_per_image"] for r in rows if r["variant"] == "blocks"}
    print("variant          batch  first s  s/image   img/h  vs eager  vs blocks  max|d|  mean|d|")
    for r in rows:
        s, b = r["s_per_image"], r["batch"]
        vs_blocks = f"{blocks[b] / s:.3f}" if b in blocks else "-"
        print(
            f"{r['variant']:<16} {b:>5} {r.get('first_call_s', 0):>8.1f} {s:>8.3f} {3600 / s:>7.0f} "
            f"{eager[b] / s:>9.3f} {vs_blocks:>10} {r.get('max_abs_diff', 0):>7.1f} {r.get('mean_abs_diff', 0):>8.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
