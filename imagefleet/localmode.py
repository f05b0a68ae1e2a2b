"""Local mode (``imagefleet serve``): the router in-process plus one pod process per GPU.

The same code paths as on Kubernetes, with static discovery: each pod is ``python -m imagefleet
pod`` on ``127.0.0.1:<pod_base_port + i>`` with ``CUDA_VISIBLE_DEVICES`` naming its one GPU, and
the router, running in this process, lists their URLs. With no GPU it runs ``cpu_pods`` CPU pods
(one by default; with the built-in ``tiny`` model unless another is asked for, which is honoured
with a warning).

GPUs are counted without initialising CUDA here (a parent holding a CUDA context would cost every
GPU memory): ``nvidia-smi -L``, else ``torch.cuda.device_count()`` in a subprocess. A
``CUDA_VISIBLE_DEVICES`` already set narrows ``--gpus all`` to the devices it names.

Every pod process has a supervisor task that restarts it when it exits unasked, after
``restart_backoff_s`` (doubling, up to a minute, while it keeps dying within a minute of
starting), and replaces it when its load report (read every ``health_interval_s``) says it
quarantined itself or stalled (a batch that stopped making progress: its GPU hangs; on Kubernetes
the kubelet's liveness probe does the same). Cancelling :func:`serve_local` (the CLI does so on SIGINT/SIGTERM) stops the
router from taking new requests, sends SIGTERM to every pod (which drains: it refuses new work and
finishes what it accepted) and SIGKILLs any still running after the pods' ``stop_timeout_s``.

No pod outlives its ``serve``, however that ends: each pod process is started with the Linux
parent-death signal set to SIGKILL, so a ``serve`` that is itself SIGKILLed (or crashes) takes its
pods with it. Every port is checked before anything starts, so a port that is taken (an earlier
run, another program) is one clear error and a non-zero exit, not a pod crash-looping on "address
already in use". And each pod is started with an instance id of this run that the router expects
in its load reports (``URL#ID`` static backends): whatever else answers on a pod's port is never
adopted.

The banner with where to send requests is printed only once the router has a ready backend, so a
user who pastes the example at once gets an image, not a 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from imagefleet.httpkit import serve as serve_app
from imagefleet.loadreport import LoadReport
from imagefleet.settings import PodSettings, RouterSettings, ServeSettings, to_arguments
from imagefleet.wire import LOAD_PATH

log = logging.getLogger("imagefleet.localmode")

RESTART_MAX_S = 60.0
STABLE_AFTER_S = 60.0
"""A pod that ran this long before exiting is restarted after the base backoff again."""
READY_POLL_S = 0.25
GPU_PROBE_TIMEOUT_S = 120.0
CPU_MODEL = "tiny"
POD_HOST = "127.0.0.1"
HEALTH_TIMEOUT_S = 2.0
PR_SET_PDEATHSIG = 1
"""prctl(2) option: the signal this process gets when the thread that forked it ends."""


# --- GPUs ---------------------------------------------------------------------------------------


def count_gpus() -> int:
    """GPUs on this machine, without initialising CUDA in this process."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False
            )
            if out.returncode == 0:
                return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
        except (OSError, subprocess.TimeoutExpired):
            pass
    try:
        out = subprocess.run(
            [sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
            capture_output=True,
            text=True,
            timeout=GPU_PROBE_TIMEOUT_S,
            check=False,
        )
        return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else 0
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return 0


def select_gpus(spec: str, env: Mapping[str, str] | None = None) -> list[str]:
    """The GPU ids to run pods on: ``none`` -> [], ``0,1`` -> ["0", "1"], ``all`` -> every visible GPU."""
    env = os.environ if env is None else env
    text = spec.strip().lower()
    if text in ("none", "cpu", ""):
        return []
    if text != "all":
        return [part.strip() for part in spec.split(",") if part.strip()]
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [part.strip() for part in visible.split(",") if part.strip() and part.strip() != "-1"]
    return [str(i) for i in range(count_gpus())]


# --- the pod processes --------------------------------------------------------------------------


@dataclass(frozen=True)
class PodPlan:
    name: str
    port: int
    cuda_visible_devices: str
    """The one GPU this pod sees ("" for a CPU pod)."""
    instance_id: str = ""
    """What this pod reports as its identity; the router adopts only the pod that says so."""

    @property
    def url(self) -> str:
        return f"http://{POD_HOST}:{self.port}"

    @property
    def backend(self) -> str:
        """The router's static backend: the URL and the instance expected there."""
        return f"{self.url}#{self.instance_id}" if self.instance_id else self.url


def plan_pods(gpus: Sequence[str], local: ServeSettings, run_id: str = "") -> list[PodPlan]:
    """One pod per GPU (or ``cpu_pods`` CPU pods); ``run_id`` makes their instance ids unique."""
    if gpus:
        plans = [PodPlan(f"gpu{gpu}", local.pod_base_port + i, gpu) for i, gpu in enumerate(gpus)]
    else:
        plans = [PodPlan(f"cpu{i}", local.pod_base_port + i, "") for i in range(local.cpu_pods)]
    if not run_id:
        return plans
    return [dataclasses.replace(p, instance_id=f"{run_id}-{p.name}") for p in plans]


def new_run_id() -> str:
    return f"serve-{os.getpid()}-{secrets.token_hex(4)}"


def pod_command(pod: PodSettings, plan: PodPlan) -> list[str]:
    return [
        sys.executable,
        "-m",
        "imagefleet",
        "pod",
        "--host",
        POD_HOST,
        "--port",
        str(plan.port),
        "--instance-id",
        plan.instance_id,
        *to_arguments(pod, exclude=("host", "port", "instance_id")),
    ]


class PortTaken(Exception):
    """A port local mode needs is in use."""


def check_port(host: str, port: int, what: str) -> None:
    """Raise :class:`PortTaken` naming ``what`` if nothing could listen on ``host:port`` now.

    Binds the way the servers do (SO_REUSEADDR, as aiohttp on Linux), so a port that only has
    connections in TIME_WAIT counts as free and one with a listener as taken.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise PortTaken(
                f"port {port} on {host} ({what}) is not available: {exc.strerror or exc}"
            ) from None


def check_pod_ports(plans: Sequence[PodPlan]) -> None:
    for p in plans:
        check_port(POD_HOST, p.port, f"pod {p.name}; choose others with --pod-base-port")


# --- dying with the parent ------------------------------------------------------------------------


def _libc_prctl() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _libc_prctl()
"""Resolved here, in the parent: the child between fork and exec does as little as it can."""


def die_with_parent(parent_pid: int) -> None:
    """In a freshly forked child: SIGKILL this process when its parent ends.

    If the parent ended before the signal was set (the race between fork and prctl), the child
    has been re-parented already and exits at once.
    """
    if _PRCTL is None:
        return
    _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def restart_delay(quick_exits: int, base_s: float) -> float:
    return float(min(RESTART_MAX_S, base_s * 2 ** min(max(quick_exits - 1, 0), 16)))


class PodSupervisor:
    """Runs one pod process and restarts it when it exits without being asked to."""

    def __init__(
        self,
        plan: PodPlan,
        command: list[str],
        restart_backoff_s: float,
        stop_timeout_s: float,
        health_interval_s: float = 1.0,
    ) -> None:
        self.plan = plan
        self.command = command
        self.restart_backoff_s = restart_backoff_s
        self.stop_timeout_s = stop_timeout_s
        self.health_interval_s = health_interval_s
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._stopping = False
        self._replacing = False
        """The current process is being stopped to be replaced (it quarantined itself)."""

    async def run(self) -> None:
        quick_exits = 0
        parent = os.getpid()
        async with aiohttp.ClientSession() as session:
            while not self._stopping:
                env = {
                    **os.environ,
                    "CUDA_VISIBLE_DEVICES": self.plan.cuda_visible_devices,
                    "PYTHONUNBUFFERED": "1",
                }
                started = time.monotonic()
                self.process = await asyncio.create_subprocess_exec(
                    *self.command,
                    env=env,
                    start_new_session=True,
                    preexec_fn=lambda: die_with_parent(parent),
                )
                log.info("Started pod %s (pid %d) on %s", self.plan.name, self.process.pid, self.plan.url)
                self._replacing = False
                watch = asyncio.create_task(self._replace_when_quarantined(session, self.process))
                try:
                    code = await self.process.wait()
                except asyncio.CancelledError:  # only when stop() did not run first: leave no orphan
                    self.signal(signal.SIGKILL)
                    raise
                finally:
                    watch.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await watch
                if self._stopping:
                    return
                self.restarts += 1
                if self._replacing:
                    quick_exits = 0
                    log.warning("Pod %s replaced: starting a new process", self.plan.name)
                    continue
                quick_exits = quick_exits + 1 if time.monotonic() - started < STABLE_AFTER_S else 1
                delay = restart_delay(quick_exits, self.restart_backoff_s)
                log.warning("Pod %s exited with %s; restarting in %.1f s", self.plan.name, code, delay)
                await asyncio.sleep(delay)

    async def _replace_when_quarantined(
        self, session: aiohttp.ClientSession, process: asyncio.subprocess.Process
    ) -> None:
        """Read the pod's load report every ``health_interval_s``; once it says quarantined or
        stalled, stop the pod (it refuses new work already) so that :meth:`run` starts a new one."""
        while process.returncode is None:
            await asyncio.sleep(self.health_interval_s)
            report = await read_report(session, self.plan.url)
            why = replace_because(report)
            if report is None or why is None or self._stopping:
                continue
            if self.plan.instance_id and report.instance_id != self.plan.instance_id:
                continue  # another process answers on this port: the router ignores it as well
            self._replacing = True
            log.warning("Pod %s (pid %d) reports itself %s; replacing it", self.plan.name, process.pid, why)
            await self._terminate(process)
            return

    def signal(self, sig: int) -> None:
        process = self.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)

    async def stop(self) -> None:
        """SIGTERM (the pod drains), then SIGKILL if it is still there after ``stop_timeout_s``."""
        self._stopping = True
        process = self.process
        if process is None or process.returncode is not None:
            return
        await self._terminate(process)

    async def _terminate(self, process: asyncio.subprocess.Process) -> None:
        timeout_s = self.stop_timeout_s
        self.signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout_s)
        except TimeoutError:
            log.warning("Pod %s did not stop within %.0f s; killing it", self.plan.name, timeout_s)
            self.signal(signal.SIGKILL)
            await process.wait()


def replace_because(report: LoadReport | None) -> str | None:
    """Why a pod with this load report must be replaced (None: it need not be)."""
    if report is None:
        return None
    if report.quarantined:
        return "quarantined (repeated failed batches on its device)"
    if report.phase == "stalled":
        return "stalled (its running batch has made no progress: the GPU hangs)"
    return None


async def read_report(session: aiohttp.ClientSession, url: str) -> LoadReport | None:
    """The pod's load report, or None if it did not give one (starting, stopping, busy)."""
    try:
        async with session.get(url + LOAD_PATH, timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)) as r:
            if r.status != 200:
                return None
            return LoadReport.from_json(await r.json())
    except (aiohttp.ClientError, TimeoutError, ValueError, TypeError):
        return None


