"""Mixed shapes under Poisson load: latency, time to start and throughput per batching policy.

For one model and one mix of image sizes (``--mix 1024x1024:0.5,512x512:0.5``: sizes and their
shares of the requests), the benchmark

1. starts a pod with the capacity policy (``auto``, the pod's default batching) and measures the
   pod's **capacity** for the mix with a closed loop: ``2 x max batch`` clients per size, each
   sending one request (``n=1``, ``b64_json``) after the other. After ``--capacity-warmup``
   batches of every size, the window runs until every size has ``--capacity-batches`` more. The
   batch log (``/debug/batches``, polled every 0.1 s) gives each size's GPU seconds per image
   ``g_s`` at the batch sizes the policy chose under saturation, and the share of the window the
   GPU was busy; the capacity for the mix is ``busy / sum(w_s g_s)`` images per second (the closed
   loop serves the sizes in whatever proportion fair queueing gives them; this re-weights to the
   mix's shares);
2. for every policy (a named set of pod flags; ``auto``, ``fixed``, ``none`` by default) starts
   one pod and offers it, for each load ``L`` of ``--loads`` (ascending), Poisson arrivals at
   ``L x capacity`` for ``--duration`` seconds (and on until ``--min-requests`` have been sent),
   each request's size drawn from the mix. The arrival sequence (times, sizes, prompts, seeds) is
   seeded by model, mix and load, so every policy gets the same one. Between loads the pod drains (every response back, queue empty).
   The capacity pod runs its loads last, so that the closed loop's saturation has left the
   pod's 30 s load windows before its first Poisson run;
3. per (policy, load, size) and over all sizes reports latency (send to the last byte of the
   response), **time to start** (send to the start of the request's batch), throughput, batch
   sizes, 429s, 503s and failures, and the ratios against the ``none`` policy (no batching) of
   the same run.

Time to start: the batch log has each batch's size, its shape and its seconds, and is read every
0.1 s, so a batch's start is ``(when it first appeared) - (its seconds)``, late by at most one poll
(0.05 s is subtracted: +-0.05 s). Within one size the pod serves its queue oldest first, so the
k-th admitted request of a size (by send time) ran in the batch holding the k-th sample of that
size's batches. Where the counts disagree (a policy that does not batch whole requests in
order, a lost log entry) that size's start times are reported as null. The pod's own queue-wait
histogram (``imagefleet_pod_queue_wait_seconds``, every size together) is reported beside it.

Default policies (``--policy NAME=ARGS`` adds one or replaces one; ARGS are pod flags, split as
a shell would)::

    auto   (none: the pod's defaults: per-shape fair queues, batch cap from the cost curve)
    fixed  --batch-policy fixed --max-batch-size 4 --max-wait-ms 500
    none   --max-batch-size 1

GPU run, one model per invocation (about 6 and 4 minutes by estimate; docs/benchmarks.md says
what a p99 worth reading costs)::

    python -m bench.mixed_load --pod-arg=--compile=off --start-together --duration 20
    python -m bench.mixed_load --pod-arg=--compile=off --start-together --duration 15 \
        --model synthetic:sd1.5 --mix 512x512:1

CPU smoke run (2 to 6 minutes each on 2 shared cores)::

    python -m bench.mixed_load --model tiny --mix 64x64:0.5,128x128:0.5 --steps 2 --duration 5 \
        --min-requests 6 --loads 0.5,0.9 --capacity-batches 2 --start-together
    python -m bench.mixed_load --model synthetic:sd3-tiny --mix 64x64:0.5,128x128:0.5 --steps 2 \
        --duration 5 --min-requests 6 --loads 0.5,0.9 --capacity-batches 2 --start-together

Output: JSON lines (also ``$OUT/mixed_load.jsonl`` when ``OUT`` is set), then a table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import shlex
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench import common

NAME = "mixed_load"
DEFAULT_MIX = "1024x1024:0.5,512x512:0.5"
DEFAULT_LOADS = "0.5,0.7,0.9"
DEFAULT_POLICIES: dict[str, list[str]] = {
    "auto": [],
    "fixed": ["--batch-policy", "fixed", "--max-batch-size", "4", "--max-wait-ms", "500"],
    "none": ["--max-batch-size", "1"],
}
CAPACITY_POLICY = "auto"
BASELINE_POLICY = "none"
POLL_S = 0.1
"""How often the batch log is read; a batch's start is known to within this."""
LOAD_WINDOW_S = 30.0
"""The pod's arrival and busy windows (the auto policy's notion of sustained load)."""
REQUEST_TIMEOUT_S = 600.0
IDLE_TIMEOUT_S = 120.0
DEFAULT_COMPILE_CACHE = Path(tempfile.gettempdir()) / "imagefleet-bench-compile-cache"
QUEUE_WAIT_METRIC = "imagefleet_pod_queue_wait_seconds"


