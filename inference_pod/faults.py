"""The fault-injection test hook (``--fault-injection``): make the next batches fail or stall.

Everything about it is here. :func:`wrap` wraps the batch runner so that each batch carries one
more step hook (:data:`~.worker.StepHook`); the worker runs step hooks without knowing what they
do, and the batch loop classifies the failure by its type (:class:`InjectedFault` is a
:class:`~.worker.BatchFault` of kind ``injected``, a device fault; :class:`InjectedInputError`, of
kind ``injected_input``, stands for an input the pipeline cannot take, so the worker retries its
batch sample by sample). The ``/debug/*`` routes exist only when the
hook is on (:mod:`.routes`). Never on in production.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from imagefleet.errors import InvalidRequest
from imagefleet.inference_pod.worker import BatchFault, BatchRun, Outcome, RunBatch

KINDS = ("runtime", "oom", "stall", "input")
MAX_STALL_S = 600


class InjectedFault(BatchFault, RuntimeError):
    """A failure asked for through the fault-injection test hook."""

    kind = "injected"
    device = True  # it stands for a GPU failure


class InjectedInputError(BatchFault, ValueError):
    """A failure as the pipeline raises on an input it cannot take: the input's fault."""

    kind = "injected_input"
    device = False


@dataclass(frozen=True)
class Fault:
    kind: str
    """"runtime": a device fault; "input": the pipeline raises on its input; "oom": CUDA
    out-of-memory; "stall": a slow step."""
    min_batch: int = 1
    seconds: float = 0.0
    step: int = 0
    """The denoising step (from 0) at which it strikes."""


class FaultPlan:
    """The armed faults: the next ``count`` pipeline calls of at least ``min_batch`` samples fail
    (``runtime``, ``input``, ``oom``) or stall for ``seconds`` (``stall``) at their step ``step``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[Fault] = []

    def arm(self, kind: str, count: int, min_batch: int = 1, seconds: float = 0.0, step: int = 0) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}")
        with self._lock:
            self._pending.extend([Fault(kind, min_batch, seconds, step)] * count)

    def clear(self) -> None:
        with self._lock:
            self._pending.clear()

    def take(self, batch_size: int) -> Fault | None:
        with self._lock:
            for i, fault in enumerate(self._pending):
                if batch_size >= fault.min_batch:
                    del self._pending[i]
                    return fault
        return None


class _Hook:
    """One batch's step hook: at the first step of each pipeline call, take an armed fault; act it
    out at its step."""

    def __init__(self, plan: FaultPlan) -> None:
        self.plan = plan
        self.stalled = False
        self.fault: Fault | None = None

    def __call__(self, run: BatchRun, step: int, samples: int) -> None:
        if step == 0:
            self.fault = self.plan.take(samples)
        fault = self.fault
        if fault is None or step != fault.step:
            return
        self.fault = None
        if fault.kind == "stall":
            self.stalled = run.stalled = True
            run.stop.wait(fault.seconds)
        elif fault.kind == "oom":
            raise torch.OutOfMemoryError("injected out-of-memory")
        elif fault.kind == "input":
            raise InjectedInputError("injected input error")
        else:
            raise InjectedFault("injected pipeline fault")


def wrap(run_batch: RunBatch, plan: FaultPlan) -> RunBatch:
    """``run_batch`` with the hook on every batch; a stalled batch's timings are dropped (they say
    nothing about the GPU)."""

    def run(batch: BatchRun) -> Outcome:
        hook = _Hook(plan)
        batch.hooks.append(hook)
        outcome = run_batch(batch)
        if hook.stalled:
            outcome.timings.clear()
        return outcome

    return run


def arm_from_json(plan: FaultPlan, body: Any) -> dict[str, Any]:
    """Apply the body of ``POST /debug/faults``; the answer to send. 400 for a bad body."""
    if not isinstance(body, Mapping):
        raise InvalidRequest("Expected a JSON object.")
    kind, count, min_batch = body.get("kind", "runtime"), body.get("count", 1), body.get("min_batch", 1)
    seconds, step = body.get("seconds", 0.0), body.get("step", 0)
    if not isinstance(count, int) or not isinstance(min_batch, int) or count < 0:
        raise InvalidRequest("count and min_batch must be non-negative integers.")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise InvalidRequest("step must be a non-negative integer.", param="step")
    if not isinstance(seconds, (int, float)) or not 0 <= seconds <= MAX_STALL_S:
        raise InvalidRequest(f"seconds must be a number between 0 and {MAX_STALL_S}.", param="seconds")
    try:
        if count == 0:
            plan.clear()
        else:
            plan.arm(str(kind), count, min_batch, float(seconds), step)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="kind") from None
    return {"armed": count, "kind": kind}
