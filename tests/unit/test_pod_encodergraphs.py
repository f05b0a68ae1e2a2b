"""Text encoders replayed from captured graphs: same embeddings, one capture per shape, eager when a
capture fails or differs.

The capture here is a stand-in for a CUDA graph with a graph's one property that matters to the
code under test: its outputs live at fixed addresses that every replay overwrites. The real
capture runs on a GPU only (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
import torch

from imagefleet.inference_pod import synthetic
from imagefleet.inference_pod.encodergraphs import (
    ENCODERS,
    GraphedForward,
    graph_encoders,
    identical,
    tensors_of,
)


class FakeGraphs:
    """Captures by running the forward once; a replay runs it again into the same output tensors."""

    def __init__(self, *, fail: bool = False, drift: float = 0.0) -> None:
        self.captures = 0
        self.fail, self.drift = fail, drift

    def __call__(
        self, forward: Callable[..., Any], static: torch.Tensor, kwargs: dict[str, Any]
    ) -> tuple[Callable[[], None], Any]:
        self.captures += 1
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        out = forward(static, **kwargs)

        def replay() -> None:
            for dst, src in zip(tensors_of(out), tensors_of(forward(static, **kwargs)), strict=True):
                dst.copy_(src + self.drift)

        return replay, out


@pytest.fixture()
def pipe() -> Any:
    pipeline = synthetic.build("sd3-tiny", "cpu", torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def encode(pipe: Any, prompts: list[str]) -> tuple[torch.Tensor, ...]:
    with torch.inference_mode():
        return pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, do_classifier_free_guidance=True
        )


def test_graphed_encoders_give_the_eager_embeddings_with_one_capture_per_shape(pipe: Any) -> None:
    eager_one, eager_two = encode(pipe, ["a red fox"]), encode(pipe, ["a cat", "a dog in rain"])
    graphs = FakeGraphs()
    assert graph_encoders(pipe, "cpu", capture=graphs) == len(ENCODERS)
    assert identical(encode(pipe, ["a red fox"]), eager_one)
    assert graphs.captures == 3  # CLIP-L, CLIP-G and T5, at batch 1
    assert identical(encode(pipe, ["a red fox"]), eager_one)
    assert graphs.captures == 3  # replayed, not captured again
    assert identical(encode(pipe, ["a cat", "a dog in rain"]), eager_two)
    assert graphs.captures == 6  # batch 2 is a new shape for each encoder
    assert graph_encoders(pipe, "cpu", capture=graphs) == 0  # already graphed


def test_outputs_are_copies_the_next_replay_does_not_overwrite(pipe: Any) -> None:
    graph_encoders(pipe, "cpu", capture=FakeGraphs())
    t5 = pipe.text_encoder_3
    ids = [torch.randint(0, 100, (1, 256), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    with torch.inference_mode():
        first = t5(ids[0])[0]
        kept = first.clone()
        second = t5(ids[1])[0]
    assert not torch.equal(second, kept)  # the replay wrote other values...
    assert torch.equal(first, kept)  # ...but not into what the first call returned


@pytest.mark.parametrize(
    ("graphs", "why"), [(FakeGraphs(fail=True), "capture failed"), (FakeGraphs(drift=1e-3), "differs")]
)
def test_a_shape_whose_capture_fails_or_differs_stays_eager(
    pipe: Any, graphs: FakeGraphs, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    eager = encode(pipe, ["a red fox"])
    graph_encoders(pipe, "cpu", capture=graphs)
    with caplog.at_level(logging.WARNING, logger="imagefleet.inference_pod.encodergraphs"):
        assert identical(encode(pipe, ["a red fox"]), eager)
        assert identical(encode(pipe, ["a red fox"]), eager)
    assert graphs.captures == 3  # tried once per encoder, then eager for good
    assert sum(why in r.getMessage() for r in caplog.records) == 3


def test_calls_it_cannot_key_run_eagerly() -> None:
    seen: list[Any] = []

    def forward(ids: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append((args, sorted(kwargs)))
        return torch.zeros(1)

    graphs = FakeGraphs()
    graphed = GraphedForward(forward, graphs, device_type="cpu")
    ids = torch.ones(1, 4, dtype=torch.long)
    graphed(ids, attention_mask=torch.ones(1, 4))  # a tensor among the keywords
    graphed(ids, None)  # another positional argument
    graphed(ids.to("meta"))  # not on the graphed device
    assert graphs.captures == 0 and len(seen) == 3


def test_a_cpu_pipeline_is_left_alone(pipe: Any) -> None:
    forwards = [getattr(pipe, name).forward for name in ENCODERS]
    assert graph_encoders(pipe, "cpu") == 0
    assert [getattr(pipe, name).forward for name in ENCODERS] == forwards
