"""Where backends come from: one small interface, two sources.

A :class:`Discovery` reports the complete set of backends, first once and then after every
change, by calling ``on_change`` on the event loop. The router does not care where the set comes
from; it diffs each snapshot against what it knows (see :mod:`.poller`).

* :class:`StaticDiscovery` -- a fixed list of base URLs (local mode, or a router placed by hand).
  ``URL#ID`` also names the instance expected there: a process on that port whose load report
  names another instance (an orphan of an earlier run, someone else's server) is not adopted.
* :class:`KubernetesDiscovery` -- the pods of one ImageGenerator, found by label selector in one
  namespace. The official ``kubernetes`` client is synchronous, so list-then-watch runs on a
  daemon thread and hands snapshots to the loop with ``call_soon_threadsafe``. Every watch event
  goes through :func:`apply_event`, a pure function that unit tests feed recorded events to.

A pod is a backend while it is Ready, has an IP and is not terminating. Terminating pods are
dropped at once (as EndpointSlices do); the pod itself drains the work it already accepted, so
requests in flight to it still finish.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)

KEY_CHARS = 10
WATCH_TIMEOUT_S = 60
"""Each watch call ends after this long and is renewed, so a stopped watcher exits promptly."""
RETRY_MIN_S = 1.0
RETRY_MAX_S = 30.0


@dataclass(frozen=True)
class Backend:
    """One inference pod as the router sees it: a name for humans and metrics, and a base URL."""

    name: str
    url: str
    instance_id: str = ""
    """The instance its load report must name; empty: any."""

    def owns(self, reported_instance_id: str) -> bool:
        """Whether a load report naming ``reported_instance_id`` comes from this backend."""
        return not self.instance_id or reported_instance_id == self.instance_id

    @property
    def key(self) -> str:
        """A short id derived from the URL, the same in every router replica (file ids carry it)."""
        return backend_key(self.url)


def backend_key(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:KEY_CHARS]


OnChange = Callable[[dict[str, Backend]], None]


class Discovery(Protocol):
    async def run(self, on_change: OnChange) -> None:
        """Report the current backends (keyed by name), then every change, until cancelled."""


# --- static -----------------------------------------------------------------------------------


def static_backends(urls: Iterable[str]) -> dict[str, Backend]:
    """Base URLs (``host:port`` is read as ``http://host:port``; ``URL#ID`` expects instance ID)
    -> backends named by URL."""
    out: dict[str, Backend] = {}
    for raw in urls:
        text, _, instance_id = raw.strip().partition("#")
        url = text.rstrip("/")
        if not url:
            continue
        if "://" not in url:
            url = "http://" + url
        out[url] = Backend(name=url, url=url, instance_id=instance_id)
    return out


class StaticDiscovery:
    def __init__(self, urls: Iterable[str]) -> None:
        self.backends = static_backends(urls)

    async def run(self, on_change: OnChange) -> None:
        on_change(dict(self.backends))
        await asyncio.Event().wait()


# --- Kubernetes: pure part --------------------------------------------------------------------


def pod_backend(pod: Mapping[str, Any], *, port: int) -> Backend | None:
    """The backend a pod (as the API server's JSON) stands for, or None if it cannot serve."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    name = meta.get("name")
    ip = status.get("podIP")
    if not name or not ip or meta.get("deletionTimestamp") or status.get("phase") != "Running":
        return None
    conditions = status.get("conditions") or []
    if not any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions):
        return None
    host = f"[{ip}]" if ":" in ip else ip
    return Backend(name=str(name), url=f"http://{host}:{port}")


def apply_event(
    backends: Mapping[str, Backend], event: Mapping[str, Any], *, port: int
) -> dict[str, Backend]:
    """The backend set after one watch event (``{"type": ..., "object": <pod JSON>}``).

    ADDED and MODIFIED put the pod in or take it out depending on its state; DELETED takes it out.
    BOOKMARK and unknown events change nothing.
    """
    kind = event.get("type")
    pod = event.get("object") or {}
    name = (pod.get("metadata") or {}).get("name")
    out = dict(backends)
    if kind not in ("ADDED", "MODIFIED", "DELETED") or not name:
        return out
    backend = None if kind == "DELETED" else pod_backend(pod, port=port)
    if backend is None:
        out.pop(name, None)
    else:
        out[name] = backend
    return out


def from_list(pods: Iterable[Mapping[str, Any]], *, port: int) -> dict[str, Backend]:
    """The backend set of a full pod list (the start of every list-then-watch)."""
    out: dict[str, Backend] = {}
    for pod in pods:
        out = apply_event(out, {"type": "ADDED", "object": pod}, port=port)
    return out


def retry_delay(failures: int) -> float:
    return float(min(RETRY_MAX_S, RETRY_MIN_S * 2 ** max(0, failures - 1)))


# --- Kubernetes: the watcher ------------------------------------------------------------------


class KubernetesDiscovery:
    """List-then-watch the pods matching ``selector`` in ``namespace`` on a daemon thread."""

    def __init__(self, namespace: str, selector: str, port: int) -> None:
        self.namespace = namespace
        self.selector = selector
        self.port = port
        self._stop = threading.Event()

    async def run(self, on_change: OnChange) -> None:
        loop = asyncio.get_running_loop()

        def publish(snapshot: dict[str, Backend]) -> None:
            loop.call_soon_threadsafe(on_change, snapshot)

        thread = threading.Thread(
            target=self._watch_forever, args=(publish,), name="k8s-discovery", daemon=True
        )
        thread.start()
        try:
            await asyncio.Event().wait()
        finally:
            self._stop.set()

    def _watch_forever(self, publish: OnChange) -> None:
        kubernetes: Any = importlib.import_module("kubernetes")  # untyped; imported only when used
        api = None
        failures = 0
        while not self._stop.is_set():
            try:
                if api is None:
                    api = _connect(kubernetes)
                self._list_and_watch(api, kubernetes.watch.Watch(), publish)
                failures = 0
            except Exception as exc:  # no config yet, API server down, 410 Gone, a network error: relist
                failures += 1
                log.warning(
                    "Watching pods in %s failed (%s: %s); retrying in %.0f s",
                    self.namespace,
                    type(exc).__name__,
                    exc,
                    retry_delay(failures),
                )
                self._stop.wait(retry_delay(failures))

    def _list_and_watch(self, api: Any, watcher: Any, publish: OnChange) -> None:
        response = api.list_namespaced_pod(
            self.namespace, label_selector=self.selector, _preload_content=False
        )
        raw = json.loads(response.data)
        backends = from_list(raw.get("items") or [], port=self.port)
        publish(dict(backends))
        version = (raw.get("metadata") or {}).get("resourceVersion")
        while not self._stop.is_set():
            for event in watcher.stream(
                api.list_namespaced_pod,
                self.namespace,
                label_selector=self.selector,
                resource_version=version,
                timeout_seconds=WATCH_TIMEOUT_S,
                allow_watch_bookmarks=True,
                deserialize=False,
            ):
                if self._stop.is_set():
                    watcher.stop()
                    return
                if event.get("type") == "ERROR":
                    raise RuntimeError(f"watch error: {(event.get('object') or {}).get('message')}")
                version = ((event.get("object") or {}).get("metadata") or {}).get(
                    "resourceVersion"
                ) or version
                changed = apply_event(backends, event, port=self.port)
                if changed != backends:
                    backends = changed
                    publish(dict(backends))


def _connect(kubernetes: Any) -> Any:
    """A CoreV1 client: in-cluster config (a pod's service account), else the local kubeconfig."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    return kubernetes.client.CoreV1Api()
