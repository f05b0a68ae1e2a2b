"""HTTP handlers: thin translations between aiohttp and the scheduler."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from imagefleet.errors import ClientClosed, InvalidRequest, NotFound, PayloadTooLarge
from imagefleet.httpkit import FILE_PREFIX_HEADER, json_response, read_json, require_content_type
from imagefleet.inference_pod import uploads
from imagefleet.inference_pod.encoding import Encoded
from imagefleet.inference_pod.files import valid_prefix
from imagefleet.inference_pod.scheduler import Job, Scheduler
from imagefleet.inference_pod.state import RUNTIME, PodRuntime
from imagefleet.inference_pod.stats import pod_stats
from imagefleet.schema import (
    EDIT_FIELDS,
    EDIT_FILE_FIELDS,
    ImageRequest,
    check_size,
    parse_edit,
    parse_generation,
)

DISCONNECT_POLL_S = 0.1
UPLOAD_PIXEL_FACTOR = 4  # uploads may be this many times larger than the largest output
_HOST_OK = re.compile(r"^[A-Za-z0-9.\-:\[\]]{1,255}$")


async def generations(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    started = time.monotonic()
    body = await read_json(request)
    _model, scheduler, limits = rt.serving()
    req = parse_generation(body, limits)
    _check_model_support(req, rt)
    req = _with_defaults(req, rt)
    job = scheduler.submit(req)
    images = await wait_for_job(request, scheduler, job)
    response = await _images_response(request, rt, req, images)
    rt.metrics.request_seconds.labels("generations").observe(time.monotonic() - started)
    return response


async def edits(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    started = time.monotonic()
    require_content_type(request, "multipart/form-data")
    fields, files = await _read_form(request)
    _model, scheduler, limits = rt.serving()
    req = parse_edit(fields, limits)
    _check_model_support(req, rt)
    images = files.get("image", []) + files.get("image[]", [])
    if not images:
        raise InvalidRequest("image is required: upload the image to edit as a file field.", param="image")
    if len(images) > 1:
        raise InvalidRequest("This model edits one image per request; send a single image.", param="image")
    masks = files.get("mask", [])
    if len(masks) > 1:
        raise InvalidRequest("Send at most one mask.", param="mask")
    size = (req.width, req.height) if req.width and req.height else None
    loop = asyncio.get_running_loop()
    image, mask, original = await loop.run_in_executor(
        rt.cpu,
        uploads.prepare,
        images[0],
        masks[0] if masks else None,
        size,
        UPLOAD_PIXEL_FACTOR * rt.settings.max_pixels,
    )
    if size is None:
        try:
            check_size(original[0], original[1], limits)
        except InvalidRequest as exc:
            raise InvalidRequest(f"{exc.message} Pass `size` to resize the image.", param="image") from None
        req = dataclasses.replace(req, width=original[0], height=original[1])
    req = _with_defaults(req, rt)
    job = scheduler.submit(req, images=[image], mask=mask)
    outputs = await wait_for_job(request, scheduler, job)
    response = await _images_response(request, rt, req, outputs)
    rt.metrics.request_seconds.labels("edits").observe(time.monotonic() - started)
    return response


async def get_file(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    file_id = request.match_info["file_id"]
    image = rt.files.get(file_id)
    if image is None:
        raise NotFound(f"No image '{file_id[:80]}' here: it expired or never existed.", param="file_id")
    return web.Response(
        body=image.data, content_type=image.content_type, headers={"Cache-Control": "private, max-age=3600"}
    )


async def list_models(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    entry: dict[str, Any] = {
        "id": rt.settings.model,
        "object": "model",
        "created": int(rt.started_at),
        "owned_by": "imagefleet",
    }
    if rt.model is not None:
        info = rt.model.info
        entry.update(
            random_weights=info.random_weights,
            family=info.family,
            source=info.source,
            default_size=f"{info.default_width}x{info.default_height}",
            default_steps=info.default_steps,
            default_guidance_scale=info.default_guidance,
            size_multiple=info.size_multiple,
        )
    return json_response({"object": "list", "data": [entry]})


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    if rt.ready:
        return json_response({"status": "ready"})
    s = rt.scheduler
    reason = (
        "load_failed"
        if rt.load_error
        else "loading"
        if s is None or not s.ready
        else "quarantined"
        if s.health.quarantined
        else "draining"
    )
    return json_response({"status": "not_ready", "reason": reason}, status=503)


async def metrics(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    body = generate_latest(rt.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def stats(request: web.Request) -> web.Response:
    return json_response(pod_stats(request.app[RUNTIME]))


async def load(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    if rt.scheduler is None or rt.limits is None:
        return json_response({"model": rt.settings.model, "ready": False, "quarantined": False})
    return json_response(rt.scheduler.load_report(rt.limits.to_json()).to_json())


async def batches(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    recent = list(rt.scheduler.recent) if rt.scheduler else []
    return json_response({"object": "list", "data": recent})


async def arm_faults(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    if rt.faults is None:
        raise NotFound("Fault injection is off (start the pod with --fault-injection).")
    body = await read_json(request)
    if not isinstance(body, dict):
        raise InvalidRequest("Expected a JSON object.")
    kind, count, min_batch = body.get("kind", "runtime"), body.get("count", 1), body.get("min_batch", 1)
    seconds = body.get("seconds", 0.0)
    if not isinstance(count, int) or not isinstance(min_batch, int) or count < 0:
        raise InvalidRequest("count and min_batch must be non-negative integers.")
    if not isinstance(seconds, (int, float)) or not 0 <= seconds <= 600:
        raise InvalidRequest("seconds must be a number between 0 and 600.", param="seconds")
    try:
        if count == 0:
            rt.faults.clear()
        else:
            rt.faults.arm(str(kind), count, min_batch, float(seconds))
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="kind") from None
    return json_response({"armed": count, "kind": kind})


# --- helpers ---


async def wait_for_job(request: web.Request, scheduler: Scheduler, job: Job) -> list[Encoded]:
    """Await the job; cancel it if the client disconnects or the handler is cancelled."""
    try:
        while True:
            done, _ = await asyncio.wait({job.future}, timeout=DISCONNECT_POLL_S)
            if done:
                return job.future.result()
            transport = request.transport
            if transport is None or transport.is_closing():
                scheduler.cancel(job, "client disconnected")
                raise ClientClosed("The client disconnected.")
    except asyncio.CancelledError:
        scheduler.cancel(job, "request cancelled")
        raise


def _with_defaults(req: ImageRequest, rt: PodRuntime) -> ImageRequest:
    assert rt.model is not None
    info = rt.model.info
    return req.with_defaults(
        width=info.default_width,
        height=info.default_height,
        steps=info.default_steps,
        guidance=info.default_guidance,
    )


def _check_model_support(req: ImageRequest, rt: PodRuntime) -> None:
    assert rt.model is not None
    if req.negative_prompt is not None and not rt.model.info.supports_negative_prompt:
        raise InvalidRequest("This model does not take a negative_prompt.", param="negative_prompt")


async def _read_form(request: web.Request) -> tuple[dict[str, str], dict[str, list[bytes]]]:
    """Stream the multipart body: text fields and file fields, within the body size limit."""
    limit = request.app[RUNTIME].settings.max_body_bytes
    fields: dict[str, str] = {}
    files: dict[str, list[bytes]] = {}
    total = 0
    try:
        reader = await request.multipart()
        while True:
            part = await reader.next()
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise InvalidRequest("Nested multipart bodies are not supported.")
            name = part.name or ""
            if name not in EDIT_FIELDS and name not in EDIT_FILE_FIELDS:
                raise InvalidRequest(
                    f"Unknown parameter: '{name[:64]}'.", param=name[:64], code="unknown_parameter"
                )
            data = bytearray()
            while chunk := await part.read_chunk(256 * 1024):
                total += len(chunk)
                if total > limit:
                    raise PayloadTooLarge(f"The request body exceeds {limit} bytes.")
                data.extend(chunk)
            if name in EDIT_FILE_FIELDS:
                files.setdefault(name, []).append(bytes(data))
            else:
                if name in fields:
                    raise InvalidRequest(f"{name} is given twice.", param=name)
                try:
                    fields[name] = data.decode("utf-8")
                except UnicodeDecodeError:
                    raise InvalidRequest(f"{name} is not valid UTF-8 text.", param=name) from None
    except (InvalidRequest, PayloadTooLarge):
        raise
    except (ValueError, AssertionError, RuntimeError, HttpProcessingError) as exc:
        raise InvalidRequest(f"The multipart body is malformed: {str(exc)[:200]}") from None
    return fields, files


def _public_base(request: web.Request) -> str:
    proto = (request.headers.get("X-Forwarded-Proto") or request.scheme).split(",")[0].strip()
    host = (request.headers.get("X-Forwarded-Host") or request.host).split(",")[0].strip()
    if proto not in ("http", "https"):
        proto = request.scheme
    if not _HOST_OK.match(host):
        host = request.host if _HOST_OK.match(request.host) else "localhost"
    prefix = request.headers.get("X-Forwarded-Prefix", "").strip().rstrip("/")
    if prefix and not re.match(r"^/[A-Za-z0-9._~/-]*$", prefix):
        prefix = ""
    return f"{proto}://{host}{prefix}"


async def _images_response(
    request: web.Request, rt: PodRuntime, req: ImageRequest, images: list[Encoded]
) -> web.Response:
    meta = {
        "created": int(time.time()),
        "output_format": req.output_format,
        "size": f"{req.width}x{req.height}",
        "background": "opaque",
        "quality": "auto",
    }
    if req.response_format == "url":
        prefix = request.headers.get(FILE_PREFIX_HEADER, "")
        if not valid_prefix(prefix):
            prefix = ""
        base = _public_base(request)
        urls = [f"{base}/v1/images/files/{rt.files.put(image, prefix)}" for image in images]
        return json_response({**meta, "data": [{"url": url, "revised_prompt": None} for url in urls]})
    # Megabytes of base64: assemble the body on the CPU pool, not on the event loop.
    body = await asyncio.get_running_loop().run_in_executor(rt.cpu, render_b64_body, meta, images)
    return web.Response(body=body, content_type="application/json")


def render_b64_body(meta: dict[str, Any], images: list[Encoded]) -> bytes:
    """The JSON response for b64_json, splicing the base64 bytes in (they need no escaping)."""
    items = b",".join(b'{"b64_json":"' + (image.b64 or b"") + b'","revised_prompt":null}' for image in images)
    head = json.dumps(meta, separators=(",", ":"))[:-1].encode()
    return head + b',"data":[' + items + b"]}"
