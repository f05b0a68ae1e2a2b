"""The operator's few writes to the Kubernetes API, through the official client, off the event loop.

Objects are written with server-side apply (the client's ``DynamicClient.server_side_apply``)
under one field manager, forcing conflicts only over the fields the operator itself renders.
The client is synchronous, so every call runs on a small thread pool; ``on_request`` is told of
every call (the operator counts them in its metrics, which the scale benchmark reads).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar

from imagefleet import wire

log = logging.getLogger(__name__)

FIELD_MANAGER = wire.MANAGED_BY
REPORTING_CONTROLLER = f"{wire.GROUP}/operator"
API_THREADS = 16

T = TypeVar("T")


def configure_client() -> None:
    """Point the ``kubernetes`` client's default configuration at the cluster.

    In a pod: the service account (in-cluster config). Elsewhere: ``$KUBECONFIG`` or ``~/.kube``.
    """
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))


UNAVAILABLE = frozenset({502, 503, 504})
"""Statuses that say the API server (or what fronts it) is not serving right now."""


def unreachable(exc: BaseException) -> str | None:
    """One line saying why, when ``exc`` means the API server could not be reached or is not
    serving (refused, reset, timed out, 502-504); None for any other failure, which deserves its
    traceback."""
    import urllib3
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        return f"the API server answered {exc.status} {exc.reason}" if exc.status in UNAVAILABLE else None
    if isinstance(exc, urllib3.exceptions.HTTPError | OSError):
        cause = exc.reason if isinstance(exc, urllib3.exceptions.MaxRetryError) else exc
        return f"the API server is unreachable ({type(cause).__name__}: {cause})"
    return None


class Kube:
    """Applies, deletes, patches status and scale, and records Events."""

    def __init__(self, api_client: Any, identity: str, on_request: Callable[[], None] | None = None) -> None:
        from kubernetes import client

        self.api = api_client
        self.identity = identity
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.events = client.EventsV1Api(api_client)
        self._dynamic: Any = None
        self._pool = ThreadPoolExecutor(max_workers=API_THREADS, thread_name_prefix="kube")
        self._on_request = on_request

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._on_request is not None:
            self._on_request()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- writes -------------------------------------------------------------------------------

    def _resource(self, manifest: Mapping[str, Any]) -> Any:
        from kubernetes.dynamic import DynamicClient

        if self._dynamic is None:
            self._dynamic = DynamicClient(self.api)
        return self._dynamic.resources.get(api_version=manifest["apiVersion"], kind=manifest["kind"])

    def _apply_sync(self, manifest: Mapping[str, Any]) -> Any:
        resource = self._resource(manifest)
        return self._dynamic.server_side_apply(
            resource,
            body=dict(manifest),
            namespace=manifest["metadata"].get("namespace"),
            field_manager=FIELD_MANAGER,
            force_conflicts=True,
        )

    async def apply(self, manifest: Mapping[str, Any]) -> None:
        """Create or update ``manifest`` with server-side apply."""
        await self._call(self._apply_sync, manifest)

    async def delete_pod(self, namespace: str, name: str, uid: str) -> bool:
        """Delete a pod (with its grace period), only if it is still the one with ``uid``."""
        from kubernetes.client.exceptions import ApiException

        try:
            await self._call(
                self.core.delete_namespaced_pod,
                name,
                namespace,
                body={"preconditions": {"uid": uid}},
            )
            return True
        except ApiException as exc:
            if exc.status in (404, 409):
                return False
            raise

    async def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        response = await self._call(
            self.core.list_namespaced_pod, namespace, label_selector=selector, _preload_content=False
        )
        items: list[dict[str, Any]] = json.loads(response.data).get("items") or []
        return items

    async def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        """Merge-patch the status subresource (keys set to None are removed)."""
        await self._call(
            self.custom.patch_namespaced_custom_object_status,
            wire.GROUP,
            wire.VERSION,
            namespace,
            wire.PLURAL,
            name,
            {"status": dict(status)},
        )

    async def scale(self, namespace: str, name: str, replicas: int) -> None:
        """Set spec.replicas through the scale subresource (as kubectl scale and HPAs do)."""
        await self._call(
            self.custom.patch_namespaced_custom_object_scale,
            wire.GROUP,
            wire.VERSION,
            namespace,
            wire.PLURAL,
            name,
            {"spec": {"replicas": replicas}},
        )

    async def event(
        self,
        regarding: Mapping[str, Any],
        *,
        reason: str,
        message: str,
        action: str,
        warning: bool = False,
    ) -> None:
        """Record an Event about ``regarding`` (an object's apiVersion, kind, name, namespace, uid)."""
        from kubernetes.client.exceptions import ApiException

        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        body = {
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            # named as client-go names events: <object>.<unique hex>
            "metadata": {
                "name": f"{regarding['name']}.{time.time_ns():x}",
                "namespace": regarding["namespace"],
            },
            "eventTime": now,
            "reportingController": REPORTING_CONTROLLER,
            "reportingInstance": self.identity[:128],
            "action": action,
            "reason": reason,
            "note": message[:1024],
            "type": "Warning" if warning else "Normal",
            "regarding": dict(regarding),
        }
        try:
            await self._call(self.events.create_namespaced_event, regarding["namespace"], body)
        except ApiException as exc:  # an Event is worth a log line, never a failed reconcile
            log.warning("Could not record event %s on %s: %s", reason, regarding["name"], exc.reason)
