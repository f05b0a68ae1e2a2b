"""aiohttp pieces shared by the pod and the router: serving an app, the error middleware, JSON.

Every error leaves in OpenAI's envelope with the right status, whether a handler raised an
:class:`~imagefleet.errors.APIError`, aiohttp raised an ``HTTPException`` (unknown route, wrong
method, body too large), or a bug raised anything else (500, generic message, traceback logged).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from imagefleet.errors import APIError, GenerationFailed, InvalidRequest, UnsupportedMediaType, from_status

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json.dumps(data, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error_response(error: APIError) -> web.Response:
    return json_response(error.envelope(), status=error.status, headers=error.headers or None)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except APIError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        return error_response(from_status(exc.status, message))
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("Unhandled error on %s %s", request.method, request.path)
        return error_response(GenerationFailed("Internal server error.", code="internal_error"))


def require_content_type(request: web.Request, *allowed: str) -> None:
    if request.content_type not in allowed:
        raise UnsupportedMediaType(
            f"Content-Type must be {' or '.join(allowed)}, got {request.content_type or 'none'!r}."
        )


async def read_json(request: web.Request) -> Any:
    """The body as JSON; 415 for another content type, 400 for bad JSON, 413 when too large."""
    require_content_type(request, "application/json")
    raw = await request.read()
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidRequest(f"The body is not valid JSON: {exc}.") from None
    except ValueError:  # an integer past Python's limit on digits (sys.get_int_max_str_digits)
        raise InvalidRequest("The body holds an integer with too many digits to read.") from None


async def serve(app: web.Application, host: str, port: int, *, shutdown_timeout: float) -> web.AppRunner:
    """Start ``app`` listening on ``host:port``; the caller awaits ``runner.cleanup()`` to stop.

    The one way the pod, the router, local mode and the tests start an aiohttp app: handler
    cancellation on (a client that leaves cancels its handler), no access log, and the time
    handlers in flight get when the app stops (``shutdown_timeout``, seconds) set on the runner.
    A port that is taken raises OSError from here, before anything is served.
    """
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
