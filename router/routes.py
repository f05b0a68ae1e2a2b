"""The router's route table."""

from __future__ import annotations

from aiohttp import web

from imagefleet.router import handlers as h


def setup_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/images/generations", h.generations)
    r.add_post("/v1/images/edits", h.edits)
    r.add_get("/v1/images/files/{file_id}", h.get_file)
    r.add_get("/v1/models", h.models)
    r.add_get("/healthz", h.healthz)
    r.add_get("/readyz", h.readyz)
    r.add_get("/metrics", h.metrics)
    r.add_get("/stats", h.stats)
