"""The pod's route table. ``/debug/*`` exists only with the fault-injection hook on."""

from __future__ import annotations

from aiohttp import web

from imagefleet import openapi, wire
from imagefleet.inference_pod import handlers as h


def setup_routes(app: web.Application, *, debug: bool) -> None:
    r = app.router
    r.add_post("/v1/images/generations", h.generations)
    r.add_post("/v1/images/edits", h.edits)
    r.add_get(wire.FILES_PATH + "{file_id}", h.get_file)
    r.add_get("/v1/models", h.list_models)
    r.add_get("/v1/models/{model_id:.+}", h.get_model)  # Hugging Face ids hold a slash
    r.add_get(wire.LOAD_PATH, h.load)
    r.add_get(openapi.PATH, h.description)
    r.add_get(wire.HEALTH_PATH, h.healthz)
    r.add_get(wire.READY_PATH, h.readyz)
    r.add_get(wire.METRICS_PATH, h.metrics)
    r.add_get(wire.STATS_PATH, h.stats)
    if debug:
        r.add_get("/debug/batches", h.batches)
        r.add_post("/debug/faults", h.arm_faults)
