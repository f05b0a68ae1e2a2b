"""Queueing between shapes: how long small requests wait behind a flood of large ones.

A simulation of the pod's own batch state (:class:`imagefleet.inference_pod.batchstate.BatchState`,
the code that picks every batch) on a fake clock, with no GPU: each batch takes the time the
cost model gives it, learned from the H200 figures in docs/benchmarks.md (SD3.5-class,
1024x1024, 28 steps: 2.49 s alone, 17.63 s for 8; other shapes priced by work units).

Workload: at t=0, ``--flood`` requests of 4 images at 2048x2048, 50 steps arrive at once (each
batch of 4 takes about a minute); then one request of one 512x512 image at 28 steps every
``--every-s`` seconds for ``--duration-s``. Printed: the small requests' waits (queue time until
their batch starts; those still waiting at the end count with their wait so far) and the share of
GPU time the flood got.

Run it under the code to compare (it adapts to the batch state's constructor)::

    PYTHONPATH=. python -m bench.queueing
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import statistics
from typing import Any

from imagefleet.inference_pod.batching import CompatKey, Sample
from imagefleet.inference_pod.batchstate import BatchState, Job, Take
from imagefleet.inference_pod.costs import CostModel

MEASURED = CompatKey.of("generate", size=(1024, 1024), steps=28, guidance=4.5)
LARGE = CompatKey.of("generate", size=(2048, 2048), steps=50, guidance=4.5)
SMALL = CompatKey.of("generate", size=(512, 512), steps=28, guidance=4.5)
_ids = itertools.count()


def job(key: CompatKey, n: int, now: float) -> Job:
    job_id = f"j{next(_ids)}"
    return Job(job_id, key, [Sample(key, job_id, i, "p", None, i, now) for i in range(n)], now)


def simulate(flood: int, every_s: float, duration_s: float, max_batch: int) -> dict[str, Any]:
    costs = CostModel()
    costs.observe(MEASURED, 1, 2.4894)
    costs.observe(MEASURED, 8, 17.6315)
    params: dict[str, Any] = {"max_batch_size": max_batch, "max_wait_s": 0.0, "fill": True, "costs": costs}
    if "max_queued_images" in inspect.signature(BatchState).parameters:  # the code before admission
        params["max_queued_images"] = 10**9
    state = BatchState(**params)
    for _ in range(flood):
        state.add(job(LARGE, 4, 0.0), 0.0)
    now, arrival = 0.0, every_s
    waits: list[float] = []
    busy = {LARGE: 0.0, SMALL: 0.0}
    while now < duration_s:
        while arrival <= now:
            state.add(job(SMALL, 1, arrival), arrival)
            arrival += every_s
        decision = state.next(now, 1.0)
        if not isinstance(decision, Take):
            now = arrival  # idle until the next arrival
            continue
        key = decision.samples[0].key
        seconds = costs.seconds(key, len(decision.samples)) or 0.0
        if key == SMALL:
            waits += [now - s.enqueued_at for s in decision.samples]
        busy[key] += seconds
        now += seconds
        state.finish()
    unserved = [now - s.enqueued_at for s in state.queue if s.key == SMALL]
    served = len(waits)
    waits = sorted(waits + unserved)
    return {
        "bench": "queueing",
        "large_batch_s": round(costs.seconds(LARGE, 4) or 0.0, 1),
        "small_batch_s": round(costs.seconds(SMALL, 1) or 0.0, 2),
        "small_served": served,
        "small_unserved": len(unserved),
        "small_wait_p50_s": round(statistics.median(waits), 1) if waits else None,
        "small_wait_p99_s": round(waits[int(0.99 * (len(waits) - 1))], 1) if waits else None,
        "small_wait_max_s": round(waits[-1], 1) if waits else None,
        "large_gpu_share": round(busy[LARGE] / max(sum(busy.values()), 1e-9), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flood", type=int, default=60, help="large requests queued at t=0")
    parser.add_argument("--every-s", type=float, default=10.0, help="seconds between small requests")
    parser.add_argument("--duration-s", type=float, default=3600.0, help="simulated seconds")
    parser.add_argument("--max-batch-size", type=int, default=4)
    args = parser.parse_args()
    print(json.dumps(simulate(args.flood, args.every_s, args.duration_s, args.max_batch_size)))


if __name__ == "__main__":
    main()
