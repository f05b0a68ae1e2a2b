"""The operator at scale: 50 ImageGenerators x 20 pods (1,000 one-GPU pods on 125 8-GPU nodes).

A real control plane with KWOK nodes only (KWOK plays the kubelet: pods turn Running and Ready
without a process), one stub process that serves a realistic ``/metrics`` page on every inference
pod's IP (the names and shape of a real pod's page, not the pipeline), and the operator as its own
process (``imagefleet operator``), so its memory and CPU are its own. Measured:

* apply to all Ready: from creating the 50 resources to every status saying 20/20 Ready, and
  from the last pod turning Ready (KWOK) to the last status saying so;
* a status cycle: operator CPU seconds per status interval while every pod is scraped, the
  mean and longest per-generator scrape, and API requests per interval;
* operator RSS (current and peak).

    python -m bench.operator_scale [--generators 50] [--pods 20] [--nodes 125] [--cycles 6]

Targets (issue): all Ready within 2 minutes of the pods running; a status cycle over 1,000 pods
under 2 s; operator RSS under 300 MB. Takes about five minutes on two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from imagefleet import metrics as m
from imagefleet import wire
from imagefleet.devcluster.controlplane import ControlPlane, Settings

REPO = Path(__file__).resolve().parents[1]


# --- a pod's /metrics page, served on every pod IP --------------------------------------------------


def metrics_page() -> bytes:
    """A page with every family a real pod serves, with some history in it."""
    r = CollectorRegistry()
    for name in (m.POD_QUEUED_SAMPLES, m.POD_QUEUED_REQUESTS, m.POD_RUNNING_SAMPLES, m.POD_QUARANTINED):
        Gauge(name, "stub", registry=r).set(0)
    Gauge(m.POD_QUEUED_SECONDS, "stub", registry=r).set(1.5)
    Gauge(m.POD_READY, "stub", registry=r).set(1)
    buckets = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 12, 20, 30, 45, 60, 90, 120, 180, 300, 600)
    for name in (m.POD_BATCH_SECONDS, m.POD_QUEUE_WAIT_SECONDS):
        h = Histogram(name, "stub", buckets=buckets, registry=r)
        for v in (0.2, 1.4, 2.4, 2.6):
            h.observe(v)
    Histogram(m.POD_BATCH_SIZE, "stub", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r).observe(4)
    req = Histogram(m.POD_REQUEST_SECONDS, "stub", ["endpoint"], buckets=buckets, registry=r)
    req.labels("generations").observe(3.0)
    images = Counter(m.POD_IMAGES, "stub", ["outcome"], registry=r)
    images.labels(m.OUTCOME_COMPLETED).inc(120)
    images.labels(m.OUTCOME_FAILED).inc(0)
    images.labels(m.OUTCOME_CANCELLED).inc(2)
    Counter(m.POD_REQUESTS, "stub", ["endpoint", "status"], registry=r).labels("generations", "200").inc(60)
    errors = Counter(m.POD_ERRORS, "stub", ["kind"], registry=r)
    for kind in ("pipeline", "oom", "encode"):
        errors.labels(kind)
    return generate_latest(r)


class MetricsStub:
    """One process-local aiohttp runner with a site per inference pod IP (port 8001)."""

    def __init__(self, api_client: Any, port: int = 8001) -> None:
        self.api = api_client
        self.port = port
        self.page = metrics_page()
        self.loop = asyncio.new_event_loop()
        self.sites: dict[str, web.TCPSite] = {}
        self.runner: web.AppRunner | None = None
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._setup(), self.loop).result(30)
        threading.Thread(target=self._follow, daemon=True).start()

    async def _setup(self) -> None:
        async def metrics_handler(_: web.Request) -> web.Response:
            return web.Response(body=self.page, content_type="text/plain")

        app = web.Application()
        app.router.add_get(wire.METRICS_PATH, metrics_handler)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()

    async def _listen(self, ip: str) -> None:
        if ip in self.sites or self.runner is None:
            return
        site = web.TCPSite(self.runner, ip, self.port)
        await site.start()
        self.sites[ip] = site

    def _follow(self) -> None:
        from kubernetes import client

        core = client.CoreV1Api(self.api)
        selector = f"{wire.LABEL_COMPONENT}={wire.COMPONENT_POD}"
        while not self.stopped.is_set():
            for pod in core.list_pod_for_all_namespaces(label_selector=selector).items:
                ip = pod.status.pod_ip
                if ip and ip not in self.sites:
                    asyncio.run_coroutine_threadsafe(self._listen(ip), self.loop).result(10)
            self.stopped.wait(1.0)

    def stop(self) -> None:
        self.stopped.set()
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)


# --- the operator process ---------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM in kB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape_operator(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        scrape = m.parse(resp.read().decode())
    return {
        "api_requests": scrape.value(m.OPERATOR_API_REQUESTS + "_total"),
        "scrape_sum": scrape.value(m.OPERATOR_SCRAPE_SECONDS + "_sum"),
        "scrape_count": scrape.value(m.OPERATOR_SCRAPE_SECONDS + "_count"),
        "pass_sum": scrape.value(m.OPERATOR_PASS_SECONDS + "_sum"),
        "pass_count": scrape.value(m.OPERATOR_PASS_SECONDS + "_count"),
        "status_writes": scrape.value(m.OPERATOR_STATUS_WRITES + "_total"),
        "scrape_failures": scrape.value(m.OPERATOR_SCRAPE_FAILURES + "_total"),
        "longest_scrape_bucket": _largest_bucket(scrape, m.OPERATOR_SCRAPE_SECONDS),
    }


def _largest_bucket(scrape: m.Scrape, name: str) -> float:
    """The smallest bucket bound that holds every observation so far."""
    buckets = sorted(
        (float(s.labels["le"]), s.value) for s in scrape.select(name + "_bucket") if s.labels["le"] != "+Inf"
    )
    total = scrape.value(name + "_count")
    return next((le for le, count in buckets if count >= total), float("inf"))


# --- the run ------------------------------------------------------------------------------------------


def generator_body(name: str, replicas: int) -> dict[str, Any]:
    return {
        "apiVersion": wire.API_VERSION,
        "kind": wire.KIND,
        "metadata": {"name": name},
        "spec": {"model": {"id": "tiny"}, "replicas": replicas},
    }


def all_ready(custom: Any, namespace: str, names: list[str], replicas: int) -> bool:
    listed = custom.list_namespaced_custom_object(wire.GROUP, wire.VERSION, namespace, wire.PLURAL)
    ready = 0
    for item in listed["items"]:
        st = item.get("status") or {}
        conditions = {c["type"]: c["status"] for c in st.get("conditions") or []}
        if st.get("readyReplicas") == replicas and conditions.get("Ready") == "True":
            ready += 1
    return ready == len(names)


def last_pod_ready(core: Any, namespace: str) -> float:
    from imagefleet.operator.podview import parse_time

    latest = 0.0
    items = json.loads(core.list_namespaced_pod(namespace, _preload_content=False).data)["items"]
    for pod in items:
        for c in (pod.get("status") or {}).get("conditions") or []:
            if c["type"] == "Ready" and c["status"] == "True":
                latest = max(latest, parse_time(c.get("lastTransitionTime")) or 0.0)
    return latest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--generators", type=int, default=50)
    parser.add_argument("--pods", type=int, default=20, help="replicas of each generator")
    parser.add_argument("--nodes", type=int, default=125, help="KWOK nodes with 8 GPUs each")
    parser.add_argument("--cycles", type=int, default=6, help="status intervals to measure")
    parser.add_argument("--interval", type=float, default=10.0, help="the operator's status interval")
    parser.add_argument("--out", type=Path, default=None, help="append the JSON result here")
    args = parser.parse_args(argv)

    from kubernetes import client

    work = Path(tempfile.mkdtemp(prefix="operator-scale-"))
    plane = ControlPlane(
        Settings(state_dir=work / "plane", gpu_nodes=0, kwok_nodes=args.nodes, gpus_per_node=8)
    )
    print(f"starting a control plane with {args.nodes} KWOK nodes in {work}", file=sys.stderr)
    plane.start()
    stub: MetricsStub | None = None
    operator: subprocess.Popen[bytes] | None = None
    try:
        env = {**os.environ, **plane.env()}
        subprocess.run(
            [str(plane.binary("kubectl")), "apply", "--server-side", "-f", str(REPO / "crds" / "imagegenerator.yaml")],
            env=env, check=True, capture_output=True,
        )  # fmt: skip
        subprocess.run(
            [str(plane.binary("kubectl")), "wait", "--for=condition=Established", f"crd/{wire.CRD_NAME}"],
            env=env, check=True, capture_output=True,
        )  # fmt: skip
        with plane.api_client() as api:
            core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
            stub = MetricsStub(api)
            stub.start()
            health = 18095
            log = (work / "operator.log").open("wb")
            operator = subprocess.Popen(
                [sys.executable, "-m", "imagefleet", "operator", "--health-port", str(health),
                 "--health-host", "127.0.0.1", "--status-interval-s", str(args.interval), "--log-level", "warning"],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            deadline = time.monotonic() + 60
            while True:
                try:
                    scrape_operator(health)
                    break
                except OSError:
                    if time.monotonic() > deadline or operator.poll() is not None:
                        raise RuntimeError(f"operator did not start; see {work / 'operator.log'}") from None
                    time.sleep(0.5)

            names = [f"gen-{i:02d}" for i in range(args.generators)]
            t0 = time.time()
            for name in names:
                custom.create_namespaced_custom_object(
                    wire.GROUP, wire.VERSION, "default", wire.PLURAL, generator_body(name, args.pods)
                )
            while not all_ready(custom, "default", names, args.pods):
                if time.time() - t0 > 900:
                    raise RuntimeError("not all Ready after 15 minutes")
                time.sleep(1.0)
            t_ready = time.time()
            pods_ready = last_pod_ready(core, "default")
            print(
                f"all {args.generators} x {args.pods} Ready {t_ready - t0:.1f} s after apply", file=sys.stderr
            )

            time.sleep(args.interval)  # let the first full cycle pass before measuring
            before, cpu0, wall0 = scrape_operator(health), cpu_seconds(operator.pid), time.monotonic()
            time.sleep(args.cycles * args.interval)
            after, cpu1, wall1 = scrape_operator(health), cpu_seconds(operator.pid), time.monotonic()
            cycles = (wall1 - wall0) / args.interval
            memory = proc_status(operator.pid)
            scrapes = after["scrape_count"] - before["scrape_count"]
            result = {
                "bench": "operator_scale",
                "date": time.strftime("%Y-%m-%d"),
                "generators": args.generators,
                "pods": args.generators * args.pods,
                "nodes": args.nodes,
                "apply_to_all_ready_s": round(t_ready - t0, 1),
                "pods_running_to_all_ready_s": round(t_ready - pods_ready, 1),
                "status_interval_s": args.interval,
                "operator_cpu_s_per_cycle": round((cpu1 - cpu0) / cycles, 3),
                "mean_generator_scrape_s": round(
                    (after["scrape_sum"] - before["scrape_sum"]) / max(1, scrapes), 4
                ),
                "longest_generator_scrape_le_s": after["longest_scrape_bucket"],
                "scrape_failures": after["scrape_failures"] - before["scrape_failures"],
                "api_requests_per_cycle": round((after["api_requests"] - before["api_requests"]) / cycles, 1),
                "status_writes_per_cycle": round(
                    (after["status_writes"] - before["status_writes"]) / cycles, 1
                ),
                "operator_rss_mb": round(memory["VmRSS"] / 1024, 1),
                "operator_peak_rss_mb": round(memory["VmHWM"] / 1024, 1),
                "metrics_listeners": len(stub.sites),
            }
            print(json.dumps(result))
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                with args.out.open("a") as f:
                    f.write(json.dumps(result) + "\n")
            rows = [(k, v) for k, v in result.items() if k not in ("bench",)]
            width = max(len(k) for k, _ in rows)
            for k, v in rows:
                print(f"{k.ljust(width)}  {v}")
    finally:
        if operator is not None:
            operator.terminate()
            operator.wait(30)
        if stub is not None:
            stub.stop()
        plane.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