# --- the banner ---------------------------------------------------------------------------------


def public_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


def banner(url: str, model: str, pods: Sequence[PodPlan], keys: bool) -> str:
    where = ", ".join(f"GPU {p.cuda_visible_devices}" if p.cuda_visible_devices else "CPU" for p in pods)
    auth = ' \\\n    -H "Authorization: Bearer $API_KEY"' if keys else ""
    key = 'os.environ["API_KEY"]' if keys else '"unused"'
    return f"""
imagefleet is ready: {len(pods)} pod(s) serving {model} ({where})

  OpenAI Images API   {url}/v1
  Stats / metrics     {url}/stats   {url}/metrics

Try it with curl:

  curl -s {url}/v1/images/generations{auth} \\
    -H "Content-Type: application/json" \\
    -d '{{"prompt": "a lighthouse at dusk, oil painting"}}' \\
    | python -c 'import sys, json, base64; open("image.png", "wb").write(base64.b64decode(json.load(sys.stdin)["data"][0]["b64_json"]))'

or with the openai Python client:

  import base64, os
  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1", api_key={key})
  result = client.images.generate(prompt="a lighthouse at dusk, oil painting")
  open("image.png", "wb").write(base64.b64decode(result.data[0].b64_json))
"""


# --- the whole ------------------------------------------------------------------------------------


