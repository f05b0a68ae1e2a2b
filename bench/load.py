"""Overload: open-loop load at multiples of measured capacity, and what every request got back.

Starts local mode (``imagefleet serve --model tiny --gpus none --cpu-pods 2``), or with
``--cluster`` the end-to-end setup (a real control plane whose process kubelet runs the Helm
chart's operator and the pods of ``examples/tiny.yaml``, reached through its router pod), then:

1. ``capacity``: a closed loop of ``2 x max batch x pods`` clients for ``--capacity-s`` seconds
   (after a short warm-up); images per second is the capacity C;
2. ``baseline``: Poisson arrivals at ``--normal-x`` (0.5) x C, the pre-overload latency;
3. ``overload``: Poisson arrivals at ``--overload-x`` (10) x C for ``--duration`` (60) seconds;
4. ``burst``: every ``--burst-every-s`` (5) seconds, ``overload-x x C x burst-every-s``
   requests at once (the same mean rate as the overload, all in one instant);
5. ``normal``: Poisson arrivals at ``--normal-x`` x C for ``max(10, duration / 2)`` seconds: how
   long latency takes to come back.

Every request has its own client timeout (``--request-timeout``, well above the longest wait a
bounded queue allows) and is classified: ``image`` (200 with data), ``429`` / ``503`` with a
``Retry-After`` header (the promised answers to overload), or a failure: a 429/503 without
``Retry-After``, any other status (500s...), a connection error, a timeout (a hang).

Reported, one JSON line each: the environment; capacity; per phase the outcome counts and
latency percentiles (images and rejections apart); per second of the run (by send time) the
counts, image p50 and the RSS of the router and of each pod process; the recovery (seconds after
the burst phase ends until image p50 is within 1.5 x the baseline p50, in one second and in a 5 s
window; the normal phase goes on until the window rule holds);
peak RSS (``VmHWM``) of each process. Then a table. Nothing asserts on timings: the figures are
for docs/reliability.md.

    PYTHONPATH=. python -m bench.load                     # local mode, 60 s of 10 x capacity
    PYTHONPATH=. python -m bench.load --duration 10       # CPU smoke run, about a minute
    PYTHONPATH=. python -m bench.load --cluster           # through the in-cluster router

Output: JSON lines (also ``$OUT/load.jsonl`` when ``OUT`` is set), then a table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from bench import common
from bench.common import Workload, free_port_run, process, wait_fleet
from imagefleet.testing.servers import free_port

SERVE_READY_TIMEOUT_S = 600.0
REQUEST_TIMEOUT_S = 300.0
"""Per request: far above the longest legitimate wait (a full queue on the slowest pod)."""
RECOVERY_FACTOR = 1.5
RECOVERY_WINDOW_S = 5.0
ACCEPTED = ("image", "429", "503")


# --- what came back -------------------------------------------------------------------------------


@dataclass
class Outcome:
    phase: str
    sent: float
    """Seconds since the run's start when it was sent."""
    latency: float
    kind: str
    """image, 429, 503, or a failure: 429-no-retry-after, 503-no-retry-after, http-<code>,
    connection:<error>, timeout."""
    retry_after: float | None = None


def classify(status: int, headers: Any, body: bytes) -> str:
    if status == 200:
        return "image" if b'"data"' in body else "http-200-without-data"
    if status in (429, 503):
        return str(status) if headers.get("Retry-After") else f"{status}-no-retry-after"
    return f"http-{status}"


# --- processes and memory -------------------------------------------------------------------------


class Memory:
    """Samples the RSS of the router and each pod process once a second, in a thread."""

    def __init__(self, find: Any) -> None:
        self._find = find  # () -> {label: pid}
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.pids: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self, t0: float) -> None:
        self._t0 = t0
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.sample()

    def sample(self) -> None:
        try:
            pids = self._find()
        except psutil.Error:
            return
        rss = {}
        for label, pid in pids.items():
            with contextlib.suppress(psutil.Error):
                rss[label] = psutil.Process(pid).memory_info().rss
                self.pids[label] = pid
        self.samples.append((time.monotonic() - self._t0, rss))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def peaks(self) -> dict[str, dict[str, Any]]:
        """Per process: VmHWM (the kernel's peak RSS over its whole life) and the largest sample."""
        out: dict[str, dict[str, Any]] = {}
        for label, pid in self.pids.items():
            sampled = [s[label] for _, s in self.samples if label in s]
            out[label] = {
                "pid": pid,
                "vm_hwm_mb": common.proc_status_mib(pid, "VmHWM"),
                "sampled_max_mb": round(max(sampled) / 2**20, 1) if sampled else None,
                "first_sample_mb": round(sampled[0] / 2**20, 1) if sampled else None,
                "last_sample_mb": round(sampled[-1] / 2**20, 1) if sampled else None,
            }
        return out


