"""``synthetic:<arch>``: random weights of a real architecture, for benchmarks.

A synthetic pipeline has exactly the modules, shapes and configuration of the published model
(SD3.5-Medium, SDXL base 1.0, SD 1.5), so a denoising step does the same arithmetic on the same
tensor shapes as the real weights would; only the images are noise. Nothing is downloaded.

How it is built, and why:

* **On the target device, never on the CPU first.** Every network is constructed on the ``meta``
  device (shapes only, no memory), cast to the serving dtype there (free), then given
  uninitialised storage directly on the target device with ``to_empty`` and filled in place by
  kernels on that device. Building SD3.5-Medium (about 7.9 B parameters with its text encoders)
  therefore takes seconds on a GPU and never touches host memory for weights.
* **Initialisation** follows common practice, so activations stay finite: normalisation layers
  get weight 1 and bias 0, every other vector is 0, every matrix, convolution and embedding is
  drawn from N(0, 0.02).
* **Buffers** that the constructors compute (SD3's sin-cos position table, CLIP's
  ``position_ids``) would be garbage after ``to_empty``; each is recomputed by an explicit rule,
  and a buffer without a rule is an error rather than silently uninitialised memory (NaNs would
  make every timing meaningless).
* **Seeded**: each component draws from its own generator with a fixed seed, so every process
  (every pod of a deployment) builds the same weights on the same kind of device.
* **Tokenizers** are character-level (:mod:`.chartokenizer`, no vocabulary download) with the real maximum lengths (77
  for CLIP, 256 for T5) and ids below the real vocabulary sizes. The pipelines pad every prompt to
  those lengths, so the text encoders see the real sequence shapes.

``device="meta"`` stops after construction: the pipeline has the real structure and parameter
counts but no storage, which is what the unit tests inspect on a small machine.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.models.embeddings import PatchEmbed, get_2d_sincos_pos_embed
from torch import nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

from imagefleet.inference_pod.chartokenizer import char_tokenizer

SEED = 20261127
INIT_STD = 0.02
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 256
CLIP_VOCAB_SIZE = 49408
T5_VOCAB_SIZE = 32128

# --- architecture configurations (the published config.json files; see docs/benchmarks.md) -----

SD35_MEDIUM_TRANSFORMER: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),
    "qk_norm": "rms_norm",
}

SD3_TINY_TRANSFORMER: dict[str, Any] = {
    **SD35_MEDIUM_TRANSFORMER,
    "sample_size": 8,
    "num_layers": 3,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,
    "caption_projection_dim": 32,
    "pooled_projection_dim": 64,
    "pos_embed_max_size": 32,
    "dual_attention_layers": (0, 1),
}
"""SD3.5-Medium's structure (dual attention, RMS-normed query and key, a context-pre-only last
block) at a size a CPU runs in milliseconds: for tests of the SD3 code paths."""

_VAE_COMMON: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "force_upcast": True,
}
SD3_VAE: dict[str, Any] = {
    **_VAE_COMMON,
    "latent_channels": 16,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
SD3_TINY_VAE: dict[str, Any] = {
    **SD3_VAE,
    "block_out_channels": (8, 16, 16, 16),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
}
SDXL_VAE: dict[str, Any] = {
    **_VAE_COMMON,
    "latent_channels": 4,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
}
SD15_VAE: dict[str, Any] = {
    **_VAE_COMMON,
    "latent_channels": 4,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

CLIP_L: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
CLIP_G: dict[str, Any] = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
CLIP_TINY: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "hidden_act": "gelu",
    "projection_dim": 32,
}
T5_XXL: dict[str, Any] = {
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "vocab_size": T5_VOCAB_SIZE,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "is_encoder_decoder": False,
    "use_cache": False,
    "tie_word_embeddings": False,
}

T5_TINY: dict[str, Any] = {**T5_XXL, "d_model": 64, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4}

SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "transformer_layers_per_block": (1, 2, 10),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

# The schedulers of the published repositories (scheduler/scheduler_config.json).
_SD_BETAS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
}


# --- tokenizers ----------------------------------------------------------------------------------


def clip_tokenizer() -> PreTrainedTokenizerFast:
    return char_tokenizer(CLIP_MAX_LENGTH, framing="clip", vocab_size=CLIP_VOCAB_SIZE)


def t5_tokenizer() -> PreTrainedTokenizerFast:
    return char_tokenizer(T5_MAX_LENGTH, framing="t5", vocab_size=T5_VOCAB_SIZE)


def _clip_config(arch: dict[str, Any], tokenizer: PreTrainedTokenizerFast) -> CLIPTextConfig:
    return CLIPTextConfig(
        **arch,
        vocab_size=CLIP_VOCAB_SIZE,
        max_position_embeddings=CLIP_MAX_LENGTH,
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _t5_config(tokenizer: PreTrainedTokenizerFast, arch: dict[str, Any] = T5_XXL) -> T5Config:
    return T5Config(**arch, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)


# --- materialising meta modules on a device --------------------------------------------------------


def _sincos_pos_embed(module: nn.Module, buffer: torch.Tensor, device: torch.device) -> torch.Tensor:
    """PatchEmbed's table, as its constructor computes it (square grid, module's base size)."""
    assert isinstance(module, PatchEmbed)
    grid = math.isqrt(buffer.shape[1])
    table: torch.Tensor = get_2d_sincos_pos_embed(
        buffer.shape[-1],
        grid,
        base_size=module.base_size,
        interpolation_scale=module.interpolation_scale,
        device=device,
        output_type="pt",
    )
    return table.float().unsqueeze(0)


def _position_ids(_module: nn.Module, buffer: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.arange(buffer.shape[-1], device=device).expand(buffer.shape)


# (module class name, buffer name) -> how to recompute it on the target device.
BufferRule = Callable[[nn.Module, torch.Tensor, torch.device], torch.Tensor]
BUFFER_RULES: dict[tuple[str, str], BufferRule] = {
    ("PatchEmbed", "pos_embed"): _sincos_pos_embed,
    ("CLIPTextEmbeddings", "position_ids"): _position_ids,
}


def _is_norm(module: nn.Module) -> bool:
    """LayerNorm, GroupNorm, RMSNorm, T5LayerNorm, ...: scale 1 and shift 0 is their identity."""
    return "Norm" in type(module).__name__


@torch.no_grad()
def initialise(module: nn.Module, generator: torch.Generator) -> None:
    """Fill every parameter of ``module`` (already on its device) in place; see the module doc."""
    for sub in module.modules():
        norm = _is_norm(sub)
        for name, param in sub.named_parameters(recurse=False):
            if param.dim() >= 2:
                param.normal_(0.0, INIT_STD, generator=generator)
            elif norm and name == "weight":
                param.fill_(1.0)
            else:
                param.zero_()


@torch.no_grad()
def recompute_buffers(module: nn.Module, device: torch.device) -> None:
    """Recompute every buffer after ``to_empty``; a buffer without a rule is an error."""
    for sub in module.modules():
        for name, buffer in list(sub.named_buffers(recurse=False)):
            if buffer is None:
                continue
            rule = BUFFER_RULES.get((type(sub).__name__, name))
            if rule is None:
                raise RuntimeError(
                    f"synthetic weights: no rule to initialise buffer {name!r} of {type(sub).__name__}; "
                    "add one to BUFFER_RULES"
                )
            buffer.copy_(rule(sub, buffer, device).to(buffer.dtype))


def _keep_in_fp32(module: nn.Module, dtype: torch.dtype) -> None:
    """Mirror transformers' loading in float16: modules it keeps in float32 stay float32 (T5 ``wo``)."""
    names = getattr(module, "_keep_in_fp32_modules", None) or ()
    if dtype != torch.float16 or not names:
        return
    for name, sub in module.named_modules():
        if any(part in name.split(".") for part in names):
            sub.float()


