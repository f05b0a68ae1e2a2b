"""Aquiles-Image's batching test: four requests 0.2 s apart, against the same four without batching.

Runs, each against a freshly started pod:

1. **staggered, default batching** -- the official ``openai`` client (``AsyncOpenAI``) sends four
   prompts 0.2 s apart (``n=1``, ``b64_json``) to a pod with its default batching settings
   (``--max-batch-size 4``, default ``--max-wait-ms``, as in Aquiles-Image). Each latency is
   measured from that request's own send time; the pod's ``/debug/batches`` log shows which
   batches it formed.
2. **sequential, same pod** -- the same four requests one after another (each sent when the last
   answered), so nothing can batch: each latency is the time of one image alone.
3. **staggered, no batching** -- the staggered arrivals of run 1 against a fresh pod started with
   ``--max-batch-size 1``: the same arrivals served one at a time in arrival order (FIFO).

The target is that batching makes nobody wait longer on average: the mean latency of run 1 is no
worse than that of the unbatched service of the same arrivals (run 3). Run 2 is the floor no
queue can reach (no request ever waits for another); its ratio is printed too. ``makespan`` is
the time from the first send to the last answer.

GPU run::

    python -m bench.seed_test --model synthetic:sd3.5-medium

CPU smoke test::

    python -m bench.seed_test --model tiny --size 64x64 --steps 4
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import urllib.request
from typing import Any

from bench import common

DEFAULT_GAP_S = 0.2


async def _generate(client: Any, prompt: str, args: argparse.Namespace) -> tuple[float, float]:
    """One request through the openai client; (send time, latency), after decoding the image."""
    sent = time.monotonic()
    response = await client.images.generate(
        prompt=prompt,
        n=1,
        size=common.size_text(args.size),
        response_format="b64_json",
        extra_body={"num_inference_steps": args.steps, "guidance_scale": args.guidance, "tier": args.tier},
    )
    await asyncio.to_thread(common.decode_images, response.model_dump())
    return sent, time.monotonic() - sent


def _client(url: str) -> Any:
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=url + "/v1", api_key="not-needed", timeout=900.0, max_retries=0)


async def staggered(url: str, args: argparse.Namespace) -> list[tuple[float, float]]:
    """The prompts sent ``args.gap`` seconds apart, all in flight together."""
    client = _client(url)

    async def delayed(i: int) -> tuple[float, float]:
        await asyncio.sleep(i * args.gap)
        return await _generate(client, common.PROMPTS[i % len(common.PROMPTS)], args)

    try:
        return list(await asyncio.gather(*(delayed(i) for i in range(args.requests))))
    finally:
        await client.close()


async def sequential(url: str, args: argparse.Namespace) -> list[tuple[float, float]]:
    """The prompts one after another: each sent when the previous one answered."""
    client = _client(url)
    try:
        return [
            await _generate(client, common.PROMPTS[i % len(common.PROMPTS)], args)
            for i in range(args.requests)
        ]
    finally:
        await client.close()


def describe(
    name: str, timings: list[tuple[float, float]], batches: list[dict[str, Any]] | None
) -> dict[str, Any]:
    """A run's record: latencies in send order, their summary, the makespan and the batches."""
    start = min(sent for sent, _ in timings)
    end = max(sent + latency for sent, latency in timings)
    record: dict[str, Any] = {
        "event": "run",
        "run": name,
        "latencies_s": [round(lat, 3) for _, lat in timings],
        "sent_at_s": [round(sent - start, 3) for sent, _ in timings],
        **common.summary([lat for _, lat in timings]),
        "makespan_s": round(end - start, 3),
    }
    if batches is not None:
        record["batches"] = [{"size": b["size"], "seconds": b["seconds"]} for b in batches]
    return record


def _batches(url: str, since: int = 0) -> list[dict[str, Any]]:
    import json

    with urllib.request.urlopen(url + "/debug/batches", timeout=10) as resp:
        return list(json.loads(resp.read())["data"][since:])


def run_default_pod(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Runs 1 and 2 on one fresh pod with the default batching settings."""
    records = []
    with common.pod(args.model, args.pod_arg, args.pod_timeout) as pod:
        _, limits = _get_load(pod.url)
        timings = asyncio.run(staggered(pod.url, args))
        first = _batches(pod.url)
        records.append({**describe("staggered_batching", timings, first), "pod_max_batch_size": limits})
        if args.sequential:
            timings = asyncio.run(sequential(pod.url, args))
            records.append(describe("sequential_same_pod", timings, _batches(pod.url, len(first))))
    return records


def run_unbatched_pod(args: argparse.Namespace) -> dict[str, Any]:
    """Run 3: the staggered arrivals against a fresh pod that never batches."""
    with common.pod(args.model, [*args.pod_arg, "--max-batch-size", "1"], args.pod_timeout) as pod:
        timings = asyncio.run(staggered(pod.url, args))
        return describe("staggered_max_batch_1", timings, _batches(pod.url))


def _get_load(url: str) -> tuple[dict[str, Any], int | None]:
    """The pod's load report and its max batch size (what "default batching" means here)."""
    import json

    from imagefleet.wire import LOAD_PATH

    with urllib.request.urlopen(url + LOAD_PATH, timeout=10) as resp:
        report = json.loads(resp.read())
    return report, report.get("max_batch_size")


def comparisons(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean-latency ratios of the batched run against each baseline (< 1: batching is better)."""
    by_name = {r["run"]: r for r in records}
    batched = by_name["staggered_batching"]
    out: dict[str, Any] = {"event": "summary", "batched_mean_s": batched["mean"]}
    for name in ("staggered_max_batch_1", "sequential_same_pod"):
        if name in by_name:
            base = by_name[name]
            out[f"ratio_vs_{name}"] = round(batched["mean"] / base["mean"], 4)
            out[f"makespan_ratio_vs_{name}"] = round(batched["makespan_s"] / base["makespan_s"], 4)
    if "staggered_max_batch_1" in by_name:
        out["target_met"] = batched["mean"] <= by_name["staggered_max_batch_1"]["mean"]
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_model_args(parser)
    parser.add_argument("--requests", "--concurrency", type=int, default=4, help="requests sent (default 4)")
    parser.add_argument(
        "--gap", type=float, default=DEFAULT_GAP_S, help="seconds between the staggered sends"
    )
    parser.add_argument(
        "--no-sequential", dest="sequential", action="store_false", help="skip run 2 (sequential, same pod)"
    )
    parser.add_argument(
        "--no-unbatched",
        dest="unbatched",
        action="store_false",
        help="skip run 3 (fresh --max-batch-size 1 pod)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = common.Results("seed_test")
    results.emit(
        {
            **common.environment(args.model),
            "steps": args.steps,
            "size": common.size_text(args.size),
            "argv": sys.argv[1:] if argv is None else argv,
        }
    )
    records = run_default_pod(args)
    if args.unbatched:
        records.append(run_unbatched_pod(args))
    for record in records:
        results.emit(record)
    summary = comparisons(records)
    results.emit(summary)
    rows = [
        [
            r["run"],
            " ".join(f"{x:.2f}" for x in r["latencies_s"]),
            r["mean"],
            r["min"],
            r["max"],
            r["makespan_s"],
            " ".join(str(b["size"]) for b in r.get("batches", [])),
        ]
        for r in records
    ]
    print(common.table(["run", "latencies s", "mean", "min", "max", "makespan", "batches"], rows))
    print(" ".join(f"{k}={v}" for k, v in summary.items() if k != "event"))
    return 0


if __name__ == "__main__":
    common.main_guard(main)
