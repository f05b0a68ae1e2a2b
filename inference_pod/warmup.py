"""The start-up warm-up: run small batches once before the pod reports ready.

First requests then do not pay for lazy initialisation, and batch sizes 1, half of max (from 4)
and max are timed at the model's default size, plus one sample at twice the steps, so the batcher
knows from the start what batching buys (the batch cap and whether waiting pays) and admission
prices other shapes by measured costs, per-call overhead told apart from per-step work. It runs the batches itself on the GPU
thread, outside the queue, and hands what they measured to the scheduler.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor

from imagefleet.inference_pod.batching import CompatKey, Sample
from imagefleet.inference_pod.scheduler import Scheduler
from imagefleet.inference_pod.worker import BatchRun, RunBatch
from imagefleet.schema import Defaults

log = logging.getLogger(__name__)

PROMPT = "warm-up"


def warmup_key(defaults: Defaults, scale: int = 1) -> CompatKey:
    """A short generation at the model's default size: a quarter of the default steps (at least 2),
    times ``scale``."""
    steps = max(2, defaults.steps // 4) * scale
    return CompatKey.of("generate", size=defaults.size, steps=steps, guidance=defaults.guidance)


async def warm_up(
    scheduler: Scheduler, run_batch: RunBatch, gpu: Executor, defaults: Defaults, max_batch_size: int
) -> None:
    """Time the batch curve of :func:`warmup_key` (sizes 1, max/2 from 4, and max), then one
    sample at twice its steps, which tells the per-call overhead from the per-step work."""
    loop = asyncio.get_running_loop()
    key = warmup_key(defaults)
    sizes = [1, 1] + ([max_batch_size // 2] if max_batch_size >= 4 else [])
    sizes += [max_batch_size] if max_batch_size > 1 else []
    runs = [(key, size) for size in sizes] + [(warmup_key(defaults, scale=2), 1)]
    started = time.monotonic()
    for i, (run_key, size) in enumerate(runs):
        samples = [Sample(run_key, PROMPT, j, PROMPT, None, seed=j, enqueued_at=0.0) for j in range(size)]
        outcome = await loop.run_in_executor(gpu, run_batch, BatchRun(key=run_key, samples=samples))
        if outcome.error is not None:
            log.warning("Warm-up batch of %d failed: %s", size, outcome.error)
            return
        if i == 0:  # the first run pays for lazy initialisation; learn nothing from its time
            outcome.timings.clear()
        scheduler.learn(run_key, outcome)
    log.info(
        "Warm-up done in %.1f s: batch 1 %.3f s, batch %d %.3f s",
        time.monotonic() - started,
        scheduler.estimate(key, 1) or 0,
        sizes[-1],
        scheduler.estimate(key, sizes[-1]) or 0,
    )