def materialise(module: nn.Module, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """Turn a module built on the meta device into an initialised, eval-mode one on ``device``."""
    # nn.Module.to, not ModelMixin.to: the latter warns about float32 modules on every cast.
    module = nn.Module.to(module, dtype)
    _keep_in_fp32(module, dtype)
    module.eval().requires_grad_(False)
    if device.type == "meta":
        return module
    module = module.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    initialise(module, generator)
    recompute_buffers(module, device)
    return module


# --- the architectures ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Arch:
    """How to build one architecture: its networks (on meta), then the pipeline around them."""

    networks: Callable[[], dict[str, nn.Module]]
    assemble: Callable[[dict[str, Any]], DiffusionPipeline]


def _sd35_medium_networks() -> dict[str, nn.Module]:
    clip, t5 = clip_tokenizer(), t5_tokenizer()
    return {
        "transformer": SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER),
        "vae": AutoencoderKL(**SD3_VAE),
        "text_encoder": CLIPTextModelWithProjection(_clip_config(CLIP_L, clip)),
        "text_encoder_2": CLIPTextModelWithProjection(_clip_config(CLIP_G, clip)),
        "text_encoder_3": T5EncoderModel(_t5_config(t5)),
    }


def _sd35_medium_pipeline(parts: dict[str, Any]) -> DiffusionPipeline:
    return StableDiffusion3Pipeline(
        **parts,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        tokenizer_3=t5_tokenizer(),
    )