# --- workload -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    width: int
    height: int
    weight: float

    @property
    def text(self) -> str:
        return f"{self.width}x{self.height}"


def parse_mix(text: str) -> list[Shape]:
    """``"1024x1024:0.5,512x512:0.5"`` -> shapes with weights summing to 1 (a missing weight is 1)."""
    shapes: list[Shape] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        size, _, weight = part.partition(":")
        width, height = common.parse_size(size)
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad weight in mix part {part!r}") from None
        if w <= 0 or not math.isfinite(w):
            raise argparse.ArgumentTypeError(f"mix weights must be positive, got {part!r}")
        shapes.append(Shape(width, height, w))
    texts = [s.text for s in shapes]
    if not shapes or len(set(texts)) != len(texts):
        raise argparse.ArgumentTypeError(f"a mix names each size once, like {DEFAULT_MIX}; got {text!r}")
    total = sum(s.weight for s in shapes)
    return [Shape(s.width, s.height, s.weight / total) for s in shapes]


def parse_loads(text: str) -> list[float]:
    """``"0.5,0.7,0.9"`` -> sorted fractions of capacity."""
    try:
        values = sorted(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma separated numbers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"loads must be positive fractions of capacity, got {text!r}")
    return values


def parse_policy(text: str) -> tuple[str, list[str]]:
    """``"NAME=ARGS"`` -> (name, pod flags split as a shell would)."""
    name, sep, rest = text.partition("=")
    if not sep or not name.strip() or not name.strip().replace("-", "").replace("_", "").isalnum():
        raise argparse.ArgumentTypeError(f"a policy looks like NAME=POD-FLAGS, got {text!r}")
    return name.strip(), shlex.split(rest)


@dataclass(frozen=True)
class Arrival:
    at: float
    """Seconds after the run's start."""
    shape: Shape
    index: int


def arrivals(
    shapes: Sequence[Shape], rate: float, duration: float, seed: str, minimum: int = 0
) -> list[Arrival]:
    """Poisson arrivals at ``rate`` per second for ``duration`` seconds (and on until there are
    ``minimum``), sizes drawn from the mix; the same ``seed`` gives the same sequence."""
    rng = random.Random(seed)
    weights = [s.weight for s in shapes]
    out: list[Arrival] = []
    at = rng.expovariate(rate)
    while at < duration or len(out) < minimum:
        out.append(Arrival(at, rng.choices(shapes, weights)[0], len(out)))
        at += rng.expovariate(rate)
    return out


def request_body(shape: Shape, index: int, cfg: Config) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": common.PROMPTS[index % len(common.PROMPTS)],
        "n": 1,
        "size": shape.text,
        "response_format": "b64_json",
        "num_inference_steps": cfg.steps,
        "guidance_scale": cfg.guidance,
        "seed": index,
    }
    if cfg.tier != "lossless":
        body["tier"] = cfg.tier
    return body


@dataclass(frozen=True)
class Config:
    model: str
    shapes: tuple[Shape, ...]
    steps: int
    guidance: float
    tier: str
    request_timeout: float


# --- what came back -------------------------------------------------------------------------------


@dataclass
class Outcome:
    shape: str
    sent: float
    """Seconds after the run's start when it was sent."""
    latency: float
    kind: str
    """image, 429, 503, or a failure: http-<code>, timeout, connection:<error>."""

    @property
    def admitted(self) -> bool:
        """Whether the pod queued it (a 4xx is answered at admission and never runs)."""
        return not (self.kind.startswith("http-4") or self.kind == "429")


def classify(status: int, body: bytes) -> str:
    if status == 200:
        return "image" if b'"b64_json"' in body else "http-200-without-image"
    if status in (429, 503):
        return str(status)
    return f"http-{status}"


