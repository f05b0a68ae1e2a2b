"""``synthetic:<arch>``: the real architectures, checked on the meta device (no weights allocated).

Parameter counts are those of the published checkpoints (SD3.5-Medium, SDXL base 1.0, SD 1.5 and
their text encoders and VAEs), so a synthetic pipeline does the real model's arithmetic.
"""

from __future__ import annotations

import resource
import time
from typing import Any

import pytest
import torch
from diffusers import (
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
    SD3Transformer2DModel,
)
from transformers import CLIPTextModel

from imagefleet.inference_pod import synthetic

CLIP_L_TEXT = 123_060_480  # CLIPTextModel, openai/clip-vit-large-patch14
CLIP_L_TEXT_WITH_PROJECTION = 123_650_304  # + 768x768 text projection
CLIP_G_TEXT_WITH_PROJECTION = 694_659_840  # OpenCLIP bigG text tower + projection
T5_XXL_ENCODER = 4_762_310_656  # google/t5-v1_1-xxl encoder
SD_VAE = 83_653_863  # SD 1.5 / SDXL AutoencoderKL (4 latent channels, quant convs)
SD3_VAE = 83_819_683  # SD3 / SD3.5 AutoencoderKL (16 latent channels, no quant convs)

EXPECTED = {
    "sd3.5-medium": {
        "transformer": 2_243_171_520,
        "vae": SD3_VAE,
        "text_encoder": CLIP_L_TEXT_WITH_PROJECTION,
        "text_encoder_2": CLIP_G_TEXT_WITH_PROJECTION,
        "text_encoder_3": T5_XXL_ENCODER,
    },
    "sdxl": {
        "unet": 2_567_463_684,
        "vae": SD_VAE,
        "text_encoder": CLIP_L_TEXT,
        "text_encoder_2": CLIP_G_TEXT_WITH_PROJECTION,
    },
    "sd1.5": {"unet": 859_520_964, "vae": SD_VAE, "text_encoder": CLIP_L_TEXT},
}


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def meta_pipeline(request: pytest.FixtureRequest) -> tuple[str, Any]:
    return request.param, synthetic.build(request.param, "meta", torch.bfloat16)


def test_parameter_counts_match_the_published_models(meta_pipeline: tuple[str, Any]) -> None:
    arch, pipe = meta_pipeline
    counts = {name: _count(c) for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}
    assert counts == EXPECTED[arch]


def test_meta_build_allocates_nothing_and_uses_the_dtype(meta_pipeline: tuple[str, Any]) -> None:
    _arch, pipe = meta_pipeline
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            assert {p.device.type for p in component.parameters()} == {"meta"}
            assert {p.dtype for p in component.parameters()} == {torch.bfloat16}
            assert not component.training


def test_sd35_medium_pipeline_configuration() -> None:
    pipe = synthetic.build("sd3.5-medium", "meta", torch.bfloat16)
    cfg = pipe.transformer.config
    assert (cfg.num_layers, cfg.num_attention_heads, cfg.attention_head_dim) == (24, 24, 64)
    assert (cfg.joint_attention_dim, cfg.caption_projection_dim, cfg.pooled_projection_dim) == (
        4096,
        1536,
        2048,
    )
    assert cfg.pos_embed_max_size == 384 and cfg.qk_norm == "rms_norm"
    assert list(cfg.dual_attention_layers) == list(range(13))
    assert pipe.transformer.pos_embed.pos_embed.shape == (1, 384 * 384, 1536)
    assert pipe.vae.config.latent_channels == 16
    assert pipe.vae.config.scaling_factor == pytest.approx(1.5305)
    assert pipe.vae.config.shift_factor == pytest.approx(0.0609)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.scheduler.config.shift == pytest.approx(3.0)
    assert pipe.tokenizer.model_max_length == pipe.tokenizer_2.model_max_length == 77
    assert pipe.tokenizer_3.model_max_length == 256
    assert pipe.text_encoder_3.config.d_model == 4096 and pipe.text_encoder_3.config.num_heads == 64
    assert pipe.vae_scale_factor == 8 and pipe.default_sample_size == 128


