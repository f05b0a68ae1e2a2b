"""The character-level tokenizer of the random-weight pipelines (``tiny`` and ``synthetic:*``).

One token per printable character, so different prompts give different embeddings and nothing is
downloaded. ``framing`` says which special tokens frame a prompt: none (``tiny``), CLIP's start and
end tokens, or T5's end token; ids stay below ``vocab_size`` so any id indexes the real
embedding table of the architecture being imitated.
"""

from __future__ import annotations

import string
from typing import Literal

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

Framing = Literal["none", "clip", "t5"]
SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")


def char_tokenizer(
    max_length: int, *, framing: Framing = "none", vocab_size: int | None = None
) -> PreTrainedTokenizerFast:
    """A tokenizer with one token per printable character; unknown characters share one token."""
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys([*SPECIALS, *string.printable]))}
    if vocab_size is not None and len(vocab) > vocab_size:
        raise ValueError(f"character vocabulary ({len(vocab)}) exceeds the model's ({vocab_size})")
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    if framing != "none":
        framed = ["<bos>", "<eos>"] if framing == "clip" else ["<eos>"]
        template = " ".join(["<bos>", "$A", "<eos>"] if framing == "clip" else ["$A", "<eos>"])
        tok.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(name, vocab[name]) for name in framed]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        model_max_length=max_length,
    )
