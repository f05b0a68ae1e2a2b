"""Helpers shared by the benchmarks: flags, result records, pod, local-mode and router processes,
process memory, HTTP and metrics.

Every benchmark prints one JSON object per line (and appends it to ``$OUT/<name>.jsonl`` when the
``OUT`` environment variable names a folder), so a run on a remote accelerator can be read back
and tabulated later; a human-readable table comes last.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import io
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagefleet.testing.servers import free_port, get_json, terminate, wait_until

DEFAULT_MODEL = "synthetic:sd3.5-medium"
DEFAULT_SIZE = "1024x1024"
DEFAULT_STEPS = 28
DEFAULT_GUIDANCE = 4.5
# The four prompts of Aquiles-Image's batching test.
PROMPTS = (
    "a green tree in a beautiful forest",
    "a orange sunset over the ocean",
    "a pink flamingo standing in water",
    "a brown dog playing in the park",
)
POD_READY_TIMEOUT_S = 600.0


# --- flags ---------------------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    """``"1024x768"`` -> (1024, 768)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"size must look like 1024x1024, got {text!r}")
    return int(match.group(1)), int(match.group(2))


def parse_int_list(text: str) -> list[int]:
    """``"1,2,4"`` -> [1, 2, 4]; every value must be positive."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The flags every benchmark shares: what to generate, and how."""
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"model the pod serves (default {DEFAULT_MODEL})"
    )
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="denoising steps per image")
    parser.add_argument(
        "--size", type=parse_size, default=parse_size(DEFAULT_SIZE), help="WxH of every image"
    )
    parser.add_argument(
        "--guidance", type=float, default=DEFAULT_GUIDANCE, help="classifier-free guidance scale"
    )
    parser.add_argument(
        "--tier", default="lossless", choices=("lossless", "fast"), help="quality tier every request asks for"
    )
    parser.add_argument(
        "--pod-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra flag for every pod process, e.g. --pod-arg=--max-wait-ms=0 (repeatable)",
    )
    parser.add_argument(
        "--pod-timeout",
        type=float,
        default=POD_READY_TIMEOUT_S,
        help="seconds a pod may take to become ready",
    )


def size_text(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


# --- results -------------------------------------------------------------------------------------


class Results:
    """JSON lines on stdout, mirrored to ``$OUT/<name>.jsonl`` when ``OUT`` is set."""

    def __init__(self, name: str) -> None:
        self.name = name
        out = os.environ.get("OUT")
        self.path = Path(out) / f"{name}.jsonl" if out else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, record: dict[str, Any]) -> None:
        line = json.dumps({"bench": self.name, **record}, default=str)
        print(line, flush=True)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(line + "\n")

    def report(self, text: str) -> None:
        """The human-readable summary: printed, and written to ``$OUT/<name>.txt`` when set."""
        print(text)
        if self.path is not None:
            self.path.with_suffix(".txt").write_text(text + "\n")


def environment(model: str) -> dict[str, Any]:
    """Where the numbers come from: card, driver, library versions, date."""
    info: dict[str, Any] = {
        "event": "environment",
        "date": dt.date.today().isoformat(),
        "model": model,
        "python": platform.python_version(),
        "host_cpus": os.cpu_count(),
    }
    for module in ("torch", "diffusers", "transformers"):
        with contextlib.suppress(ImportError):
            info[module] = __import__(module).__version__
    info["gpu"] = _nvidia_smi()
    return info


