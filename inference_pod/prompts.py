"""Prompt embeddings computed once per model: the empty negative prompt's.

With classifier-free guidance, SD3's pipeline encodes a negative prompt for every sample, the
empty one when the request gives none: CLIP-L, CLIP-G and T5-XXL over 256 tokens of nothing, as
much text-encoder work as the prompt itself. Its embeddings never change, so the pod encodes ``""``
once, on first use, and passes the same tensors (``negative_prompt_embeds``,
``negative_pooled_prompt_embeds``) to every later call: the pipeline then skips that encoding.
The result is the pipeline's own encoding of ``""`` (the positive and negative paths run the same
encoders with the same settings), so images do not change.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch

FAMILIES = ("sd3",)
"""Pipelines whose ``encode_prompt`` takes and returns pooled negative embeddings this way."""


class EmptyNegative:
    """The empty negative prompt's embeddings for one pipeline's text encoders."""

    def __init__(self) -> None:
        self._embeds: tuple[torch.Tensor, torch.Tensor] | None = None
        self._lock = threading.Lock()

    def embeddings(self, pipe: Any) -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock:
            if self._embeds is None:
                with torch.inference_mode():
                    embeds, _, pooled, _ = pipe.encode_prompt(
                        prompt=[""], prompt_2=None, prompt_3=None, do_classifier_free_guidance=False
                    )
                self._embeds = (embeds, pooled)
            return self._embeds

    def kwargs(self, pipe: Any, batch: int) -> dict[str, Any]:
        """Pipeline arguments for ``batch`` samples without a negative prompt."""
        embeds, pooled = self.embeddings(pipe)
        return {
            "negative_prompt_embeds": embeds.expand(batch, -1, -1),
            "negative_pooled_prompt_embeds": pooled.expand(batch, -1),
        }


def negative_kwargs(
    negatives: Sequence[str | None], empty: EmptyNegative | None, pipe: Any, guided: bool
) -> dict[str, Any]:
    """The pipeline's negative-prompt arguments for samples with ``negatives``: their own when any
    has one; the empty prompt's reused embeddings when guidance needs a negative and ``empty`` is
    there; else none (the pipeline then encodes ``""`` itself)."""
    if any(negatives):
        return {"negative_prompt": [n or "" for n in negatives]}
    if guided and empty is not None:
        return empty.kwargs(pipe, len(negatives))
    return {}
