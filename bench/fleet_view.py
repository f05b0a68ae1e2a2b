"""What one ``GET /v1/fleet`` costs the router: building the body from its own memory, and JSON.

The fleet page polls it every second per open browser tab, so its cost is router CPU per poll
(process time, so that other work on the machine does not count).
The router here is the real load view and metrics with ``--pods`` backends, each with a load
report and a few counted attempts; nothing is served, so only the endpoint's own work is timed.

    PYTHONPATH=. python -m bench.fleet_view --pods 10,100,1000

Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time

from imagefleet import settings
from imagefleet.loadreport import LoadReport
from imagefleet.router import telemetry as t
from imagefleet.router.auth import KeyStore
from imagefleet.router.discovery import Backend
from imagefleet.router.fleet import fleet
from imagefleet.router.loadview import LoadView
from imagefleet.router.pick import PICKERS
from imagefleet.router.state import RouterRuntime
from imagefleet.router.telemetry import RouterMetrics
from imagefleet.settings import RouterSettings


def runtime(pods: int) -> RouterRuntime:
    view = LoadView(eject_after=2, backoff_s=1.0, backoff_max_s=30.0)
    names = [f"gen-{i:05d}" for i in range(pods)]
    view.sync({n: Backend(n, f"http://10.0.{i // 250}.{i % 250}:8001") for i, n in enumerate(names)})
    rt = RouterRuntime(
        settings=settings.load(RouterSettings, {}, env={}),
        view=view,
        metrics=RouterMetrics(),
        keys=KeyStore(),
        picker=PICKERS["least-wait"],
        rng=random.Random(0),
    )
    for i, name in enumerate(names):
        report = LoadReport(
            model="m", ready=True, queued_samples=i % 7, queued_seconds=i % 7 * 1.5, running_samples=4,
            unit_seconds=0.2, completed_images=i * 10,
        )  # fmt: skip
        view.reported(view.views[name], report, started=0.0, now=0.0)
        for outcome in (t.OK, t.OVERLOADED, t.UNREACHABLE):
            rt.metrics.requests.labels(name, outcome).inc(i % 5 + 1)
    return rt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", default="10,100,1000")
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, Python {platform.python_version()}")
    print("| pods | CPU ms per poll (body + JSON), median | p90 | body bytes |")
    print("|---:|---:|---:|---:|")
    for pods in (int(p) for p in args.pods.split(",")):
        rt = runtime(pods)
        times, size = [], 0
        for _ in range(args.repeat):
            started = time.process_time()
            size = len(json.dumps(fleet(rt)))
            times.append((time.process_time() - started) * 1000)
        times.sort()
        p90 = times[int(len(times) * 0.9) - 1]
        print(f"| {pods} | {statistics.median(times):.2f} | {p90:.2f} | {size} |")


if __name__ == "__main__":
    main()
