"""The lossless rewrites and the fast tier's step cache, on SD3.5-Medium's structure at test size."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from diffusers import SD3Transformer2DModel

from imagefleet.inference_pod import acceleration, synthetic

STEPS = 12


def transformer() -> SD3Transformer2DModel:
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**synthetic.SD3_TINY_TRANSFORMER).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    return model


def call(model: SD3Transformer2DModel) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return model(
            hidden_states=torch.randn(2, 16, 16, 16, generator=g),
            encoder_hidden_states=torch.randn(2, 10, 64, generator=g),
            pooled_projections=torch.randn(2, 64, generator=g),
            timestep=torch.tensor([500.0, 500.0]),
        ).sample


def test_fused_projections_compute_exactly_what_the_separate_ones_did() -> None:
    model = transformer()
    before = call(model)
    fused = acceleration.fuse_qkv(model)
    # three joint attentions and the image-only second attention of the two dual blocks
    assert fused == 5
    assert torch.equal(call(model), before)
    # the separate projections are gone: the weights are not held twice
    assert sum(hasattr(m, "to_qkv") for m in model.modules()) == 5
    assert not any(hasattr(m, "to_qkv") and hasattr(m, "to_q") for m in model.modules())


def test_the_gelu_epilogue_replaces_each_tanh_gelu_and_traces_whole_under_compile() -> None:
    model = transformer()
    before = call(model)
    fused = acceleration.fuse_gelu(model)
    # each of the three blocks' image feed-forward, and the context feed-forward of all but the
    # last (whose context output is never used)
    assert fused == 5
    assert sum(type(m).__name__ == "EpilogueGELU" for m in model.modules()) == 5
    # on a CPU the operator is the unfused computation (the epilogue is cuBLASLt's:
    # bench.kernels_sd35 compares it with both GELU forms on a GPU)
    assert torch.equal(call(model), before)
    assert acceleration.fuse_gelu(model) == 0  # the fused ones are not fused twice
    x, w, b = torch.randn(2, 7, 16), torch.randn(48, 16), torch.randn(48)
    expected = torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b), approximate="tanh")
    # an operator torch.compile traces through whole (fullgraph: no graph break around it)
    compiled = torch.compile(acceleration.linear_gelu_tanh, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, w, b), expected)


def test_diffusers_own_fusion_is_what_fuse_qkv_replaces() -> None:
    """diffusers' helper fails on SD3.5's dual blocks (or drops the query/key norms): keep ours."""
    model = transformer()
    before = call(model)
    model.fuse_qkv_projections()
    try:
        after = call(model)
    except AttributeError:
        return
    assert not torch.allclose(after, before)


class Counter:
    """Counts calls of a block: the steps that ran all blocks, when it is a cached one."""

    def __init__(self, block: Any) -> None:
        self.calls = 0
        inner = block.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return inner(*args, **kwargs)

        block.forward = forward


@pytest.fixture(scope="module")
def pipe() -> Iterator[Any]:
    pipeline = synthetic.build("sd3-tiny", "cpu", torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    acceleration.fuse_qkv(pipeline.transformer)
    yield pipeline


def images(pipe: Any) -> torch.Tensor:
    with torch.inference_mode():
        return pipe(
            prompt=["a cat", "a dog"],
            num_inference_steps=STEPS,
            guidance_scale=4.5,
            generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
            output_type="pt",
            height=64,
            width=64,
        ).images


def test_the_scheduled_step_cache_runs_a_fixed_share_of_steps_and_only_while_active(pipe: Any) -> None:
    lossless = images(pipe)
    counter = Counter(acceleration.blocks_of(pipe.transformer)[1])
    cache = acceleration.StepCache(pipe.transformer, policy="schedule", interval=3, warmup=3)
    try:
        counter.calls = 0
        assert torch.equal(images(pipe), lossless)  # installed but inactive: transparent
        assert counter.calls == STEPS
        for _ in range(2):  # the state of one batch never leaks into the next
            counter.calls = 0
            with cache.active():
                fast = images(pipe)
            assert counter.calls == 3 + len(range(5, STEPS, 3))  # steps 0-2, then one in three
            assert not torch.equal(fast, lossless)
            assert (fast - lossless).abs().max() < 0.5  # an approximation, not another image
        counter.calls = 0
        assert torch.equal(images(pipe), lossless)
        assert counter.calls == STEPS
    finally:
        cache.remove()
    assert torch.equal(images(pipe), lossless)


def test_the_threshold_rule_skips_only_when_the_first_block_barely_changes(pipe: Any) -> None:
    counter = Counter(acceleration.blocks_of(pipe.transformer)[1])
    for threshold, full in ((1e6, 1), (1e-9, STEPS)):
        cache = acceleration.StepCache(pipe.transformer, policy="threshold", threshold=threshold)
        try:
            counter.calls = 0
            with cache.active():
                images(pipe)
            assert counter.calls == full == cache.full_steps
        finally:
            cache.remove()


# --- attention kernel --------------------------------------------------------------------------


def test_attention_auto_falls_back_to_sdpa_and_fa4_names_what_it_lacks() -> None:
    assert acceleration.choose_attention("sdpa", "cpu") == "sdpa"
    assert acceleration.choose_attention("auto", "cpu") == "sdpa"
    with pytest.raises(ValueError, match=r"attention fa4 was asked for, but it needs a CUDA device"):
        acceleration.choose_attention("fa4", "cpu")


def test_the_fa4_path_lays_tokens_before_heads_and_computes_what_sdpa_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # FlashAttention-4 runs on Hopper and Blackwell only; here an exact attention with its calling
    # convention, (batch, tokens, heads, head_dim) in and out, stands in for the kernel
    calls: list[tuple[int, ...]] = []

    def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(query.shape))
        out = torch.nn.functional.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        )
        return out.transpose(1, 2).contiguous()

    monkeypatch.setattr(acceleration, "attend_fa4", attend)
    model = transformer()
    assert acceleration.use_attention(model, "fa4") == 0  # nothing fused yet: nothing to switch
    fused = acceleration.fuse_qkv(model)
    reference = call(model)
    assert acceleration.use_attention(model, "fa4") == fused
    out = call(model)
    assert len(calls) == fused
    heads = model.config.num_attention_heads
    # the joint attentions see image and text tokens together (64 + 10), tokens before heads
    assert (2, 64 + 10, heads, model.config.attention_head_dim) in calls
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    acceleration.use_attention(model, "sdpa")
    assert torch.equal(call(model), reference) and len(calls) == fused


# --- compilation -------------------------------------------------------------------------------


@pytest.mark.parametrize("graphs", [False, True])
def test_compiled_blocks_replay_as_cuda_graphs_only_when_asked_with_one_graph_step_per_call(
    monkeypatch: pytest.MonkeyPatch, graphs: bool
) -> None:
    # torch.compile itself is the library's to test (and slow on a CPU): record what each block
    # was compiled with, keep the block's own forward, and count the graph steps begun
    modes: list[str | None] = []

    def compile_(fn: Any, **options: Any) -> Any:
        modes.append(options["mode"])
        assert options["fullgraph"] is True and options["dynamic"] is False
        return fn

    steps: list[int] = []
    monkeypatch.setattr(torch, "compile", compile_)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    model = transformer()
    reference = call(model)
    compiled = acceleration.compile_blocks(model, graphs=graphs)
    assert compiled == len(model.transformer_blocks) == len(modes)
    assert set(modes) == {"reduce-overhead" if graphs else None}
    for _ in range(3):
        assert torch.equal(call(model), reference)
    # a new step before each denoiser call, none inside it: the blocks of one call hand their
    # graphs' outputs on to each other, and nothing of a call is read after the next one begins
    assert len(steps) == (3 if graphs else 0)


def test_a_pipeline_marks_one_graph_step_per_denoising_step(
    monkeypatch: pytest.MonkeyPatch, pipe: Any
) -> None:
    steps: list[int] = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    hook = acceleration.mark_graph_steps(pipe.transformer)
    try:
        images(pipe)
    finally:
        hook.remove()
    # classifier-free guidance runs both halves in one transformer call per step
    assert len(steps) == STEPS


# --- VAE decoder ---------------------------------------------------------------------------------


def test_the_tuned_decoder_runs_channels_last_and_decodes_what_it_did(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    vae = synthetic.build("sd3-tiny", "cpu", torch.float32).vae
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = vae.decode(latents).sample
        assert acceleration.tune_decoder(vae) and not acceleration.tune_decoder(None)
        after = vae.decode(latents).sample
    convs = [m for m in vae.decoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert after.is_contiguous(memory_format=torch.channels_last)
    assert torch.backends.cudnn.benchmark
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
