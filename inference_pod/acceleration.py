"""Making a loaded pipeline fast: the lossless tier's rewrites and the fast tier's step cache.

Lossless (the same maths as eager, up to bf16 rounding):

* :func:`fuse_qkv` -- one matrix product for the query, key and value projections of every joint
  attention (image and text streams each), instead of three. diffusers' own
  ``fuse_qkv_projections`` installs ``FusedJointAttnProcessor2_0`` everywhere, which drops the
  RMS norms of query and key (SD3.5) and fails on the image-only second attention of SD3.5's dual
  blocks; :class:`FusedJointAttention` keeps both.
* :func:`fuse_gelu` -- the feed-forwards' tanh GELU applied in the epilogue of the matrix product
  before it (one cuBLASLt call instead of a product and an elementwise pass over its output).
* :func:`use_attention` -- the fused attentions on FlashAttention-4 (exact attention, a faster
  kernel on Hopper and Blackwell) where the ``flash-attn-4`` package is installed.
* :func:`compile_blocks` -- ``torch.compile`` of each repeated transformer block (regional
  compilation: identical blocks share one compiled graph, so the first call compiles a few graphs,
  not a whole model), ``fullgraph=True, dynamic=False``. The compiled function replaces the
  block's ``forward`` on the instance, so block-level hooks (the fast tier's cache) stay Python
  around it. Compiled code is kept in :func:`use_compile_cache`'s directory between processes.
  With ``graphs`` (``--compile blocks-graphs``) each compiled block is also captured as a CUDA
  graph per shape and replayed (Inductor's ``reduce-overhead`` mode): no kernel launch gaps, the
  same kernels.

Fast (opt-in per request): :class:`StepCache` -- diffusers' first-block cache around the same
blocks. After the first block, if its output changed little since the last full step, the
remaining blocks are skipped and their cached residual reused.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")
"""Attributes of a denoiser that hold its repeated blocks (SD3: the first; Flux: both)."""


@dataclass(frozen=True)
class Acceleration:
    """What was done to the pipeline; reported in the log and ``/v1/models``."""

    fused_attentions: int = 0
    fused_gelus: int = 0
    compiled_blocks: int = 0
    compiled_decoder: bool = False
    tuned_decoder: bool = False
    compile_mode: str | None = None
    step_cache: bool = False
    attention: str = "sdpa"
    graphed_encoders: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "fused_attentions": self.fused_attentions,
            "fused_gelus": self.fused_gelus,
            "compiled_blocks": self.compiled_blocks,
            "compiled_decoder": self.compiled_decoder,
            "tuned_decoder": self.tuned_decoder,
            "compile_mode": self.compile_mode,
            "attention": self.attention,
            "graphed_encoders": self.graphed_encoders,
        }


def denoiser_of(pipe: Any) -> nn.Module | None:
    return getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)


def blocks_of(denoiser: nn.Module) -> list[nn.Module]:
    found: list[nn.Module] = []
    for name in BLOCK_LISTS:
        blocks = getattr(denoiser, name, None)
        if isinstance(blocks, nn.ModuleList):
            found.extend(blocks)
    return found


# --- fused projections -------------------------------------------------------------------------


class FusedJointAttention:
    """SD3's ``JointAttnProcessor2_0`` with one product for Q, K and V per stream.

    Line for line the same computation as diffusers' processor (norms of query and key included),
    reading ``to_qkv`` / ``to_added_qkv`` made by ``Attention.fuse_projections``. Handles both the
    joint attention (text stream present) and the image-only second attention of dual blocks.
    ``kernel`` (:func:`use_attention`): ``sdpa``, PyTorch's dispatch, or ``fa4``, FlashAttention-4
    on tensors laid out tokens before heads (no transposes).
    """

    def __init__(self, kernel: str = "sdpa") -> None:
        self.kernel = kernel

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        batch, image_tokens = hidden_states.shape[0], hidden_states.shape[1]
        tokens_first = self.kernel == "fa4"
        query, key, value = _heads(attn, attn.to_qkv(hidden_states), batch, tokens_first)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            c_query, c_key, c_value = _heads(
                attn, attn.to_added_qkv(encoder_hidden_states), batch, tokens_first
            )
            if attn.norm_added_q is not None:
                c_query = attn.norm_added_q(c_query)
            if attn.norm_added_k is not None:
                c_key = attn.norm_added_k(c_key)
            tokens = 1 if tokens_first else 2
            query = torch.cat([query, c_query], dim=tokens)
            key = torch.cat([key, c_key], dim=tokens)
            value = torch.cat([value, c_value], dim=tokens)
        if tokens_first:
            out = attend_fa4(query, key, value)
        else:
            out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
            out = out.transpose(1, 2)
        out = out.reshape(batch, -1, attn.heads * query.shape[-1]).to(query.dtype)
        if encoder_hidden_states is not None:
            out, context = out[:, :image_tokens], out[:, image_tokens:]
            if not attn.context_pre_only:
                context = attn.to_add_out(context)
            projected: torch.Tensor = attn.to_out[1](attn.to_out[0](out))
            return projected, context
        result: torch.Tensor = attn.to_out[1](attn.to_out[0](out))
        return result


def _heads(
    attn: Any, qkv: torch.Tensor, batch: int, tokens_first: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query, key and value of a fused projection: (batch, heads, tokens, head_dim), or with
    ``tokens_first`` (batch, tokens, heads, head_dim)."""
    head_dim = qkv.shape[-1] // 3 // attn.heads
    split = qkv.view(batch, -1, 3 * attn.heads, head_dim)
    if tokens_first:
        q, k, v = split.chunk(3, dim=2)
    else:
        q, k, v = split.transpose(1, 2).chunk(3, dim=1)
    return q, k, v


