"""What the router adds to a request: latency at a fixed rate, and the rate at which it saturates.

Backends here answer instantly (a tiny aiohttp app with a load report and a canned Images API
answer), so everything measured is HTTP plumbing. The same load runs straight at the backends
(the baseline) and through ``imagefleet router`` (a separate process, as deployed), in the same
run, alternating, and the table shows the difference and the ratio:

* **open loop** at ``--rate`` requests/s for ``--duration`` seconds: latency is measured from the
  moment each request was due, so a stalled sender cannot hide queueing (no coordinated
  omission); reported p50 / p99, and router minus direct;
* **saturation**: ``--concurrency`` clients in a closed loop for ``--saturation-duration``
  seconds; requests/s direct and through the router.

    python -m bench.router_overhead            # defaults: 200 req/s, 2 backends
    python -m bench.router_overhead --rate 500 --duration 20

Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from bench.common import Results, table
from imagefleet.loadreport import LoadReport
from imagefleet.testing.servers import free_port, wait_until

ANSWER = json.dumps(
    {
        "created": 0,
        "data": [{"b64_json": "A" * 1024, "revised_prompt": None}],
        "output_format": "png",
        "size": "64x64",
        "background": "opaque",
        "quality": "auto",
    }
).encode()
REQUEST = json.dumps({"prompt": "a lighthouse at dusk", "size": "64x64"}).encode()
PATH = "/v1/images/generations"


# --- the instant backend (run as a subprocess: python -m bench.router_overhead --backend PORT) -------


def backend_app() -> web.Application:
    report = LoadReport(
        model="instant", ready=True, unit_seconds=0.001, default_width=64, default_height=64, default_steps=4
    ).to_json()
    report_body = json.dumps(report).encode()

    async def generations(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=ANSWER, content_type="application/json")

    async def load(request: web.Request) -> web.Response:
        return web.Response(body=report_body, content_type="application/json")

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_post(PATH, generations)
    app.router.add_get("/v1/load", load)
    app.router.add_get("/readyz", ok)
    app.router.add_get("/healthz", ok)
    return app


# --- load -----------------------------------------------------------------------------------------


@dataclass
class Phase:
    target: str
    latencies: list[float]
    errors: int
    seconds: float

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0


async def open_loop(session: aiohttp.ClientSession, url: str, rate: float, duration: float) -> Phase:
    """``rate`` requests/s on a fixed schedule; latency counted from each request's due time."""
    latencies: list[float] = []
    errors = 0
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05
    count = int(rate * duration)

    async def one(due: float) -> None:
        nonlocal errors
        try:
            async with session.post(url, data=REQUEST, headers={"Content-Type": "application/json"}) as resp:
                await resp.read()
                ok = resp.status == 200
        except aiohttp.ClientError:
            ok = False
        if ok:
            latencies.append(loop.time() - due)
        else:
            errors += 1

    tasks = []
    for i in range(count):
        due = start + i / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(due)))
    await asyncio.gather(*tasks)
    return Phase(url, latencies, errors, duration)


async def closed_loop(session: aiohttp.ClientSession, url: str, clients: int, duration: float) -> Phase:
    latencies: list[float] = []
    errors = 0
    loop = asyncio.get_running_loop()
    end = loop.time() + duration

    async def client() -> None:
        nonlocal errors
        while loop.time() < end:
            sent = loop.time()
            try:
                async with session.post(
                    url, data=REQUEST, headers={"Content-Type": "application/json"}
                ) as resp:
                    await resp.read()
                    ok = resp.status == 200
            except aiohttp.ClientError:
                ok = False
            if ok:
                latencies.append(loop.time() - sent)
            else:
                errors += 1

    started = loop.time()
    await asyncio.gather(*(client() for _ in range(clients)))
    return Phase(url, latencies, errors, loop.time() - started)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


# --- orchestration --------------------------------------------------------------------------------


