"""HTTP handlers: thin translations between aiohttp and the proxy, the view and the stats."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from imagefleet import openapi, wire
from imagefleet.errors import NotFound
from imagefleet.httpkit import json_response, read_body
from imagefleet.router import forms, proxy
from imagefleet.router.cost import FREE, Shape, fields_of_json, shape_of
from imagefleet.router.state import RUNTIME, RouterRuntime
from imagefleet.router.stats import aggregate

STATS_TIMEOUT_S = 3.0


async def generations(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    body = await read_body(request)
    fields = fields_of_json(body) if request.content_type == "application/json" else {}
    out = proxy.Outbound(
        "POST",
        "/v1/images/generations",
        body,
        request.headers.get("Content-Type"),
        shape_of(fields) if fields else Shape(),
        "generations",
        rt.signer.sign_images_body if fields.get("response_format") == "url" else None,
    )
    return await proxy.forward(rt, request, out)


async def edits(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    body = await read_body(request)  # kept once: every attempt sends these same bytes
    content_type = request.headers.get("Content-Type")
    fields: dict[str, str] = {}
    if request.content_type == "multipart/form-data" and content_type:
        fields = await forms.text_fields(body, content_type)
    out = proxy.Outbound(
        "POST",
        "/v1/images/edits",
        body,
        content_type,
        shape_of(fields) if fields else Shape(),
        "edits",
        rt.signer.sign_images_body if fields.get("response_format") == "url" else None,
    )
    return await proxy.forward(rt, request, out)


async def models(request: web.Request) -> web.StreamResponse:
    out = proxy.Outbound("GET", "/v1/models", None, None, FREE, "models")
    return await proxy.forward(request.app[RUNTIME], request, out)


async def model(request: web.Request) -> web.StreamResponse:
    """``GET /v1/models/{id}``: the entry of a ready pod's model list with that id, else 404."""
    model_id = request.match_info["model"]
    out = proxy.Outbound("GET", "/v1/models", None, None, FREE, "model")
    response = await proxy.forward(request.app[RUNTIME], request, out)
    if (
        response.status != 200
        or not isinstance(response, web.Response)
        or not isinstance(response.body, bytes)
    ):
        return response
    try:
        listing = json.loads(response.body)
        entries = [e for e in listing["data"] if isinstance(e, dict) and e.get("id") == model_id]
    except (ValueError, KeyError, TypeError):
        entries = []
    if not entries:
        raise NotFound(f"The model '{model_id[:200]}' does not exist.", param="model", code="model_not_found")
    return json_response(entries[0])


async def get_file(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    file_id = request.match_info["file_id"]
    parsed = wire.parse_file_id(file_id)
    view = rt.view.by_key(parsed.key) if parsed is not None and parsed.key else None
    if view is None:
        raise NotFound(f"No image '{file_id[:80]}' here: it expired or never existed.", param="file_id")
    return await proxy.fetch_from(rt, request, view, wire.FILES_PATH + file_id)


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def description(request: web.Request) -> web.Response:
    """The OpenAPI description, with the widest bounds any pod accepts (a request may go to any)."""
    return json_response(openapi.document("router"))


async def readyz(request: web.Request) -> web.Response:
    view = request.app[RUNTIME].view
    ready = view.ready_count()
    if ready:
        return json_response({"status": "ready", "backends": len(view.views), "ready_backends": ready})
    return json_response(
        {"status": "not_ready", "reason": "no_ready_backend", "backends": len(view.views)}, status=503
    )


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[RUNTIME].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def stats(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    views = list(rt.view.views.values())
    answers = await asyncio.gather(*(_pod_stats(rt, v.backend.url) for v in views))
    pods = {v.name: a[0] for v, a in zip(views, answers, strict=True)}
    errors = {v.name: a[1] for v, a in zip(views, answers, strict=True) if a[1]}
    return json_response(aggregate(pods, router_view(rt), errors))


def router_view(rt: RouterRuntime) -> dict[str, dict[str, Any]]:
    """What this router sees of each backend (shown under ``devices.<pod>.router`` in /stats)."""
    fallback = rt.view.fallback_unit_seconds()
    now = time.monotonic()
    return {
        v.name: {
            "url": v.backend.url,
            "accepting": v.accepting,
            "expected_wait_seconds": round(v.expected_wait(fallback), 4),
            "in_flight": len(v.inflight),
            "ejected": v.health.ejected,
            "consecutive_failures": v.health.failures,
            "report_age_seconds": round(now - v.report_at, 3) if v.report is not None else None,
        }
        for v in rt.view.views.values()
    }


async def _pod_stats(rt: RouterRuntime, url: str) -> tuple[dict[str, Any] | None, str | None]:
    try:
        async with rt.client.get(
            url + "/stats", timeout=aiohttp.ClientTimeout(total=STATS_TIMEOUT_S)
        ) as response:
            if response.status != 200:
                return None, f"status {response.status}"
            data = await response.json()
            return (data, None) if isinstance(data, dict) else (None, "not a JSON object")
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return None, type(exc).__name__
