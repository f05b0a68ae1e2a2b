"""The empty negative prompt is encoded once per model, and images do not change for it."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from imagefleet.inference_pod import synthetic
from imagefleet.inference_pod.prompts import EmptyNegative


@pytest.fixture(scope="module")
def pipe() -> Any:
    pipeline = synthetic.build("sd3-tiny", "cpu", torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def generate(pipe: Any, prompts: list[str], **extra: Any) -> torch.Tensor:
    with torch.inference_mode():
        out = pipe(
            prompt=prompts,
            height=64,
            width=64,
            num_inference_steps=3,
            guidance_scale=4.5,
            generator=[torch.Generator("cpu").manual_seed(7 + i) for i in range(len(prompts))],
            output_type="np",
            **extra,
        )
    return torch.from_numpy(out.images)


class Calls:
    """Counts the T5 encoder's forward calls and the sequences they encode."""

    def __init__(self, module: Any) -> None:
        self.sequences = 0
        inner = module.forward

        def forward(input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.sequences += int(input_ids.shape[0])
            return inner(input_ids, *args, **kwargs)

        module.forward = forward
        self._module = module

    def close(self) -> None:
        del self._module.forward


def test_reused_empty_negative_gives_the_pipelines_own_images(pipe: Any) -> None:
    negative = EmptyNegative()
    one = ["a red fox"]
    assert torch.equal(generate(pipe, one, **negative.kwargs(pipe, 1)), generate(pipe, one))
    # the stock pipeline encodes two empty negatives as a batch of two, whose float rounding
    # differs from a batch of one (as any change of batch composition does): far below one level
    two = ["a red fox", "a lighthouse at dusk"]
    reused = generate(pipe, two, **negative.kwargs(pipe, 2))
    assert float((reused - generate(pipe, two)).abs().max()) < 0.1 / 255


def test_the_empty_negative_is_encoded_once_not_per_call(pipe: Any) -> None:
    calls = Calls(pipe.text_encoder_3)
    try:
        generate(pipe, ["a", "b"])
        stock = calls.sequences
        calls.sequences = 0
        negative = EmptyNegative()
        for _ in range(3):
            generate(pipe, ["a", "b"], **negative.kwargs(pipe, 2))
    finally:
        calls.close()
    assert stock == 4  # two prompts and two empty negatives
    assert calls.sequences == 1 + 3 * 2  # "" once, then only the prompts
