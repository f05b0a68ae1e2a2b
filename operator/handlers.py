"""kopf registration: watches that feed the :class:`~.controller.Controller`, and its lifetime.

Thin on purpose. kopf runs three watches (ImageGenerators, their inference pods, their router
Deployments) and hands every event to the controller, which decides; on start-up it builds the
controller's parts (an API client, an HTTP session for scraping, the health and metrics
endpoint), and on cleanup it stops the workers and closes them.

The handlers are event handlers only, so kopf writes nothing onto the watched objects: no
finalizers, no progress annotations.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import kopf
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from imagefleet import wire
from imagefleet.httpkit import json_response
from imagefleet.httpkit import serve as serve_app
from imagefleet.operator import leader
from imagefleet.operator.controller import Controller
from imagefleet.operator.kube import Kube, configure_client
from imagefleet.operator.scrape import Scraper
from imagefleet.operator.telemetry import OperatorMetrics
from imagefleet.settings import OperatorSettings

log = logging.getLogger(__name__)


@dataclass
class Parts:
    """What start-up made; None until then (and again after cleanup)."""

    controller: Controller | None = None
    session: aiohttp.ClientSession | None = None
    kube: Kube | None = None
    health: web.AppRunner | None = None
    lost: bool = False
    """This replica held the leader Lease and lost it."""


def identity() -> str:
    """Who this operator replica is, in Events and the Lease: its pod name, else host and pid."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


def build_registry(
    op: OperatorSettings,
    metrics: OperatorMetrics | None = None,
    on_lost: Callable[[], None] | None = None,
) -> tuple[kopf.OperatorRegistry, Parts]:
    """A kopf registry with the operator's handlers; ``Parts`` shows what runs (for tests).

    ``on_lost`` is called when this replica loses the leader Lease (``imagefleet operator`` stops
    kopf then); the workers stop either way.
    """
    registry = kopf.OperatorRegistry()
    parts = Parts()
    metrics = metrics or OperatorMetrics()

    @kopf.on.login(registry=registry)
    async def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        """The pod's service account in a cluster, else ``$KUBECONFIG`` (as read now)."""
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure_kopf(settings)
        from kubernetes import client

        configure_client()
        parts.kube = Kube(client.ApiClient(), identity(), on_request=metrics.api_requests.inc)
        parts.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=op.scrape_concurrency, limit_per_host=4),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        scraper = Scraper(parts.session, op.scrape_timeout_s, op.scrape_concurrency)
        parts.controller = Controller(op, parts.kube, scraper, metrics, active=not op.leader_election)
        metrics.generators.set_function(lambda: len(parts.controller.workers) if parts.controller else 0)
        if op.leader_election:
            controller = parts.controller

            def lead() -> None:
                metrics.leader.set(1)
                controller.activate()

            def lose() -> None:
                metrics.leader.set(0)
                parts.lost = True
                asyncio.get_running_loop().create_task(controller.stop())
                if on_lost is not None:
                    on_lost()

            leader.start(op, identity(), asyncio.get_running_loop(), lead, lose)
        if op.health_port:
            parts.health = await serve_app(
                health_app(parts, metrics), op.health_host, op.health_port, shutdown_timeout=1
            )
        log.info("Operator %s watching %s", identity(), ", ".join(op.namespaces) or "all namespaces")

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        if parts.controller is not None:
            await parts.controller.stop()
        if parts.health is not None:
            await parts.health.cleanup()
        if parts.session is not None:
            await parts.session.close()
        if parts.kube is not None:
            parts.kube.close()

    @kopf.on.event(wire.GROUP, wire.VERSION, wire.PLURAL, registry=registry)
    async def generator_event(event: kopf.RawEvent, **_: Any) -> None:
        if parts.controller is not None:
            parts.controller.on_generator(event.get("type"), event["object"])

    @kopf.on.event(
        "",
        "v1",
        "pods",
        labels={wire.LABEL_MANAGED_BY: wire.MANAGED_BY, wire.LABEL_COMPONENT: wire.COMPONENT_POD},
        registry=registry,
    )
    async def pod_event(event: kopf.RawEvent, **_: Any) -> None:
        if parts.controller is not None:
            parts.controller.on_pod(event.get("type"), event["object"])

    @kopf.on.event(
        "apps",
        "v1",
        "deployments",
        labels={wire.LABEL_MANAGED_BY: wire.MANAGED_BY, wire.LABEL_COMPONENT: wire.COMPONENT_ROUTER},
        registry=registry,
    )
    async def router_event(event: kopf.RawEvent, **_: Any) -> None:
        if parts.controller is not None:
            parts.controller.on_router(event.get("type"), event["object"])

    return registry, parts


def configure_kopf(settings: kopf.OperatorSettings) -> None:
    """kopf's own knobs: watches renewed before proxies cut them, no Events from its log lines."""
    settings.posting.level = logging.WARNING
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)  # not a line per watch event
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    settings.watching.reconnect_backoff = 1.0
    settings.networking.request_timeout = 60
    settings.persistence.finalizer = f"{wire.GROUP}/operator"


def health_app(parts: Parts, metrics: OperatorMetrics) -> web.Application:
    """``/healthz`` (alive: the controller runs) and ``/metrics`` (the operator's own)."""

    async def healthz(_: web.Request) -> web.Response:
        ok = parts.controller is not None and not parts.controller.stopping
        return json_response({"status": "ok" if ok else "starting"}, status=200 if ok else 503)

    async def metrics_page(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get(wire.HEALTH_PATH, healthz)
    app.router.add_get(wire.METRICS_PATH, metrics_page)
    return app
