"""Shared fixtures: real inference pods serving the built-in ``tiny`` model on loopback, and the
few fakes the pod's unit tests put in place of time and threads."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

import pytest

from imagefleet import settings as settings_mod
from imagefleet.inference_pod.app import create_app
from imagefleet.settings import PodSettings
from imagefleet.testing.routers import call
from imagefleet.testing.servers import ServerThread, wait_ready


class Pod:
    """An in-process pod (a real aiohttp server on loopback) and small helpers to drive it."""

    def __init__(self, server: ServerThread) -> None:
        self.server = server
        self.url = server.url

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
        timeout: float = 60.0,
    ) -> tuple[int, dict[str, str], Any]:
        """Send a request; (status, headers, JSON body or raw bytes)."""
        reply = call(method, self.url + path, body, headers=headers, raw=raw, timeout=timeout)
        return reply.status, reply.headers, reply.body

    def generate(self, timeout: float = 60.0, **fields: Any) -> tuple[int, Any]:
        status, _, body = self.request(
            "POST", "/v1/images/generations", {"prompt": "a red fox", **fields}, timeout=timeout
        )
        return status, body

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as resp:
            return str(resp.read().decode())

    def batches(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/debug/batches")[2]["data"])

    def arm(self, kind: str, count: int = 1, **extra: Any) -> None:
        status, _, body = self.request("POST", "/debug/faults", {"kind": kind, "count": count, **extra})
        assert status == 200, body

    def load(self) -> dict[str, Any]:
        return dict(self.request("GET", "/v1/load")[2])


PodFactory = Callable[..., Pod]


@pytest.fixture
def make_pod() -> Iterator[PodFactory]:
    """Start pods with given settings (``tiny`` model, fault injection on); stopped after the test."""
    servers: list[ServerThread] = []

    def start(**overrides: Any) -> Pod:
        overrides.setdefault("fault_injection", True)
        pod_settings = settings_mod.load(PodSettings, env={}, **overrides)
        server = ServerThread(lambda: create_app(pod_settings)).start()
        servers.append(server)
        wait_ready(server.url, timeout=120)
        return Pod(server)

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def pod() -> Iterator[Pod]:
    """One shared pod for tests that only read (no faults armed, nothing left queued)."""
    pod_settings = settings_mod.load(PodSettings, env={}, fault_injection=True)
    server = ServerThread(lambda: create_app(pod_settings)).start()
    wait_ready(server.url, timeout=120)
    yield Pod(server)
    server.stop()


# --- fakes for the pod's unit tests: time and threads, nothing else -----------------------------

T = TypeVar("T")


class FakeClock:
    """A clock that moves only when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class InlineExecutor(Executor):
    """Runs each call at once, on the caller's thread."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future


class ManualExecutor(Executor):
    """Holds each call until the test runs it: a GPU that is busy for exactly as long as the test says."""

    def __init__(self) -> None:
        self.calls: deque[tuple[Future[Any], Callable[[], Any]]] = deque()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        self.calls.append((future, lambda: fn(*args, **kwargs)))
        return future

    def run_next(self) -> None:
        future, call = self.calls.popleft()
        try:
            future.set_result(call())
        except BaseException as exc:
            future.set_exception(exc)