def _sd3_tiny_networks() -> dict[str, nn.Module]:
    clip, t5 = clip_tokenizer(), t5_tokenizer()
    return {
        "transformer": SD3Transformer2DModel(**SD3_TINY_TRANSFORMER),
        "vae": AutoencoderKL(**SD3_TINY_VAE),
        "text_encoder": CLIPTextModelWithProjection(_clip_config(CLIP_TINY, clip)),
        "text_encoder_2": CLIPTextModelWithProjection(_clip_config(CLIP_TINY, clip)),
        "text_encoder_3": T5EncoderModel(_t5_config(t5, T5_TINY)),
    }


def _sdxl_networks() -> dict[str, nn.Module]:
    clip = clip_tokenizer()
    return {
        "unet": UNet2DConditionModel(**SDXL_UNET),
        "vae": AutoencoderKL(**SDXL_VAE),
        "text_encoder": CLIPTextModel(_clip_config(CLIP_L, clip)),
        "text_encoder_2": CLIPTextModelWithProjection(_clip_config(CLIP_G, clip)),
    }


def _sdxl_pipeline(parts: dict[str, Any]) -> DiffusionPipeline:
    scheduler = EulerDiscreteScheduler(
        **_SD_BETAS,
        prediction_type="epsilon",
        interpolation_type="linear",
        timestep_spacing="leading",
        use_karras_sigmas=False,
    )
    return StableDiffusionXLPipeline(
        **parts,
        scheduler=scheduler,
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def _sd15_networks() -> dict[str, nn.Module]:
    return {
        "unet": UNet2DConditionModel(**SD15_UNET),
        "vae": AutoencoderKL(**SD15_VAE),
        "text_encoder": CLIPTextModel(_clip_config(CLIP_L, clip_tokenizer())),
    }


def _sd15_pipeline(parts: dict[str, Any]) -> DiffusionPipeline:
    scheduler = PNDMScheduler(**_SD_BETAS, skip_prk_steps=True, set_alpha_to_one=False)
    return StableDiffusionPipeline(
        **parts,
        scheduler=scheduler,
        tokenizer=clip_tokenizer(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


ARCHS: dict[str, Arch] = {
    "sd3.5-medium": Arch(_sd35_medium_networks, _sd35_medium_pipeline),
    "sd3-tiny": Arch(_sd3_tiny_networks, _sd35_medium_pipeline),
    "sdxl": Arch(_sdxl_networks, _sdxl_pipeline),
    "sd1.5": Arch(_sd15_networks, _sd15_pipeline),
}


def build(arch: str, device: str | torch.device, dtype: torch.dtype) -> DiffusionPipeline:
    """The pipeline of ``arch`` with seeded random weights of ``dtype``, created on ``device``."""
    spec = ARCHS.get(arch)
    if spec is None:
        raise ValueError(f"unknown synthetic architecture {arch!r}; known: {', '.join(ARCHS)}")
    target = torch.device(device)
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    with torch.device("meta"):
        networks = spec.networks()
    parts = {
        name: materialise(net, target, dtype, SEED + i)
        for i, (name, net) in enumerate(sorted(networks.items()))
    }
    return spec.assemble(parts)
