"""Shared fixtures: real inference pods serving the built-in ``tiny`` model on loopback."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

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
