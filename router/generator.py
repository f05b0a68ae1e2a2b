"""The router's own ImageGenerator, read for the fleet page when the router may read it.

A router with Kubernetes discovery knows its namespace and its pods' selector, which names the
generator (:data:`imagefleet.wire.LABEL_GENERATOR`). The Role the operator gives a router grants
only pods, so the read is usually refused (403); then the fleet page says so and shows what the
router itself knows. A cluster admin who grants ``get`` on ``imagegenerators`` in that namespace
gets the resource's conditions on the page.

The read runs on a thread (the ``kubernetes`` client blocks), at most once per
:data:`REFRESH_S`; requests in between get the last answer, so polling the fleet page never
multiplies calls to the apiserver.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from imagefleet import wire

REFRESH_S = 15.0
READ_TIMEOUT_S = 3.0
CONDITION_FIELDS = ("type", "status", "reason", "message", "lastTransitionTime")


def generator_name(selector: str) -> str | None:
    """The generator named by a pod selector such as ``imagefleet.dev/generator=g,...``."""
    for term in selector.split(","):
        key, sep, value = term.strip().partition("=")
        if sep and key.strip() == wire.LABEL_GENERATOR:
            return value.lstrip("=").strip() or None
    return None


@dataclass(frozen=True)
class Reading:
    """One attempt at reading the resource."""

    conditions: tuple[Mapping[str, Any], ...] | None
    error: str | None = None


def read_conditions(api_client: Any, namespace: str, name: str) -> Reading:
    """The ImageGenerator's status conditions, or why they could not be read."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    try:
        obj = client.CustomObjectsApi(api_client).get_namespaced_custom_object(
            wire.GROUP, wire.VERSION, namespace, wire.PLURAL, name, _request_timeout=READ_TIMEOUT_S
        )
    except ApiException as exc:
        if exc.status == 403:
            return Reading(None, "forbidden")
        if exc.status == 404:
            return Reading(None, "not_found")
        return Reading(None, f"http_{exc.status}")
    except Exception as exc:  # a connection or TLS error: the page says so, the router goes on
        return Reading(None, type(exc).__name__)
    conditions = ((obj or {}).get("status") or {}).get("conditions") or []
    return Reading(
        tuple({k: c[k] for k in CONDITION_FIELDS if k in c} for c in conditions if isinstance(c, Mapping))
    )


def default_api_client() -> Any:
    """An ApiClient from the pod's ServiceAccount, else the local kubeconfig (as discovery does)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    return client.ApiClient()


def describe(namespace: str, selector: str, name: str | None, reading: Reading | None) -> dict[str, Any]:
    """The ``generator`` object of ``GET /v1/fleet``."""
    body: dict[str, Any] = {
        "namespace": namespace,
        "selector": selector,
        "name": name,
        "conditions": None,
        "error": None,
        "note": None,
    }
    look = f"kubectl describe imggen {name or '<name>'} -n {namespace}"
    if reading is None:
        body["note"] = f"Not read yet. Its conditions: {look}."
    elif reading.conditions is not None:
        body["conditions"] = [dict(c) for c in reading.conditions]
    elif reading.error == "forbidden":
        body["error"] = reading.error
        body["note"] = (
            "The router may not read its ImageGenerator (its Role grants only pods), so the page "
            f"shows what the router knows. Its conditions: {look}."
        )
    else:
        body["error"] = reading.error
        body["note"] = f"The ImageGenerator could not be read ({reading.error}). Its conditions: {look}."
    return body


@dataclass
class GeneratorView:
    """The last reading of one generator, refreshed in the background when older than REFRESH_S."""

    namespace: str
    selector: str
    connect: Callable[[], Any] = default_api_client
    clock: Callable[[], float] = time.monotonic
    reading: Reading | None = None
    read_at: float = float("-inf")
    _task: asyncio.Task[None] | None = field(default=None, repr=False)
    _api: Any = field(default=None, repr=False)

    @property
    def name(self) -> str | None:
        return generator_name(self.selector)

    def current(self) -> dict[str, Any]:
        """The ``generator`` object now; starts a refresh when the reading is stale (never waits)."""
        name = self.name
        if name is not None and self.clock() - self.read_at >= REFRESH_S and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._refresh(name), name="generator read")
        return describe(self.namespace, self.selector, name, self.reading)

    async def close(self) -> None:
        """Cancel a read in flight (the app is stopping)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def refresh(self) -> None:
        """Read now (tests, and the first fleet request)."""
        name = self.name
        if name is not None:
            await self._refresh(name)

    async def _refresh(self, name: str) -> None:
        try:
            self.reading = await asyncio.to_thread(self._read, name)
        finally:
            self.read_at = self.clock()
            self._task = None

    def _read(self, name: str) -> Reading:
        try:
            if self._api is None:
                self._api = self.connect()
        except Exception as exc:  # no in-cluster config and no kubeconfig
            return Reading(None, type(exc).__name__)
        return read_conditions(self._api, self.namespace, name)