def _nvidia_smi() -> str | None:
    """The card as nvidia-smi names it (None without one); read without initialising CUDA here."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def summary(values: Sequence[float]) -> dict[str, float]:
    """mean / min / max (and median) of a non-empty series, rounded for printing."""
    return {
        "mean": round(statistics.fmean(values), 3),
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def percentiles(values: Sequence[float]) -> dict[str, float] | None:
    """Nearest-rank p50 / p90 / p99 and the max of a series (None when empty), rounded."""
    if not values:
        return None
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)], 3)

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": round(ordered[-1], 3)}


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain fixed-width table."""
    cells = [[str(h) for h in headers], *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


# --- pods ----------------------------------------------------------------------------------------


def log_dir() -> Path:
    """Where pod logs go: ``$BENCH_LOG_DIR`` if set (the device script collects it), else a temp dir."""
    path = Path(os.environ.get("BENCH_LOG_DIR") or tempfile.mkdtemp(prefix="imagefleet-bench-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def pod(model: str, args: Sequence[str], timeout_s: float) -> Iterator[Any]:
    """A fresh ``python -m imagefleet pod`` process serving ``model``, ready, stopped afterwards.

    The benchmarks read the pod's batch log (``/debug/batches``), which only a pod with the test
    hook on serves; nothing is armed, so no batch is touched by it.
    """
    from imagefleet.testing.servers import PodProcess

    process = PodProcess(["--model", model, "--fault-injection", *args], log_dir=log_dir())
    process.start()
    try:
        process.wait_ready(timeout=timeout_s)
        yield process
    finally:
        process.stop(timeout=10.0)


# --- local mode and routers ----------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """The generation every request of a load benchmark asks for (``guidance`` None: the model's)."""

    model: str
    width: int
    height: int
    steps: int
    guidance: float | None

    def body(self, i: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": PROMPTS[i % len(PROMPTS)],
            "size": f"{self.width}x{self.height}",
            "num_inference_steps": self.steps,
            "seed": i,
        }
        if self.guidance is not None:
            body["guidance_scale"] = self.guidance
        return body


def run_log_dir(name: str) -> Path:
    """Where a benchmark's process logs go: ``$OUT/<name>-logs`` when ``OUT`` is set, else a temp dir."""
    out = os.environ.get("OUT")
    path = Path(out) / f"{name}-logs" if out else Path(tempfile.mkdtemp(prefix=f"imagefleet-{name}-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def free_port_run(count: int) -> int:
    """A first port such that ``count`` consecutive ports are free."""
    for _ in range(100):
        base = free_port()
        if base + count > 65535:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + count):
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no run of {count} free ports")


def imagefleet_command(*args: str) -> list[str]:
    """``python -m imagefleet ARGS`` with this interpreter."""
    return [sys.executable, "-m", "imagefleet", *args]


def serve_command(
    model: str,
    port: int,
    pod_port: int,
    max_batch_size: int,
    *,
    gpus: Sequence[str] = (),
    cpu_pods: int = 0,
    extra: Sequence[str] = (),
) -> list[str]:
    """Local mode serving ``model``: a pod per GPU of ``gpus``, or ``cpu_pods`` CPU pods without any."""
    cmd = imagefleet_command(
        "serve", "--model", model, "--port", str(port), "--pod-base-port", str(pod_port),
        "--max-batch-size", str(max_batch_size),
    )  # fmt: skip
    cmd += ["--gpus", ",".join(gpus)] if gpus else ["--gpus", "none", "--cpu-pods", str(cpu_pods)]
    return cmd + list(extra)


def router_command(port: int, backends: Sequence[str]) -> list[str]:
    """An ``imagefleet router`` in front of ``backends`` (pod URLs), default settings otherwise."""
    return imagefleet_command("router", "--port", str(port), "--backends", ",".join(backends))


@contextlib.contextmanager
def process(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A subprocess with its output in ``log``; SIGTERM (then SIGKILL) on the way out."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    try:
        yield proc
    finally:
        terminate(proc)


def ready_backends(url: str) -> int:
    """Ready pods behind a router (local mode's or ``imagefleet router``), per its ``/readyz``."""
    status, body = get_json(url + "/readyz", timeout=5)
    return int(body.get("ready_backends", 0)) if status == 200 and isinstance(body, dict) else 0


def wait_fleet(url: str, count: int, timeout: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until ``count`` pods are ready behind the router at ``url``; raises with the log's tail if
    ``proc`` (what serves it) exits first."""

    def check() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}; log {log}:\n{log.read_text()[-3000:]}")
        return ready_backends(url) >= count

    wait_until(check, timeout, f"{count} ready pod(s) behind {url}", interval=1.0)


def proc_status_mib(pid: int, field: str) -> float | None:
    """A memory figure of ``/proc/<pid>/status`` in MiB: ``VmRSS`` (resident now) or ``VmHWM``
    (the peak resident size over the process's life, which no sampler can miss); None if unread."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


# --- HTTP payloads and metrics -------------------------------------------------------------------


def decode_images(body: dict[str, Any]) -> list[tuple[int, int]]:
    """Decode every ``b64_json`` image of an Images API response (as a client would); their sizes."""
    from PIL import Image

    sizes = []
    for item in body["data"]:
        with Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))) as image:
            image.load()
            sizes.append(image.size)
    return sizes


def histogram_totals(metrics_text: str, name: str) -> tuple[float, float]:
    """(sum, count) of one unlabelled Prometheus histogram in a /metrics text."""
    total = count = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(f"{name}_sum "):
            total = float(line.split()[-1])
        elif line.startswith(f"{name}_count "):
            count = float(line.split()[-1])
    return total, count


def histogram_delta(before: str, after: str, name: str) -> dict[str, float | None]:
    """Mean and count of a histogram's observations between two /metrics scrapes."""
    s0, c0 = histogram_totals(before, name)
    s1, c1 = histogram_totals(after, name)
    n = c1 - c0
    return {"count": n, "mean_s": round((s1 - s0) / n, 4) if n > 0 else None}


def main_guard(main: Any) -> None:
    """Run ``main`` as a script's entry point and exit with its status.

    SIGTERM (``timeout``, a cancelled job) exits the same way, through every ``finally``: the
    pods and routers a benchmark started run in their own sessions and would outlive it otherwise,
    holding the GPU while the next benchmark measures.
    """

    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    sys.exit(main())
