"""The router's web pages: a playground (``/``) and a fleet page (``/fleet``), plus ``/v1/fleet``.

The pages are plain HTML, CSS and JavaScript shipped in the package (``static/``), read once when
the app is built; no build step, nothing from another origin. They call only the public API
(``/v1/models``, ``/v1/images/generations``, ``/v1/fleet``), so API keys apply to what they do;
the pages themselves are open, so that a browser can load them and then ask for a key.

Every page answer carries a Content-Security-Policy that allows scripts, styles and requests to
this origin only (images also as ``data:`` and ``blob:`` URLs, which is how generated images are
shown) and no framing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from imagefleet.errors import NotFound
from imagefleet.httpkit import json_response
from imagefleet.router.fleet import fleet
from imagefleet.router.generator import GeneratorView
from imagefleet.router.state import RUNTIME
from imagefleet.settings import RouterSettings

STATIC_DIR = Path(__file__).resolve().parent / "static"
ASSETS_PREFIX = "/web/"
FLEET_API_PATH = "/v1/fleet"
PAGES = {"/": "playground.html", "/fleet": "fleet.html"}
GENERATOR = web.AppKey("generator_view", GeneratorView)

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}

CSP = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str


def load_assets(directory: Path = STATIC_DIR) -> dict[str, Asset]:
    """Every servable file of ``directory`` by name (only the known file types)."""
    return {
        path.name: Asset(path.read_bytes(), CONTENT_TYPES[path.suffix])
        for path in sorted(directory.iterdir())
        if path.is_file() and path.suffix in CONTENT_TYPES
    }


def is_page(path: str) -> bool:
    """Whether ``path`` is one of the open web paths (pages and their assets, never the API)."""
    return path in PAGES or path.startswith(ASSETS_PREFIX)


def respond(asset: Asset) -> web.Response:
    return web.Response(body=asset.body, headers={"Content-Type": asset.content_type, **SECURITY_HEADERS})


def setup_web(app: web.Application, settings: RouterSettings) -> None:
    """Mount ``GET /v1/fleet`` and, unless ``--no-web``, the pages and their assets.

    With Kubernetes discovery ``/v1/fleet`` also reports on the router's ImageGenerator.
    """
    app.router.add_get(FLEET_API_PATH, fleet_json)
    if settings.discovery == "kubernetes":
        generator = app[GENERATOR] = GeneratorView(settings.namespace, settings.selector)
        app.on_cleanup.append(lambda _: generator.close())
    if not settings.web:
        return
    assets = load_assets()

    async def page(request: web.Request) -> web.Response:
        return respond(assets[PAGES[request.path]])

    async def asset(request: web.Request) -> web.Response:
        found = assets.get(request.match_info["name"])
        if found is None or found.content_type.startswith("text/html"):
            raise NotFound(f"No file '{request.match_info['name'][:80]}' here.", param=None)
        return respond(found)

    for path in PAGES:
        app.router.add_get(path, page)
    app.router.add_get(ASSETS_PREFIX + "{name}", asset)


async def fleet_json(request: web.Request) -> web.Response:
    view = request.app.get(GENERATOR)
    return json_response(fleet(request.app[RUNTIME], generator=view.current() if view else None))