def spawn(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def ready(url: str) -> bool:
    import urllib.request

    with urllib.request.urlopen(url + "/readyz", timeout=1) as resp:
        return bool(resp.status == 200)


async def measure(args: argparse.Namespace, direct: list[str], router: str) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        targets = {"direct": [u + PATH for u in direct], "router": [router + PATH]}

        async def warm(urls: list[str]) -> None:
            await asyncio.gather(*(open_loop(session, u, args.rate / len(urls), 1.0) for u in urls))

        for urls in targets.values():
            await warm(urls)
        open_phases: dict[str, list[Phase]] = {"direct": [], "router": []}
        rounds = 2
        for _ in range(rounds):  # alternate, so drift in the machine's load hits both alike
            for name, urls in targets.items():
                phases = await asyncio.gather(
                    *(open_loop(session, u, args.rate / len(urls), args.duration / rounds) for u in urls)
                )
                open_phases[name] += phases
        saturation: dict[str, float] = {}
        for name, urls in targets.items():
            per_url = max(1, args.concurrency // len(urls))
            phases = await asyncio.gather(
                *(closed_loop(session, u, per_url, args.saturation_duration) for u in urls)
            )
            saturation[name] = sum(p.rps for p in phases)

    out: dict[str, Any] = {}
    for name, phases in open_phases.items():
        lat = [x for p in phases for x in p.latencies]
        out[name] = {
            "requests": len(lat),
            "errors": sum(p.errors for p in phases),
            "p50_ms": percentile(lat, 50) * 1e3,
            "p99_ms": percentile(lat, 99) * 1e3,
            "mean_ms": statistics.fmean(lat) * 1e3 if lat else float("nan"),
            "saturation_rps": saturation[name],
        }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=200.0, help="open-loop requests per second")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of open-loop load per target")
    parser.add_argument("--concurrency", type=int, default=32, help="closed-loop clients for saturation")
    parser.add_argument("--saturation-duration", type=float, default=8.0, help="seconds of closed-loop load")
    parser.add_argument("--backends", type=int, default=2, help="instant backends behind the router")
    parser.add_argument("--backend", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.backend:
        web.run_app(backend_app(), host="127.0.0.1", port=args.backend, print=None, access_log=None)
        return 0

    results = Results("router_overhead")
    results.emit(
        {
            "event": "environment",
            "date": time.strftime("%Y-%m-%d"),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "command": "python -m bench.router_overhead " + " ".join(argv or sys.argv[1:]),
        }
    )
    ports = [free_port() for _ in range(args.backends)]
    router_port = free_port()
    direct = [f"http://127.0.0.1:{p}" for p in ports]
    router = f"http://127.0.0.1:{router_port}"
    procs = [spawn(["-m", "bench.router_overhead", "--backend", str(p)]) for p in ports]
    procs.append(
        spawn(
            [
                "-m",
                "imagefleet",
                "router",
                "--port",
                str(router_port),
                "--backends",
                ",".join(direct),
                "--log-level",
                "warning",
            ]
        )
    )
    try:
        for url in [*direct, router]:
            wait_until(lambda u=url: ready(u), 60, f"{url} ready")  # type: ignore[misc]
        out = asyncio.run(measure(args, direct, router))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)

    d, r = out["direct"], out["router"]
    summary = {
        "event": "result",
        "rate": args.rate,
        "backends": args.backends,
        "concurrency": args.concurrency,
        "direct": d,
        "router": r,
        "added_p50_ms": r["p50_ms"] - d["p50_ms"],
        "added_p99_ms": r["p99_ms"] - d["p99_ms"],
        "saturation_ratio": r["saturation_rps"] / d["saturation_rps"] if d["saturation_rps"] else None,
    }
    results.emit(summary)
    rows = [
        [name, v["requests"], v["errors"], v["p50_ms"], v["p99_ms"], v["mean_ms"], v["saturation_rps"]]
        for name, v in (("direct", d), ("router", r))
    ]
    rows.append(
        [
            "router - direct",
            None,
            None,
            summary["added_p50_ms"],
            summary["added_p99_ms"],
            r["mean_ms"] - d["mean_ms"],
            r["saturation_rps"] - d["saturation_rps"],
        ]
    )
    print()
    print(
        f"open loop at {args.rate:g} req/s for {args.duration:g} s per target; "
        f"saturation with {args.concurrency} clients; {args.backends} instant backends"
    )
    print(table(["target", "requests", "errors", "p50 ms", "p99 ms", "mean ms", "saturation req/s"], rows))
    print(
        f"\nratios router/direct: p50 {r['p50_ms'] / d['p50_ms']:.2f}x, p99 {r['p99_ms'] / d['p99_ms']:.2f}x, "
        f"saturation {summary['saturation_ratio']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
