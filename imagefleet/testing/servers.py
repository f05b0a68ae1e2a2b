"""Real servers for tests and benchmarks: aiohttp apps on a background thread, pod processes.

Tests drive these with ordinary blocking clients (the ``openai`` client, ``urllib``), exactly as
users would, so no test needs an event loop of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from imagefleet.httpkit import serve


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def get_json(url: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """GET ``url``; (status, parsed JSON body or None)."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body or b"null")
        except ValueError:
            return exc.code, None


def get_text(url: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> str:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return str(resp.read().decode())


class GiveUp(RuntimeError):
    """Raised by a :func:`wait_until` check when its condition can no longer come true (the
    process it waits for exited): the wait ends at once with this error."""


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Call ``check`` until it returns true; its other errors count as "not yet"."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except GiveUp:
            raise
        except Exception:  # not up yet: refused connections, timeouts, half-written files
            pass
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def terminate(proc: subprocess.Popen[bytes], grace_s: float = 60.0) -> None:
    """Stop ``proc`` as a user would: SIGTERM, then SIGKILL if it is not gone within ``grace_s``."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def wait_ready(base_url: str, timeout: float = 120.0) -> None:
    wait_until(lambda: get_json(base_url + "/readyz", timeout=2)[0] == 200, timeout, f"{base_url}/readyz")


class ServerThread:
    """Serve an aiohttp app on a background thread with its own event loop."""

    def __init__(
        self, app_factory: Callable[[], web.Application], host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self._factory = app_factory
        self.host = host
        self.port = port or free_port(host)
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"server-{self.port}", daemon=True
        )
        self.app: web.Application | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServerThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=60)
        return self

    async def _start(self) -> None:
        self.app = self._factory()
        self._runner = await serve(self.app, self.host, self.port, shutdown_timeout=5)

    def call(self, fn: Callable[[], Any], timeout: float = 30) -> Any:
        """Run ``fn`` on the server's loop (to read or poke app state safely)."""

        async def wrapper() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(timeout=timeout)

    def stop(self) -> None:
        if self._runner is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class PodProcess:
    """``python -m imagefleet pod`` in a subprocess, as a real deployment runs it."""

    def __init__(
        self,
        args: Sequence[str] = ("--model", "tiny"),
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_dir: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.args = list(args)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log_path = (log_dir or Path(os.environ.get("TMPDIR", "/tmp"))) / f"pod-{host}-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> PodProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "imagefleet",
                "pod",
                "--host",
                self.host,
                "--port",
                str(self.port),
                *self.args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        log.close()
        return self

    def wait_ready(self, timeout: float = 180.0) -> PodProcess:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise GiveUp(f"pod exited with {self.proc.returncode}; log:\n{self.log_tail()}")
            return get_json(self.url + "/readyz", timeout=2)[0] == 200

        try:
            wait_until(ready, timeout, f"pod {self.url} ready")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; log:\n{self.log_tail()}") from None
        return self

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.kill(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)
            self.proc.wait(5)

    def __enter__(self) -> PodProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


UNBOUNDED_WORK = ("--max-request-gpu-seconds", "1e9", "--max-queued-gpu-seconds", "1e9")
"""Pod flags that lift the bounds on estimated GPU time: tests that hold a CPU pod busy with
deliberately long requests (hundreds of steps of the tiny model) are about routing, not
admission, and on a CPU such requests would exceed any ceiling meant for a GPU."""


@contextlib.contextmanager
def pods(
    count: int, args: Sequence[str] = ("--model", "tiny", *UNBOUNDED_WORK), **kwargs: Any
) -> Iterator[list[PodProcess]]:
    """Start ``count`` pod processes in parallel and wait until all are ready."""
    started = [PodProcess(args, **kwargs).start() for _ in range(count)]
    try:
        for p in started:
            p.wait_ready()
        yield started
    finally:
        for p in started:
            p.stop()