async def send(session: aiohttp.ClientSession, url: str, body: dict[str, Any], timeout: float) -> str:
    try:
        async with session.post(
            url + "/v1/images/generations", json=body, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            return classify(resp.status, await resp.read())
    except TimeoutError:
        return "timeout"
    except aiohttp.ClientError as exc:
        return f"connection:{type(exc).__name__}"


# --- the batch log --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    seen_at: float
    """Monotonic time of the first poll that showed it (the batch ended up to POLL_S earlier)."""
    size: int
    seconds: float
    shape: str
    status: str

    @property
    def started_at(self) -> float:
        return self.seen_at - self.seconds - POLL_S / 2


@dataclass
class BatchWatch:
    """Reads ``/debug/batches`` every POLL_S and keeps every batch once, with when it appeared."""

    url: str
    batches: list[Batch] = field(default_factory=list)
    _seen: set[tuple[Any, ...]] = field(default_factory=set)

    async def poll(self, session: aiohttp.ClientSession) -> None:
        async with session.get(self.url + "/debug/batches") as resp:
            resp.raise_for_status()
            log: list[dict[str, Any]] = (await resp.json())["data"]
        now = time.monotonic()
        for entry in log:
            key = (tuple(entry.get("requests", ())), entry.get("seconds"), entry.get("status"))
            if key in self._seen:
                continue
            self._seen.add(key)
            shape = f"{entry.get('width')}x{entry.get('height')}"
            self.batches.append(
                Batch(
                    now, int(entry.get("size", 0)), float(entry.get("seconds", 0.0)), shape, entry["status"]
                )
            )

    async def run(self, session: aiohttp.ClientSession) -> None:
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                await self.poll(session)
            await asyncio.sleep(POLL_S)

    def between(self, start: float, end: float) -> list[Batch]:
        return [b for b in self.batches if start <= b.seen_at <= end]


@contextlib.contextmanager
def watching(watch: BatchWatch, session: aiohttp.ClientSession) -> Iterator[None]:
    task = asyncio.get_running_loop().create_task(watch.run(session))
    try:
        yield
    finally:
        task.cancel()


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as resp:
        resp.raise_for_status()
        return await resp.json()


async def get_text(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url) as resp:
        resp.raise_for_status()
        return await resp.text()


async def until_idle(session: aiohttp.ClientSession, url: str) -> None:
    """Wait until the pod has nothing queued or running."""
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while time.monotonic() < deadline:
        load = await get_json(session, url + "/v1/load")
        if not load.get("queued_samples") and not load.get("running_samples"):
            return
        await asyncio.sleep(POLL_S)
    raise TimeoutError(f"the pod at {url} did not go idle within {IDLE_TIMEOUT_S:.0f} s")


# --- capacity -------------------------------------------------------------------------------------


def capacity_window(
    batches: Sequence[Batch], shapes: Sequence[str], warm: int, measured: int, began: float
) -> tuple[float, float] | None:
    """(start, end) of the measured window once every shape has had ``warm`` batches and then
    ``measured`` more; None until then. ``batches`` are those seen since the closed loop began
    (at ``began``); a window starts when the last shape's warm-up batch was seen."""
    start = began
    for shape in shapes:
        mine = [b for b in batches if b.shape == shape and b.status == "ok"]
        if len(mine) < warm:
            return None
        if warm:
            start = max(start, mine[warm - 1].seen_at)
    ends = []
    for shape in shapes:
        after = [b for b in batches if b.shape == shape and b.status == "ok" and b.seen_at > start]
        if len(after) < measured:
            return None
        ends.append(after[measured - 1].seen_at)
    return start, max(ends)


def capacity_record(
    batches: Sequence[Batch], shapes: Sequence[Shape], window: tuple[float, float]
) -> dict[str, Any]:
    """The mix's capacity from the batches of the closed loop's window (see the module doc)."""
    start, end = window
    inside = [b for b in batches if start < b.seen_at <= end and b.status == "ok"]
    seconds = end - start
    busy = sum(b.seconds for b in inside) / seconds
    per_shape: dict[str, dict[str, Any]] = {}
    cost = 0.0
    for shape in shapes:
        mine = [b for b in inside if b.shape == shape.text]
        images = sum(b.size for b in mine)
        gpu = sum(b.seconds for b in mine)
        g = gpu / images
        cost += shape.weight * g
        per_shape[shape.text] = {
            "weight": round(shape.weight, 4),
            "batches": [b.size for b in mine],
            "images": images,
            "gpu_s": round(gpu, 3),
            "gpu_s_per_image": round(g, 4),
        }
    served = sum(b.size for b in inside)
    return {
        "event": "capacity",
        "window_s": round(seconds, 3),
        "gpu_busy": round(busy, 4),
        "served_images_per_s": round(served / seconds, 4),
        "images_per_s": round(busy / cost, 4),
        "shapes": per_shape,
    }


async def closed_loop(
    session: aiohttp.ClientSession, url: str, cfg: Config, shape: Shape, first: int, step: int
) -> None:
    """One client sending ``shape`` requests back to back until cancelled."""
    index = first
    while True:
        kind = await send(session, url, request_body(shape, index, cfg), cfg.request_timeout)
        index += step
        if kind != "image":
            await asyncio.sleep(0.5)


async def measure_capacity(
    url: str, cfg: Config, warm: int, measured: int, deadline_s: float
) -> dict[str, Any]:
    """The closed loop on the capacity pod; its record (see :func:`capacity_record`)."""
    watch = BatchWatch(url)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        max_batch = int((await get_json(session, url + "/v1/load")).get("max_batch_size", 1))
        per_shape = 2 * max_batch
        clients = len(cfg.shapes) * per_shape
        await watch.poll(session)
        with watching(watch, session):
            began = time.monotonic()
            tasks = [
                asyncio.create_task(closed_loop(session, url, cfg, shape, s * per_shape + i, clients))
                for s, shape in enumerate(cfg.shapes)
                for i in range(per_shape)
            ]
            window = None
            try:
                while window is None and time.monotonic() - began < deadline_s:
                    await asyncio.sleep(POLL_S)
                    window = capacity_window(
                        watch.between(began, math.inf), [s.text for s in cfg.shapes], warm, measured, began
                    )
            finally:
                for task in tasks:
                    task.cancel()  # the pod drops the queued samples of closed connections
                await asyncio.gather(*tasks, return_exceptions=True)
            if window is None:
                raise TimeoutError(
                    f"no capacity window within {deadline_s:.0f} s: batches "
                    f"{[(b.shape, b.size, b.status) for b in watch.between(began, math.inf)]}"
                )
            await until_idle(session, url)
        record = capacity_record(watch.between(began, math.inf), cfg.shapes, window)
    record.update(clients=clients, max_batch_size=max_batch, closed_loop_s=round(time.monotonic() - began, 1))
    return record


# --- one Poisson run ------------------------------------------------------------------------------


@dataclass
class RunResult:
    load: float
    rate: float
    duration: float
    """Seconds of arrivals."""
    outcomes: list[Outcome]
    batches: list[Batch]
    t0: float
    """Monotonic time of the run's start (arrival times count from it)."""
    end: float
    """Seconds after t0 when the last response came back."""
    queue_wait: dict[str, float | None]


async def poisson_run(
    session: aiohttp.ClientSession, url: str, cfg: Config, watch: BatchWatch, run: Planned
) -> RunResult:
    """Offer the planned arrivals to the pod, wait for every answer and for the pod to be idle."""
    metrics_before = await get_text(session, url + "/metrics")
    outcomes: list[Outcome] = []
    t0 = time.monotonic()

    async def one(arrival: Arrival) -> None:
        sent = time.monotonic() - t0
        kind = await send(session, url, request_body(arrival.shape, arrival.index, cfg), cfg.request_timeout)
        outcomes.append(Outcome(arrival.shape.text, sent, time.monotonic() - t0 - sent, kind))

    tasks = []
    for arrival in run.arrivals:
        await asyncio.sleep(max(0.0, arrival.at - (time.monotonic() - t0)))
        tasks.append(asyncio.create_task(one(arrival)))
    await asyncio.gather(*tasks)
    end = time.monotonic() - t0
    await until_idle(session, url)
    await watch.poll(session)
    metrics_after = await get_text(session, url + "/metrics")
    return RunResult(
        load=run.load,
        rate=run.rate,
        duration=run.duration,
        outcomes=sorted(outcomes, key=lambda o: o.sent),
        batches=watch.between(t0, math.inf),
        t0=t0,
        end=end,
        queue_wait=common.histogram_delta(metrics_before, metrics_after, QUEUE_WAIT_METRIC),
    )


@dataclass(frozen=True)
class Planned:
    """One load's arrivals, the same for every policy."""

    load: float
    rate: float
    duration: float
    arrivals: list[Arrival]


def plan_runs(args: argparse.Namespace, capacity: float) -> list[Planned]:
    """The arrivals of every load: ``--duration`` seconds, or longer where fewer than
    ``--min-requests`` would arrive in it."""
    out = []
    for load in args.loads:
        rate = load * capacity
        got = arrivals(args.mix, rate, args.duration, seed_of(args, load), args.min_requests)
        duration = max(args.duration, got[-1].at if got else 0.0)
        out.append(Planned(load, rate, duration, got))
    return out


async def run_loads(url: str, cfg: Config, plan: Sequence[Planned]) -> list[RunResult]:
    """Every load of ``plan`` in turn on one pod."""
    watch = BatchWatch(url)
    results = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await watch.poll(session)  # batches run before (the closed loop's) are not this run's
        with watching(watch, session):
            for planned in plan:
                results.append(await poisson_run(session, url, cfg, watch, planned))
    return results


# --- report ---------------------------------------------------------------------------------------


def start_times(run: RunResult, shape: str) -> tuple[list[float] | None, int]:
    """Time to start of each admitted request of ``shape`` (send order), and the violations of
    causality (a batch seen starting before the request was sent); None where the batch log does
    not account for exactly the admitted requests."""
    admitted = [o for o in run.outcomes if o.shape == shape and o.admitted]
    batches = [b for b in run.batches if b.shape == shape]
    if sum(b.size for b in batches) != len(admitted):
        return None, 0
    starts = [b.started_at - run.t0 for b in batches for _ in range(b.size)]
    waits = [start - o.sent for start, o in zip(starts, admitted, strict=True)]
    violations = sum(1 for w in waits if w < -POLL_S)
    return [max(0.0, w) for w in waits], violations


def shape_record(run: RunResult, shape: str | None) -> dict[str, Any]:
    """One (run, shape) line; ``shape`` None: every shape together."""
    duration = run.duration
    mine = [o for o in run.outcomes if shape is None or o.shape == shape]
    kinds = Counter(o.kind for o in mine)
    failures = {k: v for k, v in kinds.items() if k not in ("image", "429", "503")}
    shapes = [shape] if shape is not None else sorted({o.shape for o in run.outcomes})
    waits: list[float] | None = []
    violations = 0
    for s in shapes:
        got, bad = start_times(run, s)
        violations += bad
        waits = None if got is None or waits is None else waits + got
    batches = [b for b in run.batches if shape is None or b.shape == shape]
    images = [o for o in mine if o.kind == "image"]
    in_time = [o for o in images if o.sent + o.latency <= duration]
    return {
        "shape": shape or "all",
        "requests": len(mine),
        "images": kinds["image"],
        "429": kinds["429"],
        "503": kinds["503"],
        "failures": sum(failures.values()),
        "failure_kinds": failures,
        "offered_per_s": round(len(mine) / duration, 4),
        "images_per_s": round(len(images) / run.end, 4) if run.end > 0 else None,
        "images_per_s_within_duration": round(len(in_time) / duration, 4),
        "latency_s": common.percentiles([o.latency for o in images]),
        "start_s": common.percentiles(waits) if waits is not None else None,
        "start_mean_s": round(statistics.fmean(waits), 4) if waits else None,
        "start_order_violations": violations,
        "batches": len(batches),
        "batch_sizes": dict(sorted(Counter(b.size for b in batches).items())),
        "mean_batch": round(statistics.fmean(b.size for b in batches), 3) if batches else None,
    }


def run_records(model: str, policy: str, run: RunResult, shapes: Sequence[Shape]) -> list[dict[str, Any]]:
    head = {"event": "result", "model": model, "policy": policy, "load": run.load}
    records = [{**head, **shape_record(run, s.text)} for s in shapes]
    total = {**head, **shape_record(run, None)}
    gpu = sum(b.seconds for b in run.batches)
    total.update(
        rate_per_s=round(run.rate, 4),
        duration_s=round(run.duration, 3),
        makespan_s=round(run.end, 3),
        gpu_busy=round(gpu / run.end, 4) if run.end > 0 else None,
        pod_queue_wait=run.queue_wait,
    )
    return [*records, total]


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a is not None and b else None


def ratios(records: Sequence[dict[str, Any]], baseline: str) -> list[dict[str, Any]]:
    """Each policy's figures over the baseline policy's at the same (model, load, shape)."""
    base = {(r["model"], r["load"], r["shape"]): r for r in records if r["policy"] == baseline}
    out = []
    for r in records:
        b = base.get((r["model"], r["load"], r["shape"]))
        if b is None or r["policy"] == baseline:
            continue
        lat, blat = r["latency_s"] or {}, b["latency_s"] or {}
        out.append(
            {
                "event": "ratio",
                "baseline": baseline,
                "model": r["model"],
                "policy": r["policy"],
                "load": r["load"],
                "shape": r["shape"],
                "p50": _ratio(lat.get("p50"), blat.get("p50")),
                "p99": _ratio(lat.get("p99"), blat.get("p99")),
                "images_per_s": _ratio(r["images_per_s"], b["images_per_s"]),
            }
        )
    return out


def print_table(records: Sequence[dict[str, Any]], rows_ratio: Sequence[dict[str, Any]]) -> str:
    by_key = {(r["model"], r["policy"], r["load"], r["shape"]): r for r in rows_ratio}
    rows = []
    for r in records:
        lat, start = r["latency_s"] or {}, r["start_s"] or {}
        q = by_key.get((r["model"], r["policy"], r["load"], r["shape"]), {})
        rows.append(
            [
                r["policy"], r["load"], r["shape"], r["requests"], r["images"], r["429"], r["503"],
                r["failures"], r["images_per_s"], lat.get("p50"), lat.get("p99"), start.get("p50"),
                start.get("p99"), r["mean_batch"], q.get("p50"), q.get("p99"), q.get("images_per_s"),
            ]
        )  # fmt: skip
    headers = [
        "policy", "load", "shape", "req", "img", "429", "503", "fail", "img/s", "lat p50", "lat p99",
        "start p50", "start p99", "mean b", "p50/none", "p99/none", "img/s /none",
    ]  # fmt: skip
    return common.table(headers, rows)


# --- pods -----------------------------------------------------------------------------------------


class Pods:
    """The pods of one run, one per policy, stopped when ``stack`` closes (or by :meth:`stop`)."""

    def __init__(
        self, args: argparse.Namespace, policies: dict[str, list[str]], stack: contextlib.ExitStack,
        results: common.Results,
    ) -> None:  # fmt: skip
        self._args, self._policies, self._results = args, policies, results
        self._stack = stack
        self._started: dict[str, tuple[Any, float]] = {}
        self._ready: dict[str, Any] = {}

    def start(self, name: str) -> None:
        """Launch the pod of policy ``name`` (without waiting for it)."""
        from imagefleet.testing.servers import PodProcess

        flags = [
            "--model",
            self._args.model,
            "--fault-injection",
            *pod_args(self._args, self._policies[name]),
        ]
        process = PodProcess(flags, log_dir=common.log_dir()).start()
        self._stack.callback(process.stop, timeout=10.0)
        self._started[name] = (process, time.monotonic())

    def ready(self, name: str) -> Any:
        """The pod of ``name`` once ready (started now if it was not); RuntimeError or
        TimeoutError, at once, if its process exits or it is not ready in time."""
        if name in self._ready:
            return self._ready[name]
        if name not in self._started:
            self.start(name)
        process, began = self._started[name]
        wait_ready(process, self._args.pod_timeout)
        self._results.emit(
            {
                "event": "pod",
                "model": self._args.model,
                "policy": name,
                "pod_args": pod_args(self._args, self._policies[name]),
                "ready_s": round(time.monotonic() - began, 1),
            }
        )
        self._ready[name] = process
        return process

    def wait_all(self, names: Sequence[str]) -> None:
        """Wait for each of ``names`` to be ready; a pod that fails to start fails later, in
        :meth:`ready`, as its policy runs."""
        for name in names:
            with contextlib.suppress(RuntimeError, TimeoutError):
                self.ready(name)

    def stop(self, name: str) -> None:
        self._started[name][0].stop(timeout=10.0)


def wait_ready(process: Any, timeout: float) -> None:
    """Wait for ``/readyz`` to answer 200; fail as soon as the process exits (a flag it does not
    know) with the end of its log."""
    from imagefleet.testing.servers import get_json

    deadline = time.monotonic() + timeout
    while True:
        code = process.proc.poll()
        if code is not None:
            raise RuntimeError(f"the pod exited with {code}; log:\n{process.log_tail(10)}")
        with contextlib.suppress(OSError, ValueError):
            if get_json(process.url + "/readyz", timeout=2)[0] == 200:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the pod was not ready within {timeout:.0f} s; log:\n{process.log_tail(10)}")
        time.sleep(0.2)


# --- the whole run --------------------------------------------------------------------------------


def pod_args(args: argparse.Namespace, policy_args: Sequence[str]) -> list[str]:
    """Flags of every pod: warm-up and compile cache, then --pod-arg, then the policy's own."""
    flags = ["--default-steps", str(args.steps), "--default-guidance", str(args.guidance)]
    warm = args.warmup_sizes
    if warm == "mix":
        warm = ",".join(s.text for s in args.mix)
    if warm and warm != "none":
        flags += ["--warmup-sizes", warm]
    if args.compile_cache_dir:
        flags += ["--compile-cache-dir", args.compile_cache_dir]
    return [*flags, *args.pod_arg, *policy_args]


def estimate_s(
    policies: int, durations: Sequence[float], pod_start_s: float, starts: int, closed_loop: bool
) -> float:
    """Rough wall time: ``starts`` pod start-ups one after another, the closed loop (about 30 s),
    and on every policy's pod each load's arrivals (``durations``) and a drain of a few seconds."""
    runs = sum(d * 1.15 + 3.0 for d in durations) * policies
    return float(starts * pod_start_s + (30.0 if closed_loop else 0.0) + runs)


def policy_order(args: argparse.Namespace) -> tuple[dict[str, list[str]], list[str]]:
    """The policies' flags and the order they run in (the capacity policy's loads last)."""
    policies = dict(DEFAULT_POLICIES)
    named = [p.strip() for p in args.policies.split(",") if p.strip()]
    for name, flags in args.policy:
        policies[name] = flags
        if name not in named:
            named.append(name)
    unknown = [n for n in [*named, args.capacity_policy] if n not in policies]
    if unknown:
        raise SystemExit(f"unknown policies {unknown}: give their flags with --policy NAME=ARGS")
    order = [n for n in named if n != args.capacity_policy]
    if args.capacity_policy in named:
        order.append(args.capacity_policy)
    return policies, order


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    policies, order = policy_order(args)
    results = common.Results(NAME)
    cfg = Config(args.model, tuple(args.mix), args.steps, args.guidance, args.tier, args.request_timeout)
    results.emit(
        {
            **common.environment(args.model),
            "mix": {s.text: round(s.weight, 4) for s in args.mix},
            "steps": args.steps,
            "guidance": args.guidance,
            "loads": args.loads,
            "duration_s": args.duration,
            "policies": {n: policies[n] for n in order},
            "capacity_policy": args.capacity_policy,
            "argv": list(argv) if argv is not None else sys.argv[1:],
        }
    )
    starts = min(2, len(order)) if args.start_together else len(order)
    durations = [args.duration] * len(args.loads)
    guess = estimate_s(len(order), durations, args.pod_start_s, starts, closed_loop=args.capacity is None)
    results.emit({"event": "estimate", "wall_s": round(guess), "pod_start_s_assumed": args.pod_start_s})
    print(
        f"# about {guess / 60:.1f} min: {len(order)} pods (~{args.pod_start_s:.0f} s each to start), "
        f"{len(order) * len(args.loads)} runs of {args.duration:g} s of arrivals",
        file=sys.stderr,
        flush=True,
    )
    started = time.monotonic()
    records: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        pods = Pods(args, policies, stack, results)
        cap_needed = args.capacity is None or args.capacity_policy in order
        cap_pod, first_start_s = None, args.pod_start_s
        if cap_needed:
            t = time.monotonic()
            cap_pod = pods.ready(args.capacity_policy)
            first_start_s = time.monotonic() - t
        if args.start_together:
            # After the capacity pod: its warm-up times the cost curve its policy batches by,
            # which a GPU shared with other warm-ups would distort.
            others = [n for n in order if n != args.capacity_policy]
            for name in others:
                pods.start(name)
            pods.wait_all(others)
        if args.capacity is not None:
            capacity = args.capacity
            results.emit({"event": "capacity", "model": args.model, "images_per_s": capacity, "given": True})
        else:
            assert cap_pod is not None
            record = asyncio.run(
                measure_capacity(
                    cap_pod.url, cfg, args.capacity_warmup, args.capacity_batches, args.capacity_deadline
                )
            )
            capacity = record["images_per_s"]
            results.emit({**record, "model": args.model, "policy": args.capacity_policy})
        capacity_done = time.monotonic()
        starts = 0 if args.start_together else len(order) - 1  # those still to come
        plan = plan_runs(args, capacity)
        left = estimate_s(len(order), [p.duration for p in plan], first_start_s, starts, closed_loop=False)
        results.emit(
            {"event": "estimate", "left_s": round(left), "durations_s": [round(p.duration, 1) for p in plan]}
        )
        print(
            f"# capacity {capacity:.4g} images/s; about {left / 60:.1f} min left", file=sys.stderr, flush=True
        )
        for name in order:
            try:
                if name == args.capacity_policy:
                    assert cap_pod is not None
                    # The closed loop's saturation must leave the pod's load windows first.
                    time.sleep(max(0.0, LOAD_WINDOW_S - (time.monotonic() - capacity_done)))
                    got = asyncio.run(run_loads(cap_pod.url, cfg, plan))
                else:
                    pod = pods.ready(name)
                    got = asyncio.run(run_loads(pod.url, cfg, plan))
                    pods.stop(name)  # its GPU memory back before the next one starts
            except (RuntimeError, TimeoutError, aiohttp.ClientError) as exc:
                # A pod that does not start (a flag it does not know) or stops answering: the
                # other policies still run.
                error = f"{type(exc).__name__}: {exc}"[-3000:]
                results.emit({"event": "policy_failed", "model": args.model, "policy": name, "error": error})
                continue
            for run in got:
                for record in run_records(args.model, name, run, args.mix):
                    results.emit(record)
                    records.append(record)
    ratio_rows = ratios(records, args.baseline)
    for row in ratio_rows:
        results.emit(row)
    results.emit(
        {"event": "done", "wall_s": round(time.monotonic() - started, 1), "estimated_s": round(guess)}
    )
    print(
        f"\n{args.model}, mix {', '.join(f'{s.text} {s.weight:.2f}' for s in args.mix)}, {args.steps} steps; "
        f"capacity {capacity:.4g} images/s ({args.capacity_policy}); arrivals for "
        f"{', '.join(f'{p.duration:.0f}' for p in plan)} s at loads {', '.join(f'{p.load:g}' for p in plan)}; "
        f"latency and time to start in s; ratios against {args.baseline!r}"
    )
    print(print_table(records, ratio_rows))
    return 0


def seed_of(args: argparse.Namespace, load: float) -> str:
    return f"{args.seed}:{args.model}:{','.join(f'{s.text}:{s.weight:.6f}' for s in args.mix)}:{load:g}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=common.DEFAULT_MODEL, help=f"model (default {common.DEFAULT_MODEL})"
    )
    parser.add_argument(
        "--mix",
        type=parse_mix,
        default=parse_mix(DEFAULT_MIX),
        help=f"sizes and shares (default {DEFAULT_MIX})",
    )
    parser.add_argument("--steps", type=int, default=common.DEFAULT_STEPS, help="denoising steps per image")
    parser.add_argument("--guidance", type=float, default=common.DEFAULT_GUIDANCE, help="guidance scale")
    parser.add_argument("--tier", default="lossless", choices=("lossless", "fast"))
    parser.add_argument(
        "--loads",
        type=parse_loads,
        default=parse_loads(DEFAULT_LOADS),
        help="fractions of capacity (0.5,0.7,0.9)",
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per (policy, load)")
    parser.add_argument(
        "--min-requests",
        type=int,
        default=0,
        help="offer at least this many requests per run: a load's arrivals go on past --duration until then",
    )
    parser.add_argument(
        "--policies", default=",".join(DEFAULT_POLICIES), help="policies run, in order (auto,fixed,none)"
    )
    parser.add_argument(
        "--policy",
        type=parse_policy,
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="add or replace a policy: pod flags, e.g. --policy step=--batch-mode=step (repeatable)",
    )
    parser.add_argument(
        "--capacity-policy", default=CAPACITY_POLICY, help="policy whose pod measures capacity"
    )
    parser.add_argument("--baseline", default=BASELINE_POLICY, help="policy the ratios are against")
    parser.add_argument(
        "--capacity", type=float, default=None, help="images/s: skip the closed loop and use this capacity"
    )
    parser.add_argument("--capacity-warmup", type=int, default=1, help="closed-loop batches per size skipped")
    parser.add_argument(
        "--capacity-batches", type=int, default=3, help="closed-loop batches per size measured"
    )
    parser.add_argument("--capacity-deadline", type=float, default=600.0, help="longest closed loop, s")
    parser.add_argument(
        "--warmup-sizes",
        default="mix",
        help="the pods' --warmup-sizes: mix (every size of the mix, default), none (the model's default "
        "size), or WxH,...",
    )
    parser.add_argument(
        "--compile-cache-dir",
        default=str(DEFAULT_COMPILE_CACHE),
        help="compile cache every pod shares (empty: none); a compiled pod with a warm cache starts in seconds",
    )
    parser.add_argument(
        "--start-together",
        action="store_true",
        help="once the capacity pod is ready, start the other pods at once (their warm-ups share the GPU)",
    )
    parser.add_argument("--seed", default="0", help="seed of the arrival sequences")
    parser.add_argument("--request-timeout", type=float, default=REQUEST_TIMEOUT_S)
    parser.add_argument(
        "--pod-arg", action="append", default=[], metavar="ARG", help="extra flag for every pod (repeatable)"
    )
    parser.add_argument("--pod-timeout", type=float, default=common.POD_READY_TIMEOUT_S)
    parser.add_argument(
        "--pod-start-s", type=float, default=30.0, help="pod start-up time assumed by the first estimate"
    )
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.capacity_batches < 1 or args.capacity_warmup < 0:
        parser.error("--duration and --capacity-batches must be positive, --capacity-warmup at least 0")
    return args


if __name__ == "__main__":
    common.main_guard(main)