def fuse_qkv(denoiser: nn.Module) -> int:
    """Fuse the projections of every SD3-style joint attention in place; returns how many.

    The separate projections are deleted afterwards, so the weights are not held twice.
    """
    from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0

    fused = 0
    for module in denoiser.modules():
        if not isinstance(module, Attention) or not isinstance(module.processor, JointAttnProcessor2_0):
            continue
        if module.is_cross_attention:
            continue
        with torch.no_grad():
            module.fuse_projections()
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            if getattr(module, name, None) is not None:
                delattr(module, name)
        module.set_processor(FusedJointAttention())
        fused += 1
    return fused


def fuse_gelu(denoiser: nn.Module) -> int:
    """Put each feed-forward's tanh GELU into its matrix product's epilogue; returns how many.

    diffusers' ``GELU`` is a linear layer then ``F.gelu(approximate="tanh")``: under
    ``torch.compile`` that is a cuBLAS product and a separate Inductor kernel that reads and writes
    the 4x-wide hidden activations once more. :func:`linear_gelu_tanh` makes it one cuBLASLt call
    with bias and GELU applied to the product before it is rounded to bf16 (``GELU_BIAS``
    epilogue): the same function, closer to float32. The modules keep their weights; only their
    class changes, so state dicts and hooks are untouched.
    """
    from diffusers.models.activations import GELU

    fused = 0
    for module in denoiser.modules():
        if (
            type(module) is GELU
            and module.approximate == "tanh"
            and getattr(module.proj, "bias", None) is not None
        ):
            module.__class__ = _epilogue_gelu()
            fused += 1
    return fused


@functools.cache
def _epilogue_gelu() -> type[nn.Module]:
    from diffusers.models.activations import GELU

    class EpilogueGELU(GELU):  # type: ignore[misc]
        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = linear_gelu_tanh(hidden_states, self.proj.weight, self.proj.bias)
            return out

    return EpilogueGELU


@torch.library.custom_op("imagefleet::linear_gelu_tanh", mutates_args=())
def linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``F.gelu(F.linear(x, weight, bias), approximate="tanh")`` as one product with the GELU in
    its epilogue (cuBLASLt's ``GELU_BIAS``, the tanh form, on a GPU; on a CPU the same two steps as
    before). An operator of its own, so
    ``torch.compile`` calls it as it is instead of splitting it back into two kernels."""
    if x.device.type != "cuda":  # PyTorch's CPU kernel applies the erf GELU, not the tanh one
        return F.gelu(F.linear(x, weight, bias), approximate="tanh")
    out = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
    return out.view(*x.shape[:-1], weight.shape[0])


@linear_gelu_tanh.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


# --- attention kernel --------------------------------------------------------------------------


def fa4_unavailable(device: str) -> str | None:
    """Why FlashAttention-4 cannot run on ``device`` in this process; ``None`` when it can."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return "it needs a CUDA device"
    major, minor = torch.cuda.get_device_capability(torch.device(device))
    if major not in (9, 10):
        return f"it needs compute capability 9.x or 10.x (Hopper, Blackwell); this device is {major}.{minor}"
    try:
        import flash_attn.cute.interface  # noqa: F401
    except Exception as exc:  # not installed, or its CuTe DSL runtime does not load
        return f"flash-attn-4 does not import ({type(exc).__name__}: {exc}); install imagefleet[fa4]"
    return None


