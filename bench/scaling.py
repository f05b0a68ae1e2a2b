"""Images per hour with N GPUs against one, through the router, in one run.

Starts local mode (``python -m imagefleet serve``) with one pod per GPU, then for each N in
``--ns`` (default 1, 2, 4 and 8 where there are that many GPUs) drives N pods through a router
with a closed loop of ``2 x max_batch_size x N`` clients, so every pod always has a full batch
waiting. Answers in the first ``--warmup-s`` seconds of each phase (35: the pods' batch policy
looks back 30 s), and at least the first ``clients``, are warm-up and not counted; the next
``--requests`` (default ``4 x clients``) are, and their rate is the phase's images per hour. The
table shows each N's ratio to one GPU and its efficiency (ratio / N).

Last, after ``--burst-idle-s`` (31) seconds without traffic, the seed's test: 16 simultaneous
requests (32 on 8 GPUs) on all GPUs at once; latency min / p50 / mean / max.

Pods load once (``--mode shared``, the default): the phases with fewer GPUs run a separate
``imagefleet router`` process in front of the first N pods of the local-mode fleet, the same code
as local mode's own router. ``--mode fresh`` starts a new ``imagefleet serve`` per N instead
(slower: every phase loads its weights again).

    python -m bench.scaling                          # synthetic:sd3.5-medium, 1024x1024, 28 steps
    python -m bench.scaling --model tiny --gpus none --pods 2 --requests 8   # CPU smoke run

Output: JSON lines (also ``$OUT/scaling.jsonl`` when ``OUT`` is set; the serve and router logs go
to ``$OUT/scaling-logs/``), then a table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from bench import common
from bench.common import Workload, free_port_run, process, wait_fleet
from imagefleet.localmode import select_gpus
from imagefleet.testing.servers import free_port

SERVE_READY_TIMEOUT_S = 900.0
REQUEST_TIMEOUT_S = 1800.0
PHASE_TIMEOUT_S = 600.0
TINY_DEFAULTS = ((64, 64), 4)


# --- processes ------------------------------------------------------------------------------------


def serve_command(
    args: argparse.Namespace, gpus: Sequence[str], port: int, pod_port: int, pods: int
) -> list[str]:
    return common.serve_command(
        args.model, port, pod_port, args.max_batch_size, gpus=gpus, cpu_pods=pods, extra=args.pod_arg
    )


# --- load -----------------------------------------------------------------------------------------


@dataclass
class Phase:
    n: int
    clients: int
    images: int
    seconds: float
    latencies: list[float]
    errors: int

    @property
    def images_per_hour(self) -> float:
        return 3600.0 * self.images / self.seconds if self.seconds > 0 else 0.0

    def record(self) -> dict[str, Any]:
        return {
            "event": "phase",
            "gpus": self.n,
            "clients": self.clients,
            "images": self.images,
            "seconds": round(self.seconds, 3),
            "images_per_hour": round(self.images_per_hour, 1),
            "errors": self.errors,
            "latency_s": common.summary(self.latencies) if self.latencies else None,
        }


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> bool:
    try:
        async with session.post(url + "/v1/images/generations", json=body) as resp:
            await resp.read()
            return resp.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def closed_loop(
    url: str, work: Workload, n: int, clients: int, warm: int, count: int, warm_s: float = 0.0
) -> Phase:
    """``clients`` clients back to back; answers in the first ``warm_s`` seconds, and at least the
    first ``warm``, are not counted; the next ``count`` are."""
    done: list[float] = []
    latencies: list[float] = []
    errors = 0
    finished = asyncio.Event()
    loop = asyncio.get_running_loop()
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)

    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        began = loop.time()

        async def client(c: int) -> None:
            nonlocal errors, warm
            i = c
            while not finished.is_set():
                sent = loop.time()
                ok = await post(session, url, work.body(i))
                i += clients
                if not ok:
                    errors += 1
                    if errors >= 3 * clients and not done:  # every request fails: stop, do not wait it out
                        finished.set()
                    await asyncio.sleep(1.0)
                    continue
                done.append(loop.time())
                if len(done) == warm + 1 and done[-1] - began < warm_s:
                    warm += 1  # still warming up: the pods' batch policy has not seen the load yet
                if len(done) > warm:
                    latencies.append(loop.time() - sent)
                if len(done) >= warm + count:
                    finished.set()

        tasks = [asyncio.create_task(client(c)) for c in range(clients)]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(finished.wait(), PHASE_TIMEOUT_S)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    counted = done[warm : warm + count]
    start = done[warm - 1] if warm and len(done) >= warm else (done[0] if done else 0.0)
    seconds = (counted[-1] - start) if counted else 0.0
    return Phase(n, clients, len(counted), seconds, latencies[:count], errors)


async def burst(url: str, work: Workload, size: int) -> dict[str, Any]:
    """``size`` simultaneous requests; per-request latency and the wall time of the whole burst."""
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        started = loop.time()

        async def one(i: int) -> float | None:
            ok = await post(session, url, work.body(10_000 + i))
            return loop.time() - started if ok else None

        results = await asyncio.gather(*(one(i) for i in range(size)))
        wall = loop.time() - started
    lat = [r for r in results if r is not None]
    return {
        "event": "burst",
        "requests": size,
        "ok": len(lat),
        "wall_s": round(wall, 3),
        "images_per_hour": round(3600 * len(lat) / wall, 1) if wall else None,
        "latency_s": {
            "min": round(min(lat), 3),
            "p50": round(statistics.median(lat), 3),
            "mean": round(statistics.fmean(lat), 3),
            "max": round(max(lat), 3),
        }
        if lat
        else None,
    }


# --- the run ----------------------------------------------------------------------------------------


def phase_ns(requested: Sequence[int] | None, available: int) -> list[int]:
    ns = [n for n in (requested or (1, 2, 4, 8)) if n <= available]
    if not ns:
        raise SystemExit(f"no N in {requested} fits the {available} pod(s) available")
    return ns


def run_phase(url: str, work: Workload, n: int, args: argparse.Namespace) -> Phase:
    clients = 2 * args.max_batch_size * n
    count = args.requests or 4 * clients
    return asyncio.run(closed_loop(url, work, n, clients, warm=clients, count=count, warm_s=args.warmup_s))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=common.DEFAULT_MODEL)
    parser.add_argument(
        "--size",
        type=common.parse_size,
        default=None,
        help=f"WxH (default {common.DEFAULT_SIZE}; 64x64 for tiny)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help=f"steps (default {common.DEFAULT_STEPS}; 4 for tiny)"
    )
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    parser.add_argument(
        "--gpus", default="all", help="GPUs to use: all, none (CPU pods), or a list such as 0,1"
    )
    parser.add_argument("--pods", type=int, default=2, help="CPU pods when --gpus none")
    parser.add_argument(
        "--ns", type=common.parse_int_list, default=None, help="pod counts to measure (1,2,4,8)"
    )
    parser.add_argument("--max-batch-size", type=int, default=4, help="pods' max batch size")
    parser.add_argument(
        "--requests", type=int, default=None, help="counted requests per phase (default 4 x clients)"
    )
    parser.add_argument(
        "--burst", type=int, default=None, help="simultaneous requests of the last test (16; 32 on 8)"
    )
    parser.add_argument(
        "--warmup-s",
        type=float,
        default=35.0,
        help="seconds of load per phase before counting (the pods' batch policy looks back 30 s)",
    )
    parser.add_argument(
        "--burst-idle-s",
        type=float,
        default=31.0,
        help="idle seconds before the burst, so it meets a fleet at rest, as in the seed's test",
    )
    parser.add_argument(
        "--mode",
        choices=("shared", "fresh"),
        default="shared",
        help="shared: one local-mode fleet, a router per N; fresh: a new local mode per N",
    )
    parser.add_argument(
        "--pod-arg", action="append", default=[], metavar="ARG", help="extra flag for every pod"
    )
    parser.add_argument(
        "--timeout", type=float, default=SERVE_READY_TIMEOUT_S, help="seconds for pods to load"
    )
    args = parser.parse_args(argv)

    tiny = args.model == "tiny"
    (width, height) = args.size or (TINY_DEFAULTS[0] if tiny else common.parse_size(common.DEFAULT_SIZE))
    steps = args.steps or (TINY_DEFAULTS[1] if tiny else common.DEFAULT_STEPS)
    work = Workload(args.model, width, height, steps, args.guidance)
    gpus = select_gpus(args.gpus)
    available = len(gpus) if gpus else args.pods
    ns = phase_ns(args.ns, available)
    used = gpus[: max(ns)]
    logs = common.run_log_dir("scaling")
    results = common.Results("scaling")
    results.emit(
        {
            **common.environment(args.model),
            "gpus_used": used,
            "cpu_pods": None if gpus else max(ns),
            "size": f"{width}x{height}",
            "steps": steps,
            "max_batch_size": args.max_batch_size,
            "mode": args.mode,
            "command": "python -m bench.scaling " + " ".join(argv or sys.argv[1:]),
        }
    )

    phases: list[Phase] = []
    last_burst: dict[str, Any] | None = None
    burst_size = args.burst or (32 if max(ns) >= 8 else 16)
    if args.mode == "shared":
        port, pod_port = free_port(), free_port_run(max(ns))
        log = logs / "serve.log"
        with process(serve_command(args, used, port, pod_port, max(ns)), log) as serve:
            url = f"http://127.0.0.1:{port}"
            wait_fleet(url, max(ns), args.timeout, serve, log)
            pod_urls = [f"http://127.0.0.1:{pod_port + i}" for i in range(max(ns))]
            for n in ns:
                if n == max(ns):
                    phases.append(run_phase(url, work, n, args))
                else:
                    rport = free_port()
                    rlog = logs / f"router-{n}.log"
                    with process(common.router_command(rport, pod_urls[:n]), rlog) as router:
                        rurl = f"http://127.0.0.1:{rport}"
                        wait_fleet(rurl, n, 120, router, rlog)
                        phases.append(run_phase(rurl, work, n, args))
                results.emit(phases[-1].record())
            time.sleep(args.burst_idle_s)
            last_burst = {"gpus": max(ns), **asyncio.run(burst(url, work, burst_size))}
            results.emit(last_burst)
    else:
        for n in ns:
            port, pod_port = free_port(), free_port_run(n)
            log = logs / f"serve-{n}.log"
            with process(serve_command(args, gpus[:n], port, pod_port, n), log) as serve:
                url = f"http://127.0.0.1:{port}"
                wait_fleet(url, n, args.timeout, serve, log)
                phases.append(run_phase(url, work, n, args))
                results.emit(phases[-1].record())
                if n == max(ns):
                    time.sleep(args.burst_idle_s)
                    last_burst = {"gpus": n, **asyncio.run(burst(url, work, burst_size))}
                    results.emit(last_burst)

    base = next((p for p in phases if p.n == 1), None)
    rows = []
    for p in phases:
        ratio = p.images_per_hour / base.images_per_hour if base and base.images_per_hour else None
        rows.append(
            [
                p.n,
                p.clients,
                p.images,
                p.errors,
                p.seconds,
                p.images_per_hour,
                ratio,
                ratio / p.n if ratio else None,
            ]
        )
        results.emit(
            {"event": "ratio", "gpus": p.n, "ratio_to_1": ratio, "efficiency": ratio / p.n if ratio else None}
        )
    text = [
        f"\n{args.model} {width}x{height}, {steps} steps, max batch {args.max_batch_size}, "
        f"{'GPUs ' + ','.join(used) if gpus else 'CPU pods'}",
        common.table(
            ["N", "clients", "images", "errors", "seconds", "images/h", "x 1 pod", "efficiency"], rows
        ),
    ]
    if last_burst and last_burst.get("latency_s"):
        lat = last_burst["latency_s"]
        text.append(
            f"\n{burst_size} simultaneous requests on {last_burst['gpus']} pod(s): {last_burst['ok']} ok, "
            f"wall {last_burst['wall_s']} s; latency min {lat['min']} / p50 {lat['p50']} / "
            f"mean {lat['mean']} / max {lat['max']} s"
        )
    results.report("\n".join(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
