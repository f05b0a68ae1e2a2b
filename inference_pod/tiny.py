"""``tiny``: a Stable-Diffusion-shaped pipeline small enough for tests and CPU demos.

Random weights (seeded, so every process builds the same model), a UNet with two levels, a
four-level VAE (pixels map to latents by 8 and encoding is deterministic, as in real Stable
Diffusion) and a character-level tokenizer (:mod:`.chartokenizer`, so different prompts give
different embeddings). Nothing is downloaded. A 64x64 image
at 4 steps takes milliseconds on a CPU.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from imagefleet.inference_pod.chartokenizer import char_tokenizer

MAX_TOKENS = 77
SEED = 20261127


def build(device: str = "cpu", dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(SEED)
    try:
        tokenizer = char_tokenizer(MAX_TOKENS)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                vocab_size=len(tokenizer),
                max_position_embeddings=MAX_TOKENS,
                projection_dim=32,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        unet = UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
            in_channels=4,
            out_channels=4,
        )
        vae = AutoencoderKL(
            block_out_channels=(8, 16, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            norm_num_groups=8,
            layers_per_block=1,
            sample_size=64,
        )
        # As in trained VAEs, the posterior is (nearly) deterministic: an image always encodes to
        # the same latents, so what inpainting keeps is kept exactly.
        with torch.no_grad():
            logvar = slice(vae.config.latent_channels, None)
            vae.quant_conv.weight[logvar] = 0.0
            vae.quant_conv.bias[logvar] = -30.0
    finally:
        torch.random.set_rng_state(generator_state)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe.to(device=device, dtype=dtype)
