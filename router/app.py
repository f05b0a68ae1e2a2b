"""The router's aiohttp application factory and its lifecycle.

``create_app`` builds an app that does not listen yet, so tests (on a :class:`ServerThread`),
local mode (in-process) and ``imagefleet router`` all share one builder. One cleanup context owns
everything with a lifetime: the client session (one connection pool to all pods), the pollers
and the discovery task.

Middlewares, outermost first: counting every answer (``imagefleet_router_responses_total``),
errors to OpenAI's envelope (so a 401 or 413 wears it too), body limits (a declared oversize
body is a 413 before it is read), then API keys (or a file URL's signature; the web pages are open: what they fetch needs a key
like any client's request).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from imagefleet import metrics as m
from imagefleet import settings as settings_mod
from imagefleet import wire
from imagefleet.errors import Forbidden
from imagefleet.httpkit import ERROR_MARK, Handler, edge_middleware, error_middleware, setup_edge
from imagefleet.httpkit import serve as serve_app
from imagefleet.router.auth import KeyStore, needs_key
from imagefleet.router.discovery import Discovery, KubernetesDiscovery, StaticDiscovery
from imagefleet.router.loadview import LoadView
from imagefleet.router.pick import PICKERS
from imagefleet.router.poller import Poller
from imagefleet.router.publicurl import networks
from imagefleet.router.routes import setup_routes
from imagefleet.router.signing import UrlSigner, signed_request
from imagefleet.router.state import RUNTIME, RouterRuntime
from imagefleet.router.telemetry import RouterMetrics
from imagefleet.router.web import is_page, setup_web
from imagefleet.settings import RouterSettings

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 3.0


def create_app(
    settings: RouterSettings, *, discovery: Discovery | None = None, rng: random.Random | None = None
) -> web.Application:
    """Build the router app. ``discovery`` defaults to the one the settings name."""
    view = LoadView(
        eject_after=settings.eject_after, backoff_s=settings.backoff_s, backoff_max_s=settings.backoff_max_s
    )
    rt = RouterRuntime(
        settings=settings,
        view=view,
        metrics=RouterMetrics(),
        keys=KeyStore(settings.api_keys, settings.api_keys_file),
        picker=PICKERS[settings.pick],
        signer=UrlSigner.from_settings(settings),
        trusted=networks(settings.trusted_proxies),
        rng=rng or random.Random(),
    )
    rt.metrics.bind(
        known=lambda: len(view.views),
        healthy=view.healthy_count,
        ready=view.ready_count,
    )
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[count_responses, error_middleware, edge_middleware, auth_middleware],
    )
    edge = setup_edge(app, settings, settings.max_body_bytes)
    rt.metrics.bind_connection_errors(lambda: edge.refused)
    app[RUNTIME] = rt
    app.cleanup_ctx.append(lambda a: _lifetime(a, discovery or discovery_for(settings)))
    setup_routes(app)
    setup_web(app, settings)
    return app


def discovery_for(settings: RouterSettings) -> Discovery:
    if settings.discovery == "kubernetes":
        return KubernetesDiscovery(settings.namespace, settings.selector, settings.backend_port)
    return StaticDiscovery(settings.backends)


PROXIED = frozenset(("generations", "edits", "files", "models", "model"))
"""Endpoints whose successful answers are a pod's, relayed."""


@web.middleware
async def count_responses(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    endpoint = request.match_info.route.name or "other"
    own = response.get(ERROR_MARK, False) or endpoint not in PROXIED
    request.app[RUNTIME].metrics.responses.labels(
        endpoint, str(response.status), m.ORIGIN_ROUTER if own else m.ORIGIN_BACKEND
    ).inc()
    return response


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The API key, or for a file URL a valid signature instead (a bad one is a 403 unless the
    request also carries a good key: links signed by a replica with another key still work then)."""
    rt = request.app[RUNTIME]
    if (
        not rt.keys.enabled
        or is_page(request.path)
        or not needs_key(request.path, rt.settings.protect_metrics)
    ):
        return await handler(request)
    authorization = request.headers.get("Authorization")
    if request.path.startswith(wire.FILES_PATH) and signed_request(request.query):
        try:
            rt.signer.verify(
                request.path[len(wire.FILES_PATH) :],
                request.query.get("expires"),
                request.query.get("signature"),
            )
        except Forbidden:
            if authorization is None:
                raise
        else:
            return await handler(request)
    rt.keys.check(authorization)
    return await handler(request)


async def _lifetime(app: web.Application, discovery: Discovery) -> AsyncIterator[None]:
    rt = app[RUNTIME]
    rt.session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S),
        cookie_jar=aiohttp.DummyCookieJar(),  # never carry one client's cookies to another's request
        auto_decompress=False,
    )
    poller = Poller(rt.view, rt.session, rt.settings.poll_interval_ms / 1000)
    watching = asyncio.get_running_loop().create_task(discovery.run(poller.on_change), name="discovery")
    if not rt.keys.enabled:
        log.warning("No API keys configured: the router accepts every request")
    yield
    watching.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watching
    await poller.stop()
    await rt.session.close()


async def serve(settings: RouterSettings) -> None:
    """Run the router until cancelled (SIGINT/SIGTERM are handled by the CLI)."""
    log.info("Router settings: %s", settings_mod.describe(settings))
    runner = await serve_app(
        create_app(settings), settings.host, settings.port, shutdown_timeout=settings.shutdown_timeout_s
    )
    log.info("Router listening on http://%s:%d", settings.host, settings.port)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
