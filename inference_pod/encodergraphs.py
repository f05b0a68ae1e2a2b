"""The text encoders replayed as CUDA graphs, one per input shape.

A prompt's encoding is many small kernels: CLIP-L, CLIP-G and T5-XXL over 77 and 256 tokens, a few
thousand launches whose work is short next to the time the host takes to issue them. The
tokenizers pad every prompt to a fixed length, so for a given batch size each encoder always sees
the same input shape. :func:`graph_encoders` captures each encoder's forward once per shape as a
CUDA graph and from then on copies the token ids into the graph's input and replays it: one launch
instead of thousands, the same kernels on the same inputs, so the same embeddings.

Each capture is checked: the first replay must equal the eager forward exactly, or that shape stays
eager (and says so in the log). A capture that fails (an encoder that syncs with the host inside
its forward) leaves that shape eager too. Outputs are cloned out of the graph's memory, which the
next replay overwrites. GPU only; on a CPU the encoders are left alone.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
"""Pipeline attributes holding text encoders (SD3: CLIP-L, CLIP-G, T5-XXL)."""

Key = tuple[tuple[int, ...], torch.dtype, str, tuple[tuple[str, Any], ...]]
"""(input shape, dtype, device, keyword arguments): one graph each."""

Capture = Callable[[Callable[..., Any], torch.Tensor, dict[str, Any]], tuple[Callable[[], None], Any]]
"""Captures ``forward(static_input, **kwargs)``: returns the replay and the output it writes to."""


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], out: Any) -> Any:
    """``out`` with ``fn`` applied to every tensor in it (tuples, lists, dicts, model outputs)."""
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, dict):  # transformers' ModelOutput is an OrderedDict
        return type(out)(**{k: map_tensors(fn, v) for k, v in out.items()})
    if isinstance(out, (tuple, list)):
        return type(out)(map_tensors(fn, v) for v in out)
    return out


def tensors_of(out: Any) -> list[torch.Tensor]:
    """Every tensor in ``out``, in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in tensors_of(v)]
    return []


def identical(a: Any, b: Any) -> bool:
    ta, tb = tensors_of(a), tensors_of(b)
    return len(ta) == len(tb) and all(
        x.shape == y.shape and torch.equal(x, y) for x, y in zip(ta, tb, strict=True)
    )


def capture_cuda_graph(
    forward: Callable[..., Any], static: torch.Tensor, kwargs: dict[str, Any]
) -> tuple[Callable[[], None], Any]:
    """PyTorch's recipe: warm up on a side stream (lazy initialisation, cuBLAS workspaces), then
    capture one call."""
    current = torch.cuda.current_stream(static.device)
    side = torch.cuda.Stream(static.device)  # type: ignore[no-untyped-call]
    side.wait_stream(current)
    with torch.cuda.stream(side):
        for _ in range(2):
            forward(static, **kwargs)
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: other threads' CUDA calls (delivery, previews) do not break this capture
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = forward(static, **kwargs)
    return graph.replay, out


class GraphedForward:
    """A module's forward that replays a captured graph per (input shape, keyword arguments).

    Calls it cannot key (other positional arguments, tensors among the keywords, inputs not on
    ``device_type``) run the module's own forward.
    """

    def __init__(self, forward: Callable[..., Any], capture: Capture, device_type: str = "cuda") -> None:
        self.eager = forward
        self.capture = capture
        self.device_type = device_type
        self.graphs: dict[Key, tuple[Callable[[], None], torch.Tensor, Any]] = {}
        self.eager_keys: set[Key] = set()
        self._lock = threading.Lock()

    def key(self, ids: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Key | None:
        if args or not isinstance(ids, torch.Tensor) or ids.device.type != self.device_type:
            return None
        if any(isinstance(v, torch.Tensor) or not isinstance(v, Hashable) for v in kwargs.values()):
            return None
        return (tuple(ids.shape), ids.dtype, str(ids.device), tuple(sorted(kwargs.items())))

    def __call__(self, ids: Any = None, *args: Any, **kwargs: Any) -> Any:
        key = self.key(ids, args, kwargs)
        if key is None or key in self.eager_keys:
            return self.eager(ids, *args, **kwargs)
        with self._lock, torch.inference_mode():
            entry = self.graphs.get(key) or self._capture(key, ids, kwargs)
            if entry is None:
                return self.eager(ids, **kwargs)
            replay, static, out = entry
            static.copy_(ids)
            replay()
            return map_tensors(torch.Tensor.clone, out)

    def _capture(
        self, key: Key, ids: torch.Tensor, kwargs: dict[str, Any]
    ) -> tuple[Callable[[], None], torch.Tensor, Any] | None:
        static = ids.clone()
        try:
            replay, out = self.capture(self.eager, static, kwargs)
            expected = self.eager(ids, **kwargs)
            static.copy_(ids)
            replay()
            same = identical(out, expected)
        except Exception as exc:  # an encoder that cannot be captured still encodes, eagerly
            log.warning(
                "Text encoder input %s stays eager: capture failed (%s: %s)", key[0], type(exc).__name__, exc
            )
            self.eager_keys.add(key)
            return None
        if not same:
            log.warning("Text encoder input %s stays eager: its graph's output differs from eager", key[0])
            self.eager_keys.add(key)
            return None
        self.graphs[key] = (replay, static, out)
        return self.graphs[key]


def graph_encoders(pipe: Any, device: str, capture: Capture = capture_cuda_graph) -> int:
    """Replace each text encoder's forward with a :class:`GraphedForward`; how many were."""
    device_type = torch.device(device).type
    if device_type != "cuda" and capture is capture_cuda_graph:
        return 0
    count = 0
    for name in ENCODERS:
        module = getattr(pipe, name, None)
        if isinstance(module, nn.Module) and not isinstance(module.forward, GraphedForward):
            module.forward = GraphedForward(module.forward, capture, device_type)
            count += 1
    return count