def local_processes(serve_pid: int) -> dict[str, int]:
    """Local mode: the router runs in ``serve`` itself; its children are the pods."""
    found = {"router": serve_pid}
    for i, child in enumerate(sorted(psutil.Process(serve_pid).children(), key=lambda p: p.pid)):
        found[f"pod{i}"] = child.pid
    return found


def cluster_processes(kubelet_pid: int) -> dict[str, int]:
    """The process kubelet's pod processes: the router pod and the inference pods (and operator)."""
    found: dict[str, int] = {}
    counts: Counter[str] = Counter()
    for proc in sorted(psutil.Process(kubelet_pid).children(recursive=True), key=lambda p: p.pid):
        with contextlib.suppress(psutil.Error):
            argv = proc.cmdline()
            if not any("imagefleet" in a for a in argv):
                continue
            role = next((r for r in ("router", "operator", "pod") if r in argv), None)
            if role is None:
                continue
            label = role if role != "pod" else f"pod{counts[role]}"
            counts[role] += 1
            found[label] = proc.pid
    return found


@contextlib.contextmanager
def local_fleet(args: argparse.Namespace) -> Iterator[tuple[str, Any]]:
    port, pod_port = free_port(), free_port_run(args.pods)
    log = common.run_log_dir("load") / "serve.log"
    cmd = common.serve_command(
        args.model, port, pod_port, args.max_batch_size, cpu_pods=args.pods, extra=args.pod_arg
    )
    with process(cmd, log) as serve:
        url = f"http://127.0.0.1:{port}"
        wait_fleet(url, args.pods, args.timeout, serve, log)
        yield url, lambda: local_processes(serve.pid)


@contextlib.contextmanager
def cluster_fleet(args: argparse.Namespace) -> Iterator[tuple[str, Any]]:
    from imagefleet.devcluster import demo
    from imagefleet.devcluster.controlplane import ControlPlane, Settings

    first = int(os.environ.get("IMAGEFLEET_TEST_FIRST_NODE", "0"))
    with tempfile.TemporaryDirectory(prefix="imagefleet-load-cluster-") as tmp:
        plane = ControlPlane(Settings(state_dir=Path(tmp), first_node_index=first))
        plane.start()
        try:
            demo.install_chart(plane)
            demo.apply_example(plane)
            url = f"http://{demo.router_address(plane)}:8000"
            kubelet = next(p for p in plane.processes if p.name == "kubelet")
            yield url, lambda: cluster_processes(kubelet.pid)
        finally:
            plane.stop()


# --- load -----------------------------------------------------------------------------------------


