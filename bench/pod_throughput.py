"""Throughput of one inference pod through its HTTP API, against bare diffusers on the same GPU.

For each batch size ``b`` the benchmark

1. times bare diffusers (:mod:`bench.bare_diffusers`) at batch ``b`` in this process -- all batch
   sizes first, then the pipeline is freed so the pods get the whole card;
2. starts a fresh pod process (``python -m imagefleet pod --model M --max-batch-size b``) and
   drives it with ``2*b`` closed-loop clients: each sends one image request (``n=1``,
   ``b64_json``), decodes the PNG it gets back, and sends the next. With twice the batch size in
   flight, the next batch is already queued while one runs, so the GPU is offered full batches of
   exactly ``b`` back to back -- the service's best case, which is what the ratio is about;
3. skips warm-up batches: at least ``--warmup-batches``, and until the first batch of full size
   has finished (a pod that just started has not yet seen the load that makes it batch fully);
4. measures the next ``--batches`` batches. The pod's ``/debug/batches`` log gives their sizes
   and GPU times in order; responses arrive batch by batch, so the window runs from the last
   response of the last warm-up batch to the last response of the last measured batch, and the
   service's rate is the images delivered in it over its length.

The ratio is service images/hour over bare images/hour at the same ``b``. ``gpu_busy`` (sum of
the measured batches' pipeline times over the window) says how much of the gap is the GPU waiting
between batches, and ``batch_s`` against bare's seconds per batch how much is the pipeline call
itself running slower inside the pod. ``/metrics`` deltas over the window give queue waits.

GPU run (figures in docs/benchmarks.md)::

    python -m bench.pod_throughput --model synthetic:sd3.5-medium --batch-sizes 1,2,4,8

CPU smoke test::

    python -m bench.pod_throughput --model tiny --size 64x64 --steps 4 --batch-sizes 1,2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench import bare_diffusers, common

# /debug/batches keeps the pod's last 200 batches; a window must end before the first drops out.
DEBUG_LOG_LENGTH = 200
POLL_S = 0.05
MAX_WARMUP_BATCHES = 40
BATCH_SECONDS_METRIC = "imagefleet_pod_batch_duration_seconds"
QUEUE_WAIT_METRIC = "imagefleet_pod_queue_wait_seconds"


@dataclass
class Load:
    """What the closed-loop clients saw: response times, latencies and failures."""

    done: list[float] = field(default_factory=list)
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (done at, latency)
    failures: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Settings:
    model: str
    steps: int
    size: tuple[int, int]
    guidance: float
    tier: str
    warmup_batches: int
    batches: int
    deadline_s: float


def warmup_length(sizes: list[int], batch: int, minimum: int) -> int | None:
    """How many of the finished batches (sizes in order) are warm-up; None while undecided.

    Warm-up lasts at least ``minimum`` batches and until one batch of full size has finished; a
    pod that never forms a full batch within ``MAX_WARMUP_BATCHES`` is measured as it is.
    """
    for i, size in enumerate(sizes):
        if i + 1 >= minimum and size == batch:
            return i + 1
    if len(sizes) >= MAX_WARMUP_BATCHES:
        return minimum
    return None


async def _get(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as resp:
        resp.raise_for_status()
        return await (resp.json() if "json" in resp.content_type else resp.text())


async def _client(
    session: aiohttp.ClientSession,
    url: str,
    index: int,
    clients: int,
    cfg: Settings,
    load: Load,
) -> None:
    """One closed-loop client: request, decode, repeat (until cancelled)."""
    k = index
    while True:
        body = {
            "prompt": common.PROMPTS[k % len(common.PROMPTS)],
            "n": 1,
            "size": common.size_text(cfg.size),
            "response_format": "b64_json",
            "num_inference_steps": cfg.steps,
            "guidance_scale": cfg.guidance,
            "seed": k,
            "tier": cfg.tier,
        }
        k += clients
        sent = time.monotonic()
        try:
            async with session.post(url + "/v1/images/generations", json=body) as resp:
                payload = await resp.json()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            load.failures.append(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(0.5)
            continue
        if status != 200:
            load.failures.append(f"HTTP {status}: {str(payload)[:200]}")
            await asyncio.sleep(0.5)
            continue
        await asyncio.to_thread(common.decode_images, payload)
        now = time.monotonic()
        load.done.append(now)
        load.latencies.append((now, now - sent))


async def _until_measured(
    session: aiohttp.ClientSession, url: str, batch: int, cfg: Settings, load: Load
) -> tuple[list[dict[str, Any]], int, str]:
    """Poll the batch log until warm-up and the measured batches are done and answered."""
    deadline = time.monotonic() + cfg.deadline_s
    metrics_at_warm: str | None = None
    while True:
        await asyncio.sleep(POLL_S)
        log: list[dict[str, Any]] = (await _get(session, url + "/debug/batches"))["data"]
        ok = [b for b in log if b["status"] == "ok"]
        warm = warmup_length([b["size"] for b in ok], batch, cfg.warmup_batches)
        if warm is not None and metrics_at_warm is None:
            metrics_at_warm = await _get(session, url + "/metrics")
        if warm is not None and len(ok) >= warm + cfg.batches:
            answered = sum(b["size"] for b in ok[: warm + cfg.batches])
            if len(load.done) >= answered:
                assert metrics_at_warm is not None
                return ok, warm, metrics_at_warm
        if len(log) >= DEBUG_LOG_LENGTH:
            raise RuntimeError("the pod's batch log overflowed before the window closed; use fewer batches")
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"no complete window within {cfg.deadline_s:.0f} s ({len(ok)} batches, {load.failures[:3]})"
            )


def window(ok: list[dict[str, Any]], warm: int, cfg: Settings, load: Load) -> dict[str, Any]:
    """Service rate over the measured batches, from the batch log and the response times."""
    measured = ok[warm : warm + cfg.batches]
    first = sum(b["size"] for b in ok[:warm])
    last = first + sum(b["size"] for b in measured)
    done = sorted(load.done)
    start, end = done[first - 1], done[last - 1]
    seconds = end - start
    gpu = sum(b["seconds"] for b in measured)
    latencies = [lat for at, lat in load.latencies if start < at <= end]
    return {
        "warmup_batches": warm,
        "warmup_sizes": [b["size"] for b in ok[:warm]],
        "measured_sizes": [b["size"] for b in measured],
        "images": last - first,
        "window_s": round(seconds, 3),
        "images_per_hour": round(3600.0 * (last - first) / seconds, 1),
        "batch_s": [round(b["seconds"], 4) for b in measured],
        "gpu_busy": round(gpu / seconds, 4),
        "latency_s": common.summary(latencies) if latencies else None,
    }


async def drive(url: str, batch: int, clients: int, cfg: Settings) -> dict[str, Any]:
    """Run ``clients`` closed-loop clients against the pod at ``url``; measure one window."""
    load = Load()
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    connector = aiohttp.TCPConnector(limit=clients + 4)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        tasks = [asyncio.create_task(_client(session, url, i, clients, cfg, load)) for i in range(clients)]
        try:
            ok, warm, metrics_before = await _until_measured(session, url, batch, cfg, load)
            metrics_after = await _get(session, url + "/metrics")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    result = window(ok, warm, cfg, load)
    result["queue_wait"] = common.histogram_delta(metrics_before, metrics_after, QUEUE_WAIT_METRIC)
    result["batch_duration"] = common.histogram_delta(metrics_before, metrics_after, BATCH_SECONDS_METRIC)
    result["failures"] = load.failures[:5]
    result["failure_count"] = len(load.failures)
    return result


def measure_service(
    cfg: Settings, batch: int, clients: int, pod_args: list[str], pod_timeout: float
) -> dict[str, Any]:
    """Start a pod with max batch ``batch``, drive it, stop it; the window's figures."""
    started = time.monotonic()
    # `fill`: batches of exactly `batch`, the size compared with bare diffusers (the auto policy
    # may cap a shape's batches below the maximum where its cost curve flattens).
    flags = ["--max-batch-size", str(batch), "--batch-policy", "fill", *pod_args]
    with common.pod(cfg.model, flags, pod_timeout) as pod:
        ready_s = time.monotonic() - started
        result = asyncio.run(drive(pod.url, batch, clients, cfg))
    return {
        "event": "service",
        "batch": batch,
        "clients": clients,
        "pod_ready_s": round(ready_s, 1),
        **result,
    }