async def serve_local(local: ServeSettings, router: RouterSettings, pod: PodSettings) -> None:
    """Run pods and the router until cancelled; then drain and stop everything."""
    from imagefleet.router.app import create_app  # the one wiring point from the core to the router

    gpus = await asyncio.to_thread(select_gpus, local.gpus)
    if not gpus and pod.model != CPU_MODEL:
        log.warning(
            "No GPU in use: %s will run on the CPU, which may be very slow (try --model %s)",
            pod.model,
            CPU_MODEL,
        )
    plans = plan_pods(gpus, local, new_run_id())
    try:
        check_pod_ports(plans)
    except PortTaken as exc:
        log.error("Cannot start: %s", exc)
        raise SystemExit(1) from None
    pod = dataclasses.replace(pod, max_body_mb=router.max_body_mb)
    supervisors = [
        PodSupervisor(
            p, pod_command(pod, p), local.restart_backoff_s, pod.stop_timeout_s, local.health_interval_s
        )
        for p in plans
    ]
    # The router's requests in flight wait for pods that drain: give them the pods' whole budget.
    router = dataclasses.replace(
        router,
        discovery="static",
        backends=tuple(p.backend for p in plans),
        shutdown_timeout_s=pod.stop_timeout_s,
        stop_timeout_s=pod.stop_timeout_s + 5,
    )
    runner: web.AppRunner | None = None
    tasks: list[asyncio.Task[None]] = []
    try:
        try:
            runner = await serve_app(
                create_app(router), router.host, router.port, shutdown_timeout=router.shutdown_timeout_s
            )
        except OSError as exc:
            log.error(
                "Cannot start: port %d on %s (router) is not available: %s",
                router.port,
                router.host,
                exc.strerror or exc,
            )
            raise SystemExit(1) from None
        tasks += [asyncio.create_task(s.run(), name=f"pod {s.plan.name}") for s in supervisors]
        url = public_url(router.host, router.port)
        log.info("Router listening on %s; starting %d pod(s)", url, len(plans))
        await wait_ready(url)
        keys = bool(router.api_keys or router.api_keys_file)
        print(banner(url, pod.model, plans, keys), flush=True)
        await asyncio.wait(tasks)  # unlike gather, being cancelled here leaves the supervisors running
    finally:
        await _shutdown(runner, supervisors, tasks)


async def wait_ready(url: str) -> None:
    """Until the router's /readyz says a backend is ready."""
    async with aiohttp.ClientSession() as session:
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(url + "/readyz", timeout=aiohttp.ClientTimeout(total=2)) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(READY_POLL_S)


async def _shutdown(
    runner: web.AppRunner | None,
    supervisors: Sequence[PodSupervisor],
    tasks: Sequence[asyncio.Task[None]],
) -> None:
    log.info("Stopping: draining the router and %d pod(s)", len(supervisors))
    try:
        stopping = [s.stop() for s in supervisors]
        if runner is not None:
            stopping.append(runner.cleanup())
        await asyncio.gather(*stopping)
    except asyncio.CancelledError:  # asked twice: stop now
        for s in supervisors:
            s.signal(signal.SIGKILL)
        raise
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
    log.info("Stopped")
