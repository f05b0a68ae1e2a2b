"""HTTP handlers: read the request, parse it, call the image service, render the answer.

Everything else lives elsewhere: field rules in :mod:`imagefleet.schema`, multipart reading in
:mod:`.forms`, support checks, defaults and waiting in :mod:`.service`, rendering in
:mod:`.responses` (streamed answers in :mod:`.streaming`), what the pod reports in :mod:`.reports`.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from imagefleet import openapi
from imagefleet.errors import NotFound
from imagefleet.httpkit import json_response, read_json, require_content_type
from imagefleet.inference_pod import faults, forms, reports, responses, streaming
from imagefleet.inference_pod.phase import PodPhase
from imagefleet.inference_pod.service import Gone
from imagefleet.inference_pod.state import METRICS, RUNTIME, Serving
from imagefleet.schema import parse_edit, parse_generation


async def generations(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    body = await read_json(request)
    service = rt.service()
    req = parse_generation(body, service.limits)
    if req.stream:
        accepted = await service.accept_generate(req)
        return await streaming.respond(request, service, accepted, client_gone(request))
    result = await service.generate(req, client_gone(request))
    return await responses.images_response(request, result, rt.files, rt.cpu)


async def edits(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    require_content_type(request, "multipart/form-data")
    fields, files = await forms.read_form(request)
    service = rt.service()
    req, uploads = parse_edit(fields, files, service.limits)
    if req.stream:
        accepted = await service.accept_edit(req, uploads)
        return await streaming.respond(request, service, accepted, client_gone(request))
    result = await service.edit(req, uploads, client_gone(request))
    return await responses.images_response(request, result, rt.files, rt.cpu)


def client_gone(request: web.Request) -> Gone:
    def gone() -> bool:
        transport = request.transport
        return transport is None or transport.is_closing()

    return gone


async def get_file(request: web.Request) -> web.Response:
    file_id = request.match_info["file_id"]
    image = request.app[RUNTIME].files.get(file_id)
    if image is None:
        raise NotFound(f"No image '{file_id[:80]}' here: it expired or never existed.", param="file_id")
    return web.Response(
        body=image.data, content_type=image.content_type, headers={"Cache-Control": "private, max-age=3600"}
    )


async def list_models(request: web.Request) -> web.Response:
    return json_response({"object": "list", "data": [reports.model_entry(request.app[RUNTIME])]})


async def get_model(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    model_id = request.match_info["model_id"]
    if model_id != rt.settings.model:
        raise NotFound(
            f"The model '{model_id[:200]}' is not served here; this server serves '{rt.settings.model}'.",
            param="model",
            code="model_not_found",
        )
    return json_response(reports.model_entry(rt))


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers, and its GPU is not hung (:class:`.health.StallWatch`)."""
    if request.app[RUNTIME].phase() is PodPhase.STALLED:
        return json_response({"status": "stalled"}, status=503)
    return json_response({"status": "ok"})


async def description(request: web.Request) -> web.Response:
    """The OpenAPI description, with this pod's limits once it serves (the widest bounds before)."""
    status = request.app[RUNTIME].status
    return json_response(openapi.document("pod", status.limits if isinstance(status, Serving) else None))


async def readyz(request: web.Request) -> web.Response:
    phase = request.app[RUNTIME].phase()
    if phase is PodPhase.SERVING:
        return json_response({"status": "ready"})
    return json_response({"status": "not_ready", "reason": phase.value}, status=503)


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def stats(request: web.Request) -> web.Response:
    return json_response(reports.pod_stats(request.app[RUNTIME]))


async def load(request: web.Request) -> web.Response:
    return json_response(reports.load_report(request.app[RUNTIME]).to_json())


# --- the fault-injection hook's routes (registered only when it is on) ---


async def batches(request: web.Request) -> web.Response:
    status = request.app[RUNTIME].status
    recent = status.scheduler.batch_log() if isinstance(status, Serving) else []
    return json_response({"object": "list", "data": recent})


async def arm_faults(request: web.Request) -> web.Response:
    plan = request.app[RUNTIME].faults
    if plan is None:
        raise NotFound("Fault injection is off (start the pod with --fault-injection).")
    return json_response(faults.arm_from_json(plan, await read_json(request)))