def report(
    bare: dict[int, bare_diffusers.BareResult], service: dict[int, dict[str, Any]]
) -> list[dict[str, Any]]:
    """One summary row per batch size: bare and service rates and their ratio.

    ``service_s_per_batch`` averages the measured batches of full size only (a smaller batch in
    the window is reported in ``partial_batches``), so against ``bare_s_per_batch`` it says how
    much slower the pipeline call itself ran inside the pod.

    The service rate is the window's, capped at the measured batches' own pace (images over the
    sum of their pipeline times): the pod's GPU thread runs one batch at a time, so no long run
    delivers faster; a short window, which starts at the last warm-up image's response (after its
    encoding) while the GPU is already on the next batch, can look faster (``gpu_busy`` above 1).
    """
    rows = []
    for batch, served in service.items():
        base = bare.get(batch)
        full = [t for t, n in zip(served["batch_s"], served["measured_sizes"], strict=True) if n == batch]
        per_batch = sum(full) / len(full) if full else None
        images = sum(served["measured_sizes"])
        pipeline = round(3600.0 * images / sum(served["batch_s"]), 1)
        rate = min(served["images_per_hour"], pipeline)
        rows.append(
            {
                "event": "summary",
                "batch": batch,
                "bare_s_per_batch": round(base.mean_s, 4) if base else None,
                "bare_images_per_hour": round(base.images_per_hour, 1) if base else None,
                "service_s_per_batch": round(per_batch, 4) if per_batch else None,
                "partial_batches": len(served["batch_s"]) - len(full),
                "window_images_per_hour": served["images_per_hour"],
                "pipeline_images_per_hour": pipeline,
                "service_images_per_hour": rate,
                "ratio": round(rate / base.images_per_hour, 4) if base else None,
                "gpu_busy": served["gpu_busy"],
            }
        )
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_model_args(parser)
    parser.add_argument("--batch-sizes", type=common.parse_int_list, default=[1, 2, 4, 8])
    parser.add_argument("--batches", type=int, default=3, help="measured batches per batch size (service)")
    parser.add_argument("--bare-batches", type=int, default=2, help="timed calls per batch size (bare)")
    parser.add_argument(
        "--warmup-batches", type=int, default=1, help="fewest batches skipped at a pod's start"
    )
    parser.add_argument(
        "--concurrency", type=int, default=None, help="clients per pod (default 2 x batch size)"
    )
    parser.add_argument("--no-bare", action="store_true", help="skip the bare diffusers baseline")
    parser.add_argument("--deadline", type=float, default=900.0, help="longest measurement per batch size, s")
    parser.add_argument(
        "--report",
        metavar="JSONL",
        default=None,
        help="measure nothing: print the summary of an earlier run's pod_throughput.jsonl",
    )
    return parser.parse_args(argv)


