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
starting). Cancelling :func:`serve_local` (the CLI does so on SIGINT/SIGTERM) stops the router
from taking new requests, sends SIGTERM to every pod (which drains: it refuses new work and
finishes what it accepted) and SIGKILLs any still running after the pods' ``stop_timeout_s``.

The banner with where to send requests is printed only once the router has a ready backend, so a
user who pastes the example at once gets an image, not a 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from imagefleet.httpkit import serve as serve_app
from imagefleet.settings import PodSettings, RouterSettings, ServeSettings, to_arguments

log = logging.getLogger("imagefleet.localmode")

RESTART_MAX_S = 60.0
STABLE_AFTER_S = 60.0
"""A pod that ran this long before exiting is restarted after the base backoff again."""
READY_POLL_S = 0.25
GPU_PROBE_TIMEOUT_S = 120.0
CPU_MODEL = "tiny"


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

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def plan_pods(gpus: Sequence[str], local: ServeSettings) -> list[PodPlan]:
    if gpus:
        return [PodPlan(f"gpu{gpu}", local.pod_base_port + i, gpu) for i, gpu in enumerate(gpus)]
    return [PodPlan(f"cpu{i}", local.pod_base_port + i, "") for i in range(local.cpu_pods)]


def pod_command(pod: PodSettings, plan: PodPlan) -> list[str]:
    return [
        sys.executable,
        "-m",
        "imagefleet",
        "pod",
        "--host",
        "127.0.0.1",
        "--port",
        str(plan.port),
        *to_arguments(pod, exclude=("host", "port")),
    ]


def restart_delay(quick_exits: int, base_s: float) -> float:
    return float(min(RESTART_MAX_S, base_s * 2 ** min(max(quick_exits - 1, 0), 16)))


class PodSupervisor:
    """Runs one pod process and restarts it when it exits without being asked to."""

    def __init__(
        self, plan: PodPlan, command: list[str], restart_backoff_s: float, stop_timeout_s: float
    ) -> None:
        self.plan = plan
        self.command = command
        self.restart_backoff_s = restart_backoff_s
        self.stop_timeout_s = stop_timeout_s
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._stopping = False

    async def run(self) -> None:
        quick_exits = 0
        while not self._stopping:
            env = {
                **os.environ,
                "CUDA_VISIBLE_DEVICES": self.plan.cuda_visible_devices,
                "PYTHONUNBUFFERED": "1",
            }
            started = time.monotonic()
            self.process = await asyncio.create_subprocess_exec(
                *self.command, env=env, start_new_session=True
            )
            log.info("Started pod %s (pid %d) on %s", self.plan.name, self.process.pid, self.plan.url)
            try:
                code = await self.process.wait()
            except asyncio.CancelledError:  # only when stop() did not run first: leave no orphan
                self.signal(signal.SIGKILL)
                raise
            if self._stopping:
                return
            quick_exits = quick_exits + 1 if time.monotonic() - started < STABLE_AFTER_S else 1
            delay = restart_delay(quick_exits, self.restart_backoff_s)
            log.warning("Pod %s exited with %s; restarting in %.1f s", self.plan.name, code, delay)
            self.restarts += 1
            await asyncio.sleep(delay)

    def signal(self, sig: int) -> None:
        process = self.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)

    async def stop(self) -> None:
        """SIGTERM (the pod drains), then SIGKILL if it is still there after ``stop_timeout_s``."""
        timeout_s = self.stop_timeout_s
        self._stopping = True
        process = self.process
        if process is None or process.returncode is not None:
            return
        self.signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout_s)
        except TimeoutError:
            log.warning("Pod %s did not stop within %.0f s; killing it", self.plan.name, timeout_s)
            self.signal(signal.SIGKILL)
            await process.wait()


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
    plans = plan_pods(gpus, local)
    pod = dataclasses.replace(pod, max_body_mb=router.max_body_mb)
    supervisors = [
        PodSupervisor(p, pod_command(pod, p), local.restart_backoff_s, pod.stop_timeout_s) for p in plans
    ]
    tasks = [asyncio.create_task(s.run(), name=f"pod {s.plan.name}") for s in supervisors]
    # The router's requests in flight wait for pods that drain: give them the pods' whole budget.
    router = dataclasses.replace(
        router,
        discovery="static",
        backends=tuple(p.url for p in plans),
        shutdown_timeout_s=pod.stop_timeout_s,
        stop_timeout_s=pod.stop_timeout_s + 5,
    )
    runner: web.AppRunner | None = None
    try:
        try:
            runner = await serve_app(
                create_app(router), router.host, router.port, shutdown_timeout=router.shutdown_timeout_s
            )
        except OSError as exc:
            log.error("Cannot listen on %s:%d: %s", router.host, router.port, exc.strerror or exc)
            raise SystemExit(1) from None
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
