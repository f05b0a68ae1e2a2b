"""Rendering images as the Images API's response: base64 in the body, or links to kept files.

Links start with the base the router names in :data:`~imagefleet.wire.PUBLIC_BASE_HEADER` (the
router sets it itself and never passes a client's); without it, or with a malformed one, with
this pod's own address as the request reached it. Client ``X-Forwarded-*`` headers are never
read: the router decides which proxies to believe. Base64 bodies of several megabytes are
assembled on the CPU pool.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import Executor
from typing import Any

from aiohttp import web

from imagefleet import wire
from imagefleet.httpkit import json_response
from imagefleet.inference_pod.encoding import Encoded
from imagefleet.inference_pod.files import FileStore
from imagefleet.inference_pod.service import Result


async def images_response(
    request: web.Request, result: Result, files: FileStore, cpu: Executor
) -> web.Response:
    req = result.request
    meta = {
        "created": int(time.time()),
        "output_format": req.output_format,
        "size": f"{req.width}x{req.height}",
        "background": "opaque",
        "quality": "auto",
        "tier": req.tier,
    }
    if req.response_format == "url":
        prefix = request.headers.get(wire.FILE_PREFIX_HEADER, "")
        base = public_base(request)
        urls = [f"{base}{wire.FILES_PATH}{files.put(image, prefix)}" for image in result.images]
        response = json_response({**meta, "data": [{"url": url, "revised_prompt": None} for url in urls]})
    else:
        body = await asyncio.get_running_loop().run_in_executor(cpu, render_b64_body, meta, result.images)
        response = web.Response(body=body, content_type="application/json")
    response.headers[wire.TIER_HEADER] = req.tier
    return response


def public_base(request: web.Request) -> str:
    """``scheme://host[/prefix]`` as the client sees this server."""
    named = request.headers.get(wire.PUBLIC_BASE_HEADER, "").strip().rstrip("/")
    if named and wire.valid_public_base(named):
        return named
    scheme = request.scheme if request.scheme in ("http", "https") else "http"
    host = request.host if wire.valid_public_host(request.host) else "localhost"
    return f"{scheme}://{host}"


def render_b64_body(meta: dict[str, Any], images: list[Encoded]) -> bytes:
    """The JSON response for b64_json, splicing the base64 bytes in (they need no escaping)."""
    items = b",".join(b'{"b64_json":"' + (image.b64 or b"") + b'","revised_prompt":null}' for image in images)
    head = json.dumps(meta, separators=(",", ":"))[:-1].encode()
    return head + b',"data":[' + items + b"]}"