def print_summary(rows: list[dict[str, Any]]) -> None:
    headers = [
        "b", "bare s/batch", "bare img/h", "svc s/batch", "partial", "window img/h", "pipeline img/h",
        "svc img/h", "ratio", "gpu busy",
    ]  # fmt: skip
    keys = [
        "batch",
        "bare_s_per_batch",
        "bare_images_per_hour",
        "service_s_per_batch",
        "partial_batches",
        "window_images_per_hour",
        "pipeline_images_per_hour",
        "service_images_per_hour",
        "ratio",
        "gpu_busy",
    ]
    print(common.table(headers, [[row[k] for k in keys] for row in rows]))


def load_report(path: str) -> list[dict[str, Any]]:
    """The summary rows of an earlier run, recomputed from its raw ``bare`` and ``service`` records."""
    bare: dict[int, bare_diffusers.BareResult] = {}
    service: dict[int, dict[str, Any]] = {}
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if record.get("event") == "bare":
                bare[record["batch"]] = bare_diffusers.BareResult(
                    batch=record["batch"],
                    steps=record["steps"],
                    size=record["size"],
                    seconds=record["seconds"],
                )
            elif record.get("event") == "service":
                service[record["batch"]] = record
    return report(bare, service)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        print_summary(load_report(args.report))
        return 0
    results = common.Results("pod_throughput")
    results.emit({**common.environment(args.model), "argv": sys.argv[1:] if argv is None else argv})
    cfg = Settings(
        model=args.model,
        steps=args.steps,
        size=args.size,
        guidance=args.guidance,
        tier=args.tier,
        warmup_batches=max(1, args.warmup_batches),
        batches=args.batches,
        deadline_s=args.deadline,
    )
    bare: dict[int, bare_diffusers.BareResult] = {}
    if not args.no_bare:
        bare = bare_diffusers.run(
            results,
            model=args.model,
            batch_sizes=args.batch_sizes,
            steps=args.steps,
            size=args.size,
            guidance=args.guidance,
            batches=args.bare_batches,
        )
    service = {}
    for batch in args.batch_sizes:
        clients = args.concurrency or 2 * batch
        service[batch] = measure_service(cfg, batch, clients, args.pod_arg, args.pod_timeout)
        results.emit(service[batch])
    rows = report(bare, service)
    for row in rows:
        results.emit(row)
    print_summary(rows)
    return 0


if __name__ == "__main__":
    common.main_guard(main)
