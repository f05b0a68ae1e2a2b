"""How fast local mode recovers: orphaned pods after ``kill -9`` of ``serve``, and a quarantined pod.

Each run starts ``imagefleet serve --model tiny --gpus none`` (one CPU pod), then either

* ``orphan``: SIGKILLs ``serve`` and measures until its pod process is gone (the parent-death
  signal), or
* ``quarantine``: arms one fault at the pod (``--fault-injection --quarantine-after 1``), sends one
  request that fails and quarantines it, and measures until the router's ``/readyz`` is 200 again
  (the supervisor noticed, stopped the pod and started a new one that loaded and warmed up).

Runnable::

    PYTHONPATH=. python -m bench.serve_faults --runs 3
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

from imagefleet.testing.processes import alive, children
from imagefleet.testing.routers import call, generate
from imagefleet.testing.servers import free_port, get_json, wait_until


def start(log_dir: Path, *extra: str) -> tuple[subprocess.Popen[bytes], int, int]:
    port, pod_port = free_port(), free_port()
    log = log_dir / f"serve-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "imagefleet", "serve", "--model", "tiny", "--gpus", "none",
                "--port", str(port), "--pod-base-port", str(pod_port), *extra,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    wait_until(lambda: "imagefleet is ready" in log.read_text(errors="replace"), 300, "the banner")
    return proc, port, pod_port


def orphan_gone_s(log_dir: Path) -> float:
    proc, _, _ = start(log_dir)
    (pod,) = children(proc.pid)
    started = time.monotonic()
    proc.kill()
    proc.wait()
    wait_until(lambda: not alive(pod), 10, "the pod gone", interval=0.001)
    return time.monotonic() - started


def quarantine_replaced_s(log_dir: Path) -> float:
    proc, port, pod_port = start(log_dir, "--fault-injection", "--quarantine-after", "1")
    router, pod = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{pod_port}"
    try:
        call("POST", pod + "/debug/faults", {"kind": "runtime", "count": 1})
        started = time.monotonic()
        generate(pod)
        wait_until(lambda: get_json(router + "/readyz")[0] == 503, 30, "the pod out", interval=0.01)
        wait_until(lambda: get_json(router + "/readyz")[0] == 200, 300, "a new pod", interval=0.05)
        return time.monotonic() - started
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with TemporaryDirectory() as tmp:
        for _ in range(args.runs):
            print(f"orphan gone after kill -9 of serve: {orphan_gone_s(Path(tmp)) * 1000:.1f} ms", flush=True)
        for _ in range(args.runs):
            print(
                f"quarantined pod replaced, ready again: {quarantine_replaced_s(Path(tmp)):.1f} s", flush=True
            )


if __name__ == "__main__":
    main()
