"""A small JSON client for the API calls the process kubelet makes, and a list-then-watch loop.

Built on the ``kubernetes`` package's ApiClient (kubeconfig loading, TLS, auth) without its model
classes: objects stay the plain dicts the API sends, keyed as in the YAML a user writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

log = logging.getLogger(__name__)

Timeout = tuple[float, float]
DEFAULT_TIMEOUT: Timeout = (5.0, 30.0)
SMP = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"


class KubeError(Exception):
    """The apiserver answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


def path(*parts: str) -> str:
    return "/".join(quote(p, safe="") if i else p for i, p in enumerate(parts))


class Kube:
    """JSON requests through one ``kubernetes`` ApiClient (thread-safe: urllib3's pool)."""

    def __init__(self, api_client: Any) -> None:
        self.api_client = api_client

    @classmethod
    def from_kubeconfig(cls, kubeconfig: Path, pool_size: int = 64) -> Kube:
        from kubernetes import client, config

        configuration = client.Configuration()
        load: Callable[..., None] = config.load_kube_config
        load(config_file=str(kubeconfig), client_configuration=configuration)
        configuration.connection_pool_maxsize = pool_size
        return cls(client.ApiClient(configuration))

    @property
    def server(self) -> str:
        return str(self.api_client.configuration.host)

    @property
    def ca_file(self) -> str | None:
        ca = self.api_client.configuration.ssl_ca_cert
        return str(ca) if ca else None

    def close(self) -> None:
        self.api_client.close()

    def _send(
        self,
        method: str,
        resource: str,
        query: Sequence[tuple[str, Any]] | None,
        body: Any,
        content_type: str,
        timeout: Timeout,
    ) -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        method, url, headers, body, _ = self.api_client.param_serialize(
            method=method,
            resource_path=resource,
            query_params=list(query or []),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        return self.api_client.call_api(
            method, url, header_params=headers, body=body, _request_timeout=timeout
        )

    def request(
        self,
        method: str,
        resource: str,
        *,
        query: Sequence[tuple[str, Any]] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: Timeout = DEFAULT_TIMEOUT,
    ) -> dict[str, Any]:
        """One call; the decoded JSON answer. Raises :class:`KubeError` on an error status and the
        transport's exceptions (urllib3, OSError) when the apiserver cannot be reached."""
        response = self._send(method, resource, query, body, content_type, timeout)
        data = response.read()
        if not 200 <= response.status < 300:
            raise KubeError(response.status, _message(data))
        return dict(json.loads(data)) if data else {}

    def get(self, resource: str, timeout: Timeout = DEFAULT_TIMEOUT) -> dict[str, Any] | None:
        """GET, with None for 404."""
        try:
            return self.request("GET", resource, timeout=timeout)
        except KubeError as err:
            if err.status == 404:
                return None
            raise

    def watch(
        self,
        resource: str,
        query: Sequence[tuple[str, Any]],
        timeout: Timeout,
        opened: Callable[[Any], None] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """The events of one watch request, until the server ends it. ``opened`` gets the urllib3
        response (its ``shutdown()`` ends a blocked read from another thread)."""
        response = self._send("GET", resource, [*query, ("watch", "true")], None, "", timeout)
        raw = response.response
        if opened is not None:
            opened(raw)
        try:
            if not 200 <= response.status < 300:
                raise KubeError(response.status, _message(raw.read()))
            buffer = b""
            for chunk in raw.stream(amt=None, decode_content=False):
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        yield dict(json.loads(line))
        finally:
            raw.close()  # a watch is rarely read to its end: never hand its connection back half-read
            raw.release_conn()


def _message(data: bytes) -> str:
    try:
        return str(json.loads(data).get("message") or data[:300].decode(errors="replace"))
    except (ValueError, AttributeError):
        return data[:300].decode(errors="replace")


class Informer:
    """List, then watch, one collection; relist after errors (with back-off) and on 410 Gone.

    ``on_list(items)`` gets the full state after every (re)list, ``on_event(type, obj)`` each
    ADDED/MODIFIED/DELETED. Survives apiserver restarts: it keeps retrying until stopped.
    """

    def __init__(
        self,
        kube: Kube,
        resource: str,
        query: Sequence[tuple[str, Any]],
        on_list: Callable[[list[dict[str, Any]]], None],
        on_event: Callable[[str, dict[str, Any]], None],
        stop: threading.Event,
        name: str,
    ) -> None:
        self.kube, self.resource, self.query = kube, resource, list(query)
        self.on_list, self.on_event, self.stop = on_list, on_event, stop
        self.synced = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._response: Any = None

    def start(self) -> Informer:
        self.thread.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        """After ``stop`` is set: end the watch in flight (so the apiserver sees the client go)
        and wait for the thread."""
        response = self._response
        if response is not None:
            with contextlib.suppress(Exception):
                response.shutdown()
        self.thread.join(timeout)

    def _opened(self, response: Any) -> None:
        self._response = response

    def _run(self) -> None:
        delay = 0.5
        while not self.stop.is_set():
            try:
                version = self._list()
                delay = 0.5
                self._watch(version)
            except Exception as err:  # the apiserver went away, or answered garbage
                if self.stop.is_set():
                    return
                log.warning("%s: %s; relisting in %.1fs", self.thread.name, err, delay)
                self.stop.wait(delay)
                delay = min(delay * 2, 5.0)

    def _list(self) -> str:
        listed = self.kube.request("GET", self.resource, query=self.query, timeout=(5.0, 60.0))
        self.on_list(list(listed.get("items") or []))
        self.synced.set()
        return str((listed.get("metadata") or {}).get("resourceVersion") or "")

    def _watch(self, version: str) -> None:
        while not self.stop.is_set():
            server_timeout = random.randint(240, 300)
            query = [
                *self.query,
                ("resourceVersion", version),
                ("allowWatchBookmarks", "true"),
                ("timeoutSeconds", server_timeout),
            ]
            events = self.kube.watch(
                self.resource, query, timeout=(5.0, server_timeout + 30.0), opened=self._opened
            )
            for event in events:
                if self.stop.is_set():
                    return
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        return  # too old: relist
                    raise KubeError(int(obj.get("code") or 500), str(obj.get("message")))
                version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self.on_event(str(kind), obj)


def retry(
    what: str,
    call: Callable[[], Any],
    stop: threading.Event,
    *,
    give_up: Callable[[Exception], bool] = lambda err: False,
    max_delay: float = 10.0,
) -> Any:
    """``call()`` until it succeeds, ``give_up(error)`` is true (re-raised) or ``stop`` is set
    (returns None); errors are logged, with back-off."""
    delay = 0.2
    while True:
        try:
            return call()
        except Exception as err:
            if give_up(err):
                raise
            if stop.is_set():
                return None
            log.warning("%s failed: %s; retrying in %.1fs", what, err, delay)
            if stop.wait(delay + random.uniform(0, delay / 4)):
                return None
            delay = min(delay * 2, max_delay)