def test_sdxl_pipeline_configuration() -> None:
    pipe = synthetic.build("sdxl", "meta", torch.bfloat16)
    assert pipe.unet.config.cross_attention_dim == 2048
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.vae.config.latent_channels == 4
    assert pipe.vae.config.scaling_factor == pytest.approx(0.13025)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert pipe.text_encoder_2.config.projection_dim == 1280
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    assert pipe.tokenizer.model_max_length == pipe.tokenizer_2.model_max_length == 77
    assert pipe.default_sample_size * pipe.vae_scale_factor == 1024


def test_sd15_pipeline_configuration() -> None:
    pipe = synthetic.build("sd1.5", "meta", torch.bfloat16)
    assert pipe.unet.config.cross_attention_dim == 768
    assert pipe.vae.config.latent_channels == 4
    assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)
    assert isinstance(pipe.scheduler, PNDMScheduler)
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 512


def test_unknown_architecture_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"sd3\.5-medium.*sdxl.*sd1\.5"):
        synthetic.build("sd9", "meta", torch.float32)


@pytest.mark.parametrize(
    ("tokenizer", "length", "vocab"),
    [
        (synthetic.clip_tokenizer(), 77, synthetic.CLIP_VOCAB_SIZE),
        (synthetic.t5_tokenizer(), 256, synthetic.T5_VOCAB_SIZE),
    ],
)
def test_tokenizers_pad_to_the_real_lengths_with_ids_inside_the_vocabulary(
    tokenizer: Any, length: int, vocab: int
) -> None:
    prompts = ["a pink flamingo standing in water", "ünïcödé ✓ " * 40]
    ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True).input_ids
    assert [len(row) for row in ids] == [length, length]
    assert max(max(row) for row in ids) < vocab
    assert ids[0] != ids[1]
    assert tokenizer.eos_token_id in ids[0]


def _small_sd3_transformer() -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        pos_embed_max_size=24,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )


def test_materialise_recomputes_buffers_and_initialises_every_parameter() -> None:
    reference = _small_sd3_transformer()
    with torch.device("meta"):
        meta = _small_sd3_transformer()
    model = synthetic.materialise(meta, torch.device("cpu"), torch.float32, seed=1)
    assert torch.equal(model.pos_embed.pos_embed, reference.pos_embed.pos_embed)
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        if p.dim() >= 2:
            assert 0.01 < p.std().item() < 0.03, name
    assert torch.equal(model.transformer_blocks[0].attn.norm_q.weight, torch.ones(8))


def test_materialise_is_seeded() -> None:
    def make() -> torch.nn.Module:
        with torch.device("meta"):
            meta = _small_sd3_transformer()
        return synthetic.materialise(meta, torch.device("cpu"), torch.float32, seed=7)

    first, second = make(), make()
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters(), strict=True))


def test_a_buffer_without_a_rule_is_an_error() -> None:
    with torch.device("meta"):
        module = torch.nn.BatchNorm1d(4)
    with pytest.raises(RuntimeError, match="running_mean"):
        synthetic.materialise(module, torch.device("cpu"), torch.float32, seed=0)


@pytest.mark.slow
def test_sd15_generates_finite_images_on_the_cpu() -> None:
    """One real call: 64x64, one step, float32 (about 30 s and 5 GiB on a small CPU machine)."""
    started = time.monotonic()
    pipe = synthetic.build("sd1.5", "cpu", torch.float32)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    out = pipe(
        ["a cat", "a dog"], num_inference_steps=1, height=64, width=64, output_type="np", generator=generators
    )
    assert out.images.shape == (2, 64, 64, 3)
    assert torch.isfinite(torch.from_numpy(out.images)).all()
    assert out.images.std() > 0
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"sd1.5 synthetic on CPU: {time.monotonic() - started:.1f} s, peak RSS {peak_gib:.1f} GiB")