def choose_attention(setting: str, device: str) -> str:
    """The attention kernel for ``--attention``: ``fa4`` or ``sdpa`` (PyTorch's own dispatch).

    ``auto`` takes FlashAttention-4 where it runs; ``fa4`` insists on it (a pod that cannot have it
    fails its load, with the reason); ``sdpa`` never uses it.
    """
    if setting == "sdpa":
        return "sdpa"
    why = fa4_unavailable(device)
    if why is None:
        return "fa4"
    if setting == "fa4":
        raise ValueError(f"attention fa4 was asked for, but {why}")
    log.info("attention: PyTorch's SDPA dispatch (FlashAttention-4 not used: %s)", why)
    return "sdpa"


def use_attention(denoiser: nn.Module, kernel: str) -> int:
    """Run the fused joint attentions of ``denoiser`` on ``kernel``; returns how many.

    Only :class:`FusedJointAttention` has a choice (its layout is the one FlashAttention takes,
    tokens before heads); another denoiser keeps PyTorch's SDPA.
    """
    count = 0
    for module in denoiser.modules():
        processor = getattr(module, "processor", None)
        if isinstance(processor, FusedJointAttention):
            processor.kernel = kernel
            count += 1
    return count


@torch.library.custom_op("imagefleet::fa4_attention", mutates_args=())
def attend_fa4(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Exact attention by FlashAttention-4, tokens before heads: (batch, tokens, heads, head_dim).

    A PyTorch operator, so ``torch.compile`` calls it between the fused kernels of a compiled block
    without tracing into it; flash-attn-4 is imported on the first call.
    """
    from flash_attn.cute.interface import flash_attn_func

    out: torch.Tensor = flash_attn_func(query, key, value)[0]
    return out


@attend_fa4.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


# --- compilation -------------------------------------------------------------------------------


def use_compile_cache(directory: str | None) -> None:
    """Keep Inductor's and Triton's compiled code in ``directory`` (created), across restarts."""
    if not directory:
        return
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")


def compile_blocks(denoiser: nn.Module, *, graphs: bool = False) -> int:
    """Compile each repeated block's ``forward`` in place; returns how many.

    A denoiser without repeated blocks (a UNet) is compiled whole. Shapes are static: each
    (batch, height, width) compiles once, which the warm-up does before the pod is ready. With
    ``graphs`` the compiled code runs as CUDA graphs (recorded per shape on first use; Inductor
    skips them on a CPU), and every denoiser call starts a new graph step (:func:`mark_graph_steps`).
    """
    import torch._dynamo

    blocks = blocks_of(denoiser)
    # one graph per block kind and shape: allow every warm-up shape and batch size
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    targets = blocks or [denoiser]
    mode = "reduce-overhead" if graphs else None
    for block in targets:
        block.forward = torch.compile(block.forward, fullgraph=bool(blocks), dynamic=False, mode=mode)
    if graphs:
        mark_graph_steps(denoiser)
    return len(targets)


def mark_graph_steps(denoiser: nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Start a new CUDA-graph step at every call of ``denoiser``.

    A CUDA graph's outputs live in memory its next replay overwrites. Within one denoiser call the
    blocks' graphs hand their outputs on to the next block; what the call returns is computed after
    the last block, outside the graphs. Marking each call as a new step tells PyTorch that nothing
    from the previous call's graphs is read again, so their memory is reused instead of each call
    recording anew.
    """

    def begin(_module: nn.Module, _args: Any) -> None:
        torch.compiler.cudagraph_mark_step_begin()  # type: ignore[no-untyped-call]

    return denoiser.register_forward_pre_hook(begin)


def compile_decoder(vae: nn.Module | None) -> bool:
    """Compile the VAE's decoder (graph breaks allowed: diffusers' upsampler checks versions)."""
    decoder = getattr(vae, "decoder", None)
    if decoder is None:
        return False
    decoder.forward = torch.compile(decoder.forward, dynamic=False)
    return True


def tune_decoder(vae: nn.Module | None) -> bool:
    """The VAE in channels-last (NHWC: each convolution's output follows its weight's layout, the
    one Hopper's cuDNN kernels run natively) and cuDNN timing its convolution algorithms once per
    shape (the warm-up's first decode at each shape pays for it). Process-wide: every later
    convolution is timed once too. The algorithm chosen may differ from one start to the next, so
    the same seed gives the same image within bf16 rounding rather than bit for bit."""
    if vae is None:
        return False
    vae.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # accepted, not in the stubs
    torch.backends.cudnn.benchmark = True
    return True


# --- fast tier ---------------------------------------------------------------------------------


class StepCache:
    """diffusers' first-block cache on the denoiser's blocks, active only around fast-tier batches.

    After the first block, a step either runs the remaining blocks or reuses their cached
    residual. Which, is the policy's:

    * ``schedule`` (default) -- the first ``warmup`` steps run in full, then every ``interval``-th
      step: a fixed share of the work, the same for every prompt and batch (FORA-style caching);
      no host-device sync.
    * ``threshold`` -- diffusers' own rule: run in full when the first block's output changed by
      more than ``threshold`` (relative mean) since the last full step. Adaptive, but one sync a
      step, and how often it skips depends on the weights (random weights hardly ever do).

    The hooks are installed once (:func:`diffusers.hooks.apply_first_block_cache`) and stay
    transparent until :meth:`active` sets their cache context; leaving it resets their state, so
    no cached residual survives from one batch into the next. The SD3 pipeline makes one
    transformer call per step (both CFG halves batched), so one context serves the whole call.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        *,
        policy: str = "schedule",
        interval: int = 3,
        warmup: int = 3,
        threshold: float = 0.1,
    ) -> None:
        from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

        self.denoiser = denoiser
        self.policy, self.interval, self.warmup, self.threshold = policy, interval, warmup, threshold
        self.step = 0
        self.full_steps = 0
        self.cached_steps = 0
        """Steps that reused the cache, over the cache's life (a Prometheus counter)."""
        blocks = blocks_of(denoiser)
        # SD3's last block is "context pre-only" (returns no text stream), which diffusers' tail
        # hook cannot take: the cache spans the blocks before it, and the last block always runs.
        span = blocks[:-1] if _context_pre_only(blocks[-1]) else blocks
        holder = nn.Module()
        holder.transformer_blocks = nn.ModuleList(span)
        apply_first_block_cache(holder, FirstBlockCacheConfig(threshold=threshold))
        self._enabled = False
        self._span = span
        for block in span:
            hook_registry = _registry(block)
            for hook in hook_registry.hooks.values():
                _make_switchable(hook, self)
                if hasattr(hook, "_should_compute_remaining_blocks"):
                    adaptive = hook._should_compute_remaining_blocks
                    hook._should_compute_remaining_blocks = functools.partial(self._decide, adaptive)
        _registry(denoiser).invalidate_child_registries_cache()

    def _decide(self, adaptive: Any, residual: torch.Tensor) -> bool:
        step, self.step = self.step, self.step + 1
        if self.policy == "schedule":
            full = step < self.warmup or (step - self.warmup) % self.interval == self.interval - 1
        else:
            full = bool(adaptive(residual))
        self.full_steps += full
        self.cached_steps += not full
        return full

    @classmethod
    def supported(cls, denoiser: nn.Module | None) -> bool:
        return denoiser is not None and len(blocks_of(denoiser)) >= 3

    @contextmanager
    def active(self) -> Iterator[None]:
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        _set_cache_context(self.denoiser, CacheContext("batch"))
        self.step = 0
        self._enabled = True
        try:
            yield
        finally:
            self._enabled = False
            _registry(self.denoiser).reset_stateful_hooks()
            _set_cache_context(self.denoiser, None)

    def remove(self) -> None:
        """Take the hooks off again (the blocks' forward is what it was before)."""
        for block in self._span:
            hook_registry = _registry(block)
            for name in list(hook_registry.hooks):
                hook_registry.remove_hook(name, recurse=False)
        _registry(self.denoiser).invalidate_child_registries_cache()


def _registry(module: nn.Module) -> Any:
    from diffusers.hooks import HookRegistry

    return HookRegistry.check_if_exists_or_initialize(module)


def _context_pre_only(block: nn.Module) -> bool:
    return bool(getattr(block, "context_pre_only", False))


def _make_switchable(hook: Any, cache: StepCache) -> None:
    """Let ``hook`` call straight through to the block (compiled or not) unless ``cache`` is active."""
    fn_ref = hook.fn_ref
    cached, original = fn_ref.forward, fn_ref.original_forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        return cached(*args, **kwargs) if cache._enabled else original(*args, **kwargs)

    fn_ref.forward = forward