@dataclass
class Run:
    url: str
    work: Workload
    timeout: float
    t0: float = 0.0
    outcomes: list[Outcome] = field(default_factory=list)
    _n: int = 0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    pending: dict[int, float] = field(default_factory=dict)
    """Send times of the requests still in flight, by request number."""

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def one(self, session: aiohttp.ClientSession, phase: str) -> None:
        self._n += 1
        n = self._n
        body = self.work.body(n)
        sent = self.now()
        retry: float | None = None
        self.pending[n] = sent
        try:
            async with session.post(
                self.url + "/v1/images/generations",
                json=body,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as resp:
                data = await resp.read()
                kind = classify(resp.status, resp.headers, data)
                with contextlib.suppress(ValueError):
                    retry = float(resp.headers.get("Retry-After", ""))
        except TimeoutError:
            kind = "timeout"
        except aiohttp.ClientError as exc:
            kind = f"connection:{type(exc).__name__}"
        del self.pending[n]
        self.outcomes.append(Outcome(phase, sent, self.now() - sent, kind, retry))

    def fire(self, session: aiohttp.ClientSession, phase: str) -> None:
        task = asyncio.create_task(self.one(session, phase))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def poisson(
        self,
        session: aiohttp.ClientSession,
        phase: str,
        rate: float,
        seconds: float,
        until: Callable[[], bool] | None = None,
        most: float = 0.0,
    ) -> None:
        """Poisson arrivals at ``rate`` for ``seconds``; then, given ``until``, on until it is true
        or ``most`` seconds have passed."""
        start = self.now()
        at = start + self.rng.expovariate(rate)
        while True:
            await asyncio.sleep(max(0.0, at - self.now()))
            if at >= start + seconds and (until is None or until() or at >= start + most):
                break
            self.fire(session, phase)
            at += self.rng.expovariate(rate)

    async def bursts(self, session: aiohttp.ClientSession, size: int, count: int, every: float) -> None:
        start = self.now()
        for b in range(count):
            await asyncio.sleep(max(0.0, start + b * every - self.now()))
            for _ in range(size):
                self.fire(session, "burst")
        await asyncio.sleep(max(0.0, start + count * every - self.now()))

    async def closed(self, session: aiohttp.ClientSession, phase: str, clients: int, seconds: float) -> None:
        end = self.now() + seconds

        async def client() -> None:
            while self.now() < end:
                await self.one(session, phase)

        await asyncio.gather(*(client() for _ in range(clients)))

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def recovered(run: Run, limit: float, window: float = RECOVERY_WINDOW_S) -> bool:
    """Whether every request sent in a recent window has come back, with an image p50 within limit
    (the window ends ``window`` seconds ago, so its requests had time to finish)."""
    end = run.now() - window
    sent = [o for o in run.outcomes if end - window <= o.sent < end]
    pending = [t for t in run.pending.values() if end - window <= t < end]
    images = [o.latency for o in sent if o.kind == "image"]
    return bool(images) and not pending and statistics.median(images) <= limit


def capacity_of(outcomes: Sequence[Outcome], start: float, end: float) -> float:
    done = [o for o in outcomes if o.kind == "image" and start <= o.sent + o.latency <= end]
    return len(done) / (end - start) if end > start else 0.0


async def drive(
    args: argparse.Namespace, run: Run, results: common.Results, memory: Memory
) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0)
    marks: dict[str, tuple[float, float]] = {}
    async with aiohttp.ClientSession(connector=connector) as session:
        run.t0 = time.monotonic()
        memory.start(run.t0)
        clients = 2 * args.max_batch_size * args.pods
        await run.closed(session, "warmup", clients, args.warmup_s)
        start = run.now()
        await run.closed(session, "capacity", clients, args.capacity_s)
        marks["capacity"] = (start, run.now())
        capacity = capacity_of(run.outcomes, *marks["capacity"])
        if capacity <= 0:
            raise SystemExit(
                f"no image in {args.capacity_s} s of closed loop: {Counter(o.kind for o in run.outcomes)}"
            )
        results.emit({"event": "capacity", "images_per_s": round(capacity, 3), "clients": clients})
        await asyncio.sleep(args.settle_s)  # let the closed loop's queue empty
        plan = [
            ("baseline", args.normal_x, args.baseline_s),
            ("overload", args.overload_x, args.duration),
        ]
        for phase, x, seconds in plan:
            start = run.now()
            await run.poisson(session, phase, x * capacity, seconds)
            marks[phase] = (start, run.now())
        size = max(1, round(args.overload_x * capacity * args.burst_every_s))
        start = run.now()
        await run.bursts(session, size, args.bursts, args.burst_every_s)
        marks["burst"] = (start, run.now())
        start = run.now()
        baseline = [o.latency for o in run.outcomes if o.phase == "baseline" and o.kind == "image"]
        limit = RECOVERY_FACTOR * statistics.median(baseline) if baseline else math.inf
        await run.poisson(
            session,
            "normal",
            args.normal_x * capacity,
            args.normal_s,
            until=lambda: recovered(run, limit),
            most=args.recovery_max_s,
        )
        marks["normal"] = (start, run.now())
        await run.drain()
        memory.sample()
        memory.stop()
    return {"capacity": capacity, "marks": marks, "burst_size": size}


# --- report ---------------------------------------------------------------------------------------


def phase_record(phase: str, outcomes: Sequence[Outcome], span: tuple[float, float]) -> dict[str, Any]:
    mine = [o for o in outcomes if o.phase == phase]
    kinds = Counter(o.kind for o in mine)
    failures = {k: v for k, v in kinds.items() if k not in ACCEPTED}
    return {
        "event": "phase",
        "phase": phase,
        "seconds": round(span[1] - span[0], 1),
        "requests": len(mine),
        "offered_per_s": round(len(mine) / (span[1] - span[0]), 2) if span[1] > span[0] else None,
        "images": kinds["image"],
        "images_per_s": round(kinds["image"] / (span[1] - span[0]), 2) if span[1] > span[0] else None,
        "429": kinds["429"],
        "503": kinds["503"],
        "failures": sum(failures.values()),
        "failure_kinds": failures,
        "image_latency_s": common.percentiles([o.latency for o in mine if o.kind == "image"]),
        "rejection_latency_s": common.percentiles([o.latency for o in mine if o.kind in ("429", "503")]),
        "retry_after_s": common.percentiles([o.retry_after for o in mine if o.retry_after is not None]),
    }


