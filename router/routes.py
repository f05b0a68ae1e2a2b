"""The router's route table."""

from __future__ import annotations

from aiohttp import web

from imagefleet import openapi, wire
from imagefleet.router import handlers as h


def setup_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/images/generations", h.generations, name="generations")
    r.add_post("/v1/images/edits", h.edits, name="edits")
    r.add_get(wire.FILES_PATH + "{file_id}", h.get_file, name="files")
    r.add_get("/v1/models", h.models, name="models")
    r.add_get("/v1/models/{model:.+}", h.model, name="model")  # Hugging Face ids hold a slash
    r.add_get(openapi.PATH, h.description, name="openapi")
    r.add_get(wire.HEALTH_PATH, h.healthz, name="healthz")
    r.add_get(wire.READY_PATH, h.readyz, name="readyz")
    r.add_get(wire.METRICS_PATH, h.metrics, name="metrics")
    r.add_get(wire.STATS_PATH, h.stats, name="stats")
