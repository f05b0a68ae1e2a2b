"""The fault-injection hook: a wrapper around the batch runner and a step hook, classified by type."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from imagefleet import settings as settings_mod
from imagefleet.errors import InvalidRequest
from imagefleet.inference_pod import faults
from imagefleet.inference_pod.app import create_app
from imagefleet.inference_pod.batching import CompatKey, Sample
from imagefleet.inference_pod.worker import BatchRun, Outcome, error_kind
from imagefleet.settings import PodSettings

KEY = CompatKey.of("generate", size=(64, 64), steps=3, guidance=5.0)


def batch(size: int) -> BatchRun:
    return BatchRun(KEY, [Sample(KEY, "j", i, "p", None, i, 0.0) for i in range(size)])


def stepping_runner(run: BatchRun) -> Outcome:
    """Runs the step hooks as the worker does, three steps, one pipeline call."""
    for step in range(run.key.steps):
        for hook in run.hooks:
            hook(run, step, len(run.samples))
    return Outcome(results=[object()] * len(run.samples), timings=[(len(run.samples), 0.5)])


def test_an_unarmed_hook_changes_nothing() -> None:
    outcome = faults.wrap(stepping_runner, faults.FaultPlan())(batch(2))
    assert outcome.error is None and outcome.timings == [(2, 0.5)]


def test_a_runtime_fault_raises_an_injected_fault_classified_by_type() -> None:
    plan = faults.FaultPlan()
    plan.arm("runtime", 1)
    with pytest.raises(faults.InjectedFault) as info:
        faults.wrap(stepping_runner, plan)(batch(1))
    assert error_kind(info.value) == "injected" and error_kind(RuntimeError("x")) == "pipeline"
    assert faults.wrap(stepping_runner, plan)(batch(1)).error is None  # used up


def test_an_oom_fault_raises_cuda_out_of_memory_only_for_large_enough_calls() -> None:
    plan = faults.FaultPlan()
    plan.arm("oom", 1, min_batch=4)
    faults.wrap(stepping_runner, plan)(batch(2))
    with pytest.raises(torch.OutOfMemoryError):
        faults.wrap(stepping_runner, plan)(batch(4))


def test_a_stalled_batch_teaches_nothing_about_the_gpu() -> None:
    plan = faults.FaultPlan()
    plan.arm("stall", 1, seconds=0.0)
    assert faults.wrap(stepping_runner, plan)(batch(1)).timings == []


@pytest.mark.parametrize(
    "body",
    [
        [],
        {"count": -1},
        {"count": "2"},
        {"min_batch": 1.5},
        {"seconds": 601},
        {"seconds": "x"},
        {"kind": "fire"},
    ],
)
def test_arming_rejects_bad_bodies_with_400(body: Any) -> None:
    with pytest.raises(InvalidRequest):
        faults.arm_from_json(faults.FaultPlan(), body)


def test_arming_zero_clears_the_plan() -> None:
    plan = faults.FaultPlan()
    assert faults.arm_from_json(plan, {"kind": "runtime", "count": 2}) == {"armed": 2, "kind": "runtime"}
    faults.arm_from_json(plan, {"count": 0})
    assert plan.take(1) is None


@pytest.mark.parametrize("hook", [True, False])
def test_debug_routes_exist_only_with_the_hook_on(hook: bool) -> None:
    app = create_app(settings_mod.load(PodSettings, env={}, fault_injection=hook))
    paths = {r.canonical for r in app.router.resources()}
    assert ("/debug/faults" in paths) is hook and ("/debug/batches" in paths) is hook
    assert "/v1/images/generations" in paths


def test_a_fault_strikes_at_its_step_and_not_before() -> None:
    plan = faults.FaultPlan()
    plan.arm("runtime", 1, step=2)
    reached: list[int] = []

    def runner(run: BatchRun) -> Outcome:
        for step in range(run.key.steps):
            for hook in run.hooks:
                hook(run, step, len(run.samples))
            reached.append(step)
        return Outcome(results=[object()])

    with pytest.raises(faults.InjectedFault):
        faults.wrap(runner, plan)(batch(1))
    assert reached == [0, 1]


def test_the_step_of_a_fault_must_be_a_non_negative_integer() -> None:
    with pytest.raises(InvalidRequest) as info:
        faults.arm_from_json(faults.FaultPlan(), {"kind": "stall", "step": -1})
    assert info.value.param == "step"
