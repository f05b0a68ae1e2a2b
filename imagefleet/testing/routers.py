"""Routers for tests and benchmarks, and blocking clients that observe where requests went.

A router under test runs in-process on a :class:`~imagefleet.testing.servers.ServerThread`, in
front of real pod processes. Where a request went is read from the pods themselves (their
``/stats`` and ``/metrics``), never from a stand-in for a pod.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from imagefleet import metrics, settings
from imagefleet.router.app import create_app
from imagefleet.router.handlers import router_view
from imagefleet.router.state import RUNTIME
from imagefleet.settings import RouterSettings
from imagefleet.testing.servers import ServerThread, get_json, get_text, wait_until


def router_settings(backends: Sequence[str] = (), **overrides: Any) -> RouterSettings:
    """Router settings from defaults and ``overrides`` only (the environment is ignored)."""
    return settings.load(RouterSettings, {}, env={}, backends=tuple(backends), **overrides)


class RouterThread(ServerThread):
    """A router app on a background thread."""

    def __init__(self, router: RouterSettings, **kwargs: Any) -> None:
        super().__init__(lambda: create_app(router, **kwargs))
        self.settings = router

    def view(self) -> dict[str, dict[str, Any]]:
        """What the router sees of each backend (read on its own loop)."""

        def read() -> dict[str, dict[str, Any]]:
            assert self.app is not None
            return router_view(self.app[RUNTIME])

        return dict(self.call(read))

    def wait_ready(self, backends: int = 1, timeout: float = 60.0) -> RouterThread:
        """Until at least ``backends`` backends are ready in the router's view."""
        wait_until(
            lambda: sum(1 for v in self.view().values() if v["accepting"]) >= backends,
            timeout,
            f"{backends} ready backend(s) behind {self.url}",
        )
        return self

    def start(self) -> RouterThread:
        super().start()
        return self

    def __enter__(self) -> RouterThread:
        return self.start()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: Any
    """Parsed JSON, or the raw bytes when the body is not JSON."""


def call(
    method: str,
    url: str,
    body: Any = None,
    *,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
    timeout: float = 120.0,
) -> Reply:
    """One blocking HTTP request; never raises for an HTTP error status."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    hdrs = {"Content-Type": "application/json"} if body is not None and raw is None else {}
    hdrs.update(headers or {})
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            payload, status, resp_headers = resp.read(), resp.status, dict(resp.headers)
    except urllib.error.HTTPError as exc:
        payload, status, resp_headers = exc.read(), exc.code, dict(exc.headers)
    try:
        return Reply(status, resp_headers, json.loads(payload))
    except ValueError:
        return Reply(status, resp_headers, payload)


def generate(
    base_url: str, timeout: float = 120.0, headers: dict[str, str] | None = None, **fields: Any
) -> Reply:
    return call(
        "POST",
        base_url + "/v1/images/generations",
        {"prompt": "a red fox", **fields},
        headers=headers,
        timeout=timeout,
    )


class Held:
    """A generation request held open in the background; :meth:`hang_up` closes its connection,
    which the server takes as a cancellation."""

    def __init__(self, base_url: str, *, timeout: float = 600.0, **fields: Any) -> None:
        parts = urllib.parse.urlsplit(base_url)
        assert parts.hostname is not None and parts.port is not None
        self._conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        self._body = json.dumps({"prompt": "held", **fields}).encode()
        self.status: int | None = None
        self.error: BaseException | None = None
        self.sent_at = 0.0
        self.done_at = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Held:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self.sent_at = time.monotonic()
            self._conn.request(
                "POST",
                "/v1/images/generations",
                body=self._body,
                headers={"Content-Type": "application/json"},
            )
            response = self._conn.getresponse()
            response.read()
            self.status = response.status
        except BaseException as exc:
            self.error = exc
        finally:
            self.done_at = time.monotonic()
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float = 600.0) -> int | None:
        self._done.wait(timeout)
        return self.status

    def hang_up(self) -> None:
        sock = self._conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._conn.close()
        self._done.wait(10)


def pod_stats(base_url: str) -> dict[str, Any]:
    status, body = get_json(base_url + "/stats", timeout=10)
    assert status == 200, body
    return dict(body)


def pod_requests(base_url: str) -> int:
    """Requests a pod (or a router, over all its pods) has accepted: ``/stats`` global.total_requests."""
    return int(pod_stats(base_url)["global"]["total_requests"])


def scrape(base_url: str, headers: dict[str, str] | None = None) -> metrics.Scrape:
    return metrics.parse(get_text(base_url + "/metrics", timeout=10, headers=headers))


def pod_busy(base_url: str) -> bool:
    status, body = get_json(base_url + "/v1/load", timeout=5)
    return status == 200 and (body["queued_samples"] + body["running_samples"]) > 0
