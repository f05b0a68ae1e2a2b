"""How long a request that arrives while a batch runs waits to start: request mode vs step mode.

For each ``--batch-mode`` a pod (``--batch-policy fill``, so the batch forms at once; the pods
take turns) runs a request for ``--batch`` images; once it is ``--at`` of the way through its
steps (as the pod's load report estimates what remains of it), a one-image request of the same
shape arrives. Its time to start is its queue wait (``imagefleet_pod_queue_wait_seconds``: from
arrival to its first step, the start of its batch in request mode, its joining the running batch
in step mode), also as a share of the running batch's time (which cancels a shared machine's
load out); its latency is the whole request. The table shows medians (the JSON lines also the
mean, min and max).

CPU run (the figure in docs/reliability.md)::

    PYTHONPATH=. python -m bench.join_latency --model synthetic:sd3-tiny --size 64x64 --steps 12

GPU run::

    python -m bench.join_latency --model synthetic:sd3.5-medium --size 1024x1024 --steps 28
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
import urllib.request
from typing import Any

from bench import common
from imagefleet import metrics


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_model_args(parser)
    parser.add_argument("--batch", type=int, default=4, help="images of the running request")
    parser.add_argument("--at", type=float, default=0.5, help="how far through the batch the probe arrives")
    parser.add_argument("--repeats", type=int, default=3, help="probes per mode")
    parser.add_argument("--modes", default="request,step", help="batch modes to compare")
    return parser.parse_args()


def call(url: str, path: str, body: Any = None, timeout: float = 600.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    with urllib.request.urlopen(urllib.request.Request(url + path, data, headers), timeout=timeout) as reply:
        raw = reply.read()
    return json.loads(raw) if path != "/metrics" else raw.decode()


def generate(url: str, args: argparse.Namespace, n: int, seed: int) -> float:
    started = time.perf_counter()
    body = {
        "prompt": common.PROMPTS[seed % len(common.PROMPTS)],
        "n": n,
        "seed": seed,
        "size": common.size_text(args.size),
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
    }
    call(url, "/v1/images/generations", body)
    return time.perf_counter() - started


def wait_running(url: str, samples: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while call(url, "/v1/load")["running_samples"] < samples:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{samples} samples never ran")
        time.sleep(0.005)


def wait_progress(url: str, at: float, timeout_s: float = 600.0) -> None:
    """Until the running batch is ``at`` of the way through its steps, by the pod's own estimate
    of what remains of it (steps done, not time: this machine may be shared)."""
    deadline = time.monotonic() + timeout_s
    first = 0.0
    while time.monotonic() < deadline:
        remaining = float(call(url, "/v1/load")["running_remaining_seconds"])
        first = first or remaining
        if first and remaining <= first * (1 - at):
            return
        time.sleep(0.005)
    raise TimeoutError("the batch made no progress")


def probe(url: str, args: argparse.Namespace, seed: int) -> dict[str, float]:
    """Start the batch, send the probe ``--at`` of the way through it; the probe's figures."""
    holder: dict[str, float] = {}
    runner = threading.Thread(target=lambda: holder.update(batch=generate(url, args, args.batch, seed)))
    runner.start()
    wait_running(url, args.batch)
    wait_progress(url, args.at)
    before = call(url, "/metrics")
    latency = generate(url, args, 1, seed + 1000)
    after = call(url, "/metrics")
    runner.join()
    wait = common.histogram_delta(before, after, metrics.POD_QUEUE_WAIT_SECONDS)
    return {"start_s": float(wait["mean_s"] or 0.0), "latency_s": latency, "batch_s": holder["batch"]}


def run(args: argparse.Namespace) -> int:
    results = common.Results("join_latency")
    results.emit(common.environment(args.model))
    modes = args.modes.split(",")
    with contextlib.ExitStack() as stack:
        urls = {}
        for mode in modes:
            pod_args = [
                "--batch-mode",
                mode,
                "--batch-policy",
                "fill",
                "--max-batch-size",
                str(args.batch + 1),
            ]
            urls[mode] = stack.enter_context(
                common.pod(args.model, [*pod_args, *args.pod_arg], args.pod_timeout)
            ).url
            generate(urls[mode], args, args.batch, 0)  # lazy initialisation
        # the modes take turns, so that a shared machine's load falls on both alike
        probes: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
        for i in range(args.repeats):
            for mode in modes:
                probes[mode].append(probe(urls[mode], args, 10 * (i + 1)))
        ran_as = {m: sorted({b.get("mode") for b in call(urls[m], "/debug/batches")["data"]}) for m in modes}
    rows = []
    for mode in modes:
        runs = probes[mode]
        record = {
            "event": "mode",
            "batch_mode": mode,
            "ran_as": ran_as[mode],
            "start_s": common.summary([p["start_s"] for p in runs]),
            "start_share_of_batch": common.summary([p["start_s"] / p["batch_s"] for p in runs]),
            "latency_s": common.summary([p["latency_s"] for p in runs]),
            "batch_s": common.summary([p["batch_s"] for p in runs]),
        }
        results.emit(record)
        rows.append(
            [
                mode,
                record["batch_s"]["median"],
                record["start_s"]["median"],
                record["start_share_of_batch"]["median"],
                record["latency_s"]["median"],
            ]
        )
    print(
        common.table(
            ["mode", f"batch of {args.batch} s", "probe start s", "start / batch", "probe latency s"], rows
        )
    )
    return 0


def main() -> int:
    return run(parse())


if __name__ == "__main__":
    common.main_guard(main)
