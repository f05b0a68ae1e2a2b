"""The start-up warm-up: run small batches once before the pod reports ready.

First requests then do not pay for lazy initialisation, and batch sizes 1, half of max (from 4)
and max are timed at the model's default size, plus one sample at twice the steps, so the batcher
knows from the start what batching buys (the batch cap and whether waiting pays) and admission
prices other shapes by measured costs, per-call overhead told apart from per-step work. It runs
the batches itself on the GPU thread, outside the queue, and hands what they measured to the
scheduler.

A compiled pipeline (:mod:`.acceleration`) has static shapes: each (size, batch size) compiles on
its first call. Before timing, the warm-up runs every batch size from 1 to the largest at every
size of ``--warmup-sizes`` (2 steps each: the graphs do not depend on the step count), so no
request at those sizes pays for a compilation. With the compile cache warm this takes seconds.
Every batch size that is timed has run once before, for the same reason in eager pipelines too:
a first call at a batch size pays for set-up (memory, kernel choices; a compilation where the
default size is not a warm-up size) that later calls do not, and a curve timed on first calls
makes batching look dearer than it is.

A warm-up call that makes no image (the pipeline raised on its own prompt, or the device failed)
means every request would fail the same way: :class:`WarmupFailed`, and the pod reports the
load as failed instead of turning ready.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor

from imagefleet.inference_pod.batching import CompatKey, Sample
from imagefleet.inference_pod.scheduler import Scheduler
from imagefleet.inference_pod.worker import BatchRun, Outcome, RunBatch, SampleFailed
from imagefleet.schema import TIERS, Defaults

log = logging.getLogger(__name__)

PROMPT = "warm-up"


class WarmupFailed(RuntimeError):
    """A warm-up call made no image: the pipeline cannot serve (the pod log has the traceback)."""


def check(outcome: Outcome, size: tuple[int, int], batch: int) -> None:
    """Raise :class:`WarmupFailed` unless the warm-up call made at least one image."""
    if outcome.error is None and not all(isinstance(r, SampleFailed) for r in outcome.results):
        return
    error = outcome.error or next(
        (r.__cause__ or r for r in outcome.results if isinstance(r, SampleFailed)), None
    )
    why = f"{type(error).__name__}: {str(error)[:300]}"
    raise WarmupFailed(
        f"the warm-up made no image at {size[0]}x{size[1]}, batch {batch} ({why}); "
        "the pod log has the traceback"
    )


def warmup_key(
    defaults: Defaults, scale: int = 1, *, size: tuple[int, int] | None = None, steps: int | None = None
) -> CompatKey:
    """A short generation at the model's default size: a quarter of the default steps (at least 2),
    times ``scale``; or ``steps`` at ``size``."""
    return CompatKey.of(
        "generate",
        size=size or defaults.size,
        steps=steps or max(2, defaults.steps // 4) * scale,
        guidance=defaults.guidance,
        tier=TIERS[0],
    )


async def compile_shapes(
    run_batch: RunBatch, gpu: Executor, defaults: Defaults, sizes: list[tuple[int, int]], max_batch_size: int
) -> float:
    """Run every batch size at every size once (compiling each shape); returns the seconds taken."""
    started = time.monotonic()
    for size in sizes:
        key = warmup_key(defaults, size=size, steps=2)
        for batch in range(1, max_batch_size + 1):
            shape_started = time.monotonic()
            await run_once(run_batch, gpu, key, batch)
            log.info("Compiled %dx%d at batch %d in %.1f s", *size, batch, time.monotonic() - shape_started)
    return time.monotonic() - started


async def run_once(run_batch: RunBatch, gpu: Executor, key: CompatKey, batch: int) -> Outcome:
    """One warm-up batch of ``batch`` samples of ``key`` on the GPU thread, checked."""
    samples = [Sample(key, PROMPT, j, PROMPT, None, seed=j, enqueued_at=0.0) for j in range(batch)]
    outcome = await asyncio.get_running_loop().run_in_executor(
        gpu, run_batch, BatchRun(key=key, samples=samples)
    )
    check(outcome, (key.width, key.height), batch)
    return outcome


async def warm_up(
    scheduler: Scheduler,
    run_batch: RunBatch,
    gpu: Executor,
    defaults: Defaults,
    max_batch_size: int,
    *,
    sizes: list[tuple[int, int]] | None = None,
    compiled: bool = False,
) -> float:
    """Compile every warm-up shape (when ``compiled``), then time the batch curve of
    :func:`warmup_key` (sizes 1, max/2 from 4, and max) and one sample at twice its steps, which
    tells the per-call overhead from the per-step work. Returns the seconds it took in all."""
    started = time.monotonic()
    compiled_sizes = sizes or [defaults.size]
    if compiled:
        seconds = await compile_shapes(run_batch, gpu, defaults, compiled_sizes, max_batch_size)
        log.info("Compiled every warm-up shape in %.1f s", seconds)
    key = warmup_key(defaults)
    batches = [1] + ([max_batch_size // 2] if max_batch_size >= 4 else [])
    batches += [max_batch_size] if max_batch_size > 1 else []
    if not (compiled and defaults.size in compiled_sizes):
        # each timed batch size once, untimed: the first call at a batch size pays for set-up
        for batch in batches:
            await run_once(run_batch, gpu, warmup_key(defaults, steps=2), batch)
    runs = [(key, size) for size in batches] + [(warmup_key(defaults, scale=2), 1)]
    for run_key, size in runs:
        scheduler.learn(run_key, await run_once(run_batch, gpu, run_key, size))
    log.info(
        "Warm-up done in %.1f s: batch 1 %.3f s, batch %d %.3f s",
        time.monotonic() - started,
        scheduler.estimate(key, 1) or 0,
        batches[-1],
        scheduler.estimate(key, batches[-1]) or 0,
    )
    return time.monotonic() - started