def per_second(outcomes: Sequence[Outcome], memory: Memory) -> list[dict[str, Any]]:
    by_second: dict[int, list[Outcome]] = {}
    for o in outcomes:
        by_second.setdefault(int(o.sent), []).append(o)
    rss: dict[int, dict[str, int]] = {}
    for t, sample in memory.samples:
        rss[int(t)] = sample
    rows = []
    for s in range(0, max([*by_second, *rss, 0]) + 1):
        mine = by_second.get(s, [])
        kinds = Counter(o.kind for o in mine)
        images = [o.latency for o in mine if o.kind == "image"]
        rows.append(
            {
                "event": "second",
                "t": s,
                "phase": Counter(o.phase for o in mine).most_common(1)[0][0] if mine else None,
                "sent": len(mine),
                "images": kinds["image"],
                "rejected": kinds["429"] + kinds["503"],
                "failures": sum(v for k, v in kinds.items() if k not in ACCEPTED),
                "image_p50_s": round(statistics.median(images), 3) if images else None,
                "rss_mb": {k: round(v / 2**20, 1) for k, v in rss.get(s, {}).items()},
            }
        )
    return rows


def recovery(
    outcomes: Sequence[Outcome], seconds: Sequence[dict[str, Any]], after: float, baseline_p50: float
) -> dict[str, Any]:
    """How long after ``after`` (the end of the bursts) latency is back within the factor of the
    baseline p50: the first second whose image p50 is, and the first 5 s window (by send time, as
    :func:`recovered` judges it while the run goes on) whose median is."""
    limit = RECOVERY_FACTOR * baseline_p50
    later = [r for r in seconds if r["t"] >= math.ceil(after) and r["image_p50_s"] is not None]
    first_within = next((r["t"] for r in later if r["image_p50_s"] <= limit), None)
    images = [o for o in outcomes if o.kind == "image" and o.sent >= after]
    window = None
    for start in range(math.ceil(after), int(max((o.sent for o in images), default=after)) + 1):
        mine = [o.latency for o in images if start <= o.sent < start + RECOVERY_WINDOW_S]
        if mine and statistics.median(mine) <= limit:
            window = start
            break
    return {
        "event": "recovery",
        "baseline_p50_s": round(baseline_p50, 3),
        "limit_s": round(limit, 3),
        "overload_ended_at_s": round(after, 1),
        "first_second_within_after_s": round(first_within - after, 1) if first_within is not None else None,
        "first_window_within_after_s": round(window - after, 1) if window is not None else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cluster", action="store_true", help="the end-to-end cluster, not local mode")
    parser.add_argument(
        "--model", default="tiny", help="local mode's model (the cluster runs examples/tiny.yaml)"
    )
    parser.add_argument("--size", type=common.parse_size, default=(64, 64))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--pods", type=int, default=2, help="CPU pods in local mode (the example runs 2)")
    parser.add_argument("--max-batch-size", type=int, default=4, help="local mode pods' max batch size")
    parser.add_argument(
        "--duration", type=float, default=60.0, help="seconds of overload (10 for a smoke run)"
    )
    parser.add_argument("--overload-x", type=float, default=10.0, help="overload, in multiples of capacity")
    parser.add_argument("--normal-x", type=float, default=0.5, help="normal load, in multiples of capacity")
    parser.add_argument(
        "--warmup-s", type=float, default=None, help="closed-loop warm-up (default duration/6, 3..10)"
    )
    parser.add_argument(
        "--capacity-s", type=float, default=None, help="closed loop measured (default duration/6, 3..10)"
    )
    parser.add_argument("--settle-s", type=float, default=3.0, help="idle seconds after the closed loop")
    parser.add_argument(
        "--baseline-s", type=float, default=None, help="pre-overload normal load (duration/3, 5..20)"
    )
    parser.add_argument("--bursts", type=int, default=None, help="bursts (default duration/15, at least 2)")
    parser.add_argument("--burst-every-s", type=float, default=5.0)
    parser.add_argument(
        "--normal-s", type=float, default=None, help="post-overload normal load (duration/2, >= 10)"
    )
    parser.add_argument(
        "--recovery-max-s",
        type=float,
        default=None,
        help="normal load goes on past --normal-s until latency is back, for at most this long "
        "(default 5 x duration)",
    )
    parser.add_argument("--request-timeout", type=float, default=REQUEST_TIMEOUT_S)
    parser.add_argument("--pod-arg", action="append", default=[], metavar="ARG", help="extra flag for serve")
    parser.add_argument("--timeout", type=float, default=SERVE_READY_TIMEOUT_S, help="seconds to get ready")
    args = parser.parse_args(argv)
    d = args.duration
    args.warmup_s = args.warmup_s if args.warmup_s is not None else min(10.0, max(3.0, d / 6))
    args.capacity_s = args.capacity_s if args.capacity_s is not None else min(10.0, max(3.0, d / 6))
    args.baseline_s = args.baseline_s if args.baseline_s is not None else min(20.0, max(5.0, d / 3))
    args.bursts = args.bursts if args.bursts is not None else max(2, round(d / 15))
    args.normal_s = args.normal_s if args.normal_s is not None else max(10.0, d / 2)
    args.recovery_max_s = (
        args.recovery_max_s if args.recovery_max_s is not None else max(args.normal_s, 5 * d)
    )
    if args.cluster:
        args.pods = 2  # examples/tiny.yaml

    results = common.Results("load")
    work = Workload(args.model, args.size[0], args.size[1], args.steps, None)
    results.emit(
        {
            **common.environment(args.model),
            "target": "cluster" if args.cluster else "local",
            "pods": args.pods,
            "size": common.size_text(args.size),
            "steps": args.steps,
            "load_average": os.getloadavg(),
            "command": "python -m bench.load " + " ".join(argv if argv is not None else sys.argv[1:]),
        }
    )
    fleet = cluster_fleet(args) if args.cluster else local_fleet(args)
    with fleet as (url, find):
        run = Run(url, work, args.request_timeout)
        memory = Memory(find)
        got = asyncio.run(drive(args, run, results, memory))
        peaks = memory.peaks()  # VmHWM while the processes are still there

    marks = got["marks"]
    phases = [
        phase_record(p, run.outcomes, marks[p])
        for p in ("capacity", "baseline", "overload", "burst", "normal")
    ]
    for record in phases:
        results.emit(record)
    seconds = per_second(run.outcomes, memory)
    for row in seconds:
        results.emit(row)
    base = phases[1]["image_latency_s"]
    rec = (
        recovery(run.outcomes, seconds, marks["burst"][1], base["p50"])
        if base
        else {"event": "recovery", "baseline_p50_s": None}
    )
    results.emit(rec)
    results.emit({"event": "memory", "processes": peaks})
    warm = [o for o in run.outcomes if o.phase == "warmup"]
    total = Counter(o.kind for o in run.outcomes if o.phase != "warmup")
    failures = {k: v for k, v in total.items() if k not in ACCEPTED}
    results.emit(
        {
            "event": "total",
            "requests": sum(total.values()),
            "outcomes": dict(total),
            "failures": sum(failures.values()),
            "warmup_outcomes": dict(Counter(o.kind for o in warm)),
            "burst_size": got["burst_size"],
        }
    )

    rows = [
        [
            p["phase"], p["seconds"], p["requests"], p["offered_per_s"], p["images"], p["429"], p["503"],
            p["failures"],
            *((p["image_latency_s"] or {}).get(k) for k in ("p50", "p90", "p99", "max")),
            (p["rejection_latency_s"] or {}).get("p99"),
            (p["retry_after_s"] or {}).get("p50"),
        ]
        for p in phases
    ]  # fmt: skip
    text = [
        f"\n{'cluster' if args.cluster else 'local mode'}, {args.model} {common.size_text(args.size)} x "
        f"{args.steps} steps, {args.pods} CPU pods; capacity {got['capacity']:.2f} images/s; "
        f"bursts of {got['burst_size']} every {args.burst_every_s:g} s",
        common.table(
            [
                "phase",
                "s",
                "requests",
                "req/s",
                "images",
                "429",
                "503",
                "failures",
                "img p50",
                "p90",
                "p99",
                "max",
                "rej p99",
                "Retry-After p50",
            ],
            rows,
        ),
        f"\nrecovery: baseline p50 {rec.get('baseline_p50_s')} s; after the bursts end, p50 back within "
        f"{RECOVERY_FACTOR}x after {rec.get('first_second_within_after_s')} s (one second), "
        f"{rec.get('first_window_within_after_s')} s ({RECOVERY_WINDOW_S:g} s window)",
        "memory (MB): "
        + "; ".join(
            f"{k} peak {v['vm_hwm_mb']} (sampled {v['first_sample_mb']} -> max {v['sampled_max_mb']} -> "
            f"{v['last_sample_mb']})"
            for k, v in peaks.items()
        ),
        f"failures: {sum(failures.values())} {failures or ''}",
    ]
    results.report("\n".join(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
