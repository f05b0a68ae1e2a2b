"""aiohttp pieces shared by the pod and the router: serving an app, the error middleware, JSON.

Every error leaves in OpenAI's envelope with the right status, whether a handler raised an
:class:`~imagefleet.errors.APIError`, aiohttp raised an ``HTTPException`` (unknown route, wrong
method, body too large), a body could not be decoded (``Content-Encoding`` that does not match
the bytes: 400), or a bug raised anything else (500, generic message, traceback logged).
Requests aiohttp cannot parse at all are answered by :mod:`imagefleet.edge`.

Request bodies are read with :func:`read_body` (or piece by piece, a multipart form, inside
:func:`arriving`, each total passed to :func:`hold`): a declared ``Content-Length`` above the limit is
a 413 before any byte is read (:func:`edge_middleware`, for every route), a body that stops
arriving for ``body_timeout_s`` is a 408, and the bytes every request in flight holds count
against one budget per server (``max_buffered_bytes``; 503 with Retry-After beyond it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from imagefleet.edge import EdgeLimits, EdgeRunner, EdgeState, rate_limit_accept_errors
from imagefleet.errors import (
    APIError,
    GenerationFailed,
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
    Unavailable,
    UnsupportedMediaType,
    from_status,
)
from imagefleet.settings import HttpServerSettings

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

EDGE = web.AppKey("edge", EdgeState)
"""The app's connection and body limits and their shared state (see :func:`setup_edge`)."""
_RESERVED = web.RequestKey("body_reserved", int)
ERROR_MARK = web.ResponseKey("error_answer", bool)
"""Set on a response the error middleware made (so a counting middleware can tell who answered)."""
BUFFERED_RETRY_AFTER_S = 1.0
_CLOSE_AFTER = frozenset((408, 413))
"""Statuses answered before the body was read: the connection is closed after them."""


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json.dumps(data, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error_response(error: APIError) -> web.Response:
    response = json_response(error.envelope(), status=error.status, headers=error.headers or None)
    response[ERROR_MARK] = True
    if error.status in _CLOSE_AFTER:
        response.force_close()
    return response


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
    except RequestPayloadError as exc:  # e.g. Content-Encoding: gzip on bytes that are not gzip
        response = error_response(
            InvalidRequest(f"The request body could not be read: {_payload_error(exc)}.")
        )
        response.force_close()  # the rest of the body cannot be read either
        return response
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("Unhandled error on %s %s", request.method, request.path)
        return error_response(GenerationFailed("Internal server error.", code="internal_error"))


def _payload_error(exc: BaseException) -> str:
    """aiohttp's payload error without the bytes it may quote: its first line, shortened."""
    text = str(exc).replace("400, message:", "").strip().splitlines()
    return (text[0].strip() if text else type(exc).__name__)[:120]


def setup_edge(app: web.Application, settings: HttpServerSettings, max_body_bytes: int) -> EdgeState:
    """Give ``app`` its connection and body limits (read by :func:`serve` and :func:`read_body`)."""
    state = EdgeState(EdgeLimits.from_settings(settings, max_body_bytes))
    app[EDGE] = state
    return state


def edge_state(app: web.Application) -> EdgeState:
    """The app's limits; an app that was given none gets the settings' defaults."""
    state = app.get(EDGE)
    if state is None:
        state = EdgeState(EdgeLimits.from_settings(HttpServerSettings(), app._client_max_size))
        if not app.frozen:
            app[EDGE] = state
    return state


@web.middleware
async def edge_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """413 for a declared body above the limit, before reading it; the body budget released after."""
    state = edge_state(request.app)
    declared = request.content_length
    if declared is not None and declared > state.limits.max_body_bytes:
        raise PayloadTooLarge(
            f"The request body ({declared} bytes) exceeds the limit of {state.limits.max_body_bytes} bytes.",
            code="body_too_large",
        )
    try:
        return await handler(request)
    finally:
        state.release(request.get(_RESERVED, 0))


async def read_body(request: web.Request) -> bytes:
    """The whole body, within the size limit, the inactivity timeout and the shared budget."""
    hold(request, request.content_length or 0)
    chunks: list[bytes] = []
    total = 0
    while True:
        async with arriving(request):
            chunk = await request.content.readany()
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        hold(request, total)
        chunks.append(chunk)


@contextlib.asynccontextmanager
async def arriving(request: web.Request) -> AsyncIterator[None]:
    """Around a read of the body: 408 (``body_timeout``) when nothing arrives for the limit."""
    state = edge_state(request.app)
    timeout = state.limits.body_timeout_s
    try:
        async with asyncio.timeout(timeout):
            yield
    except TimeoutError:
        state.count("body_timeout")
        raise RequestTimeout(
            f"The request body stopped arriving for {timeout:g} s.", code="body_timeout"
        ) from None


def hold(request: web.Request, total: int) -> None:
    """``total`` bytes of this request's body read (or declared) so far: 413 past the size limit,
    and held against the server's shared budget (503 ``server_busy`` when it is spent) until the
    request ends."""
    state = edge_state(request.app)
    if total > state.limits.max_body_bytes:
        raise PayloadTooLarge(f"The request body exceeds the limit of {state.limits.max_body_bytes} bytes.")
    more = total - request.get(_RESERVED, 0)
    if more > 0:
        _reserve(request, state, more)


def _reserve(request: web.Request, state: EdgeState, nbytes: int) -> None:
    if not state.reserve(nbytes):
        state.count("buffer_full")
        raise Unavailable(
            "The server holds as many request bodies as it may; retry shortly.",
            retry_after=BUFFERED_RETRY_AFTER_S,
            code="server_busy",
        )
    request[_RESERVED] = request.get(_RESERVED, 0) + nbytes


def require_content_type(request: web.Request, *allowed: str) -> None:
    if request.content_type not in allowed:
        raise UnsupportedMediaType(
            f"Content-Type must be {' or '.join(allowed)}, got {request.content_type or 'none'!r}."
        )


async def read_json(request: web.Request) -> Any:
    """The body as JSON; 415 for another content type, 400 for bad JSON, 413 when too large."""
    require_content_type(request, "application/json")
    raw = await read_body(request)
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidRequest(f"The body is not valid JSON: {exc}.") from None
    except ValueError:  # an integer past Python's limit on digits (sys.get_int_max_str_digits)
        raise InvalidRequest("The body holds an integer with too many digits to read.") from None


async def serve(app: web.Application, host: str, port: int, *, shutdown_timeout: float) -> web.AppRunner:
    """Start ``app`` listening on ``host:port``; the caller awaits ``runner.cleanup()`` to stop.

    The one way the pod, the router, local mode and the tests start an aiohttp app: handler
    cancellation on (a client that leaves cancels its handler), no access log, the time
    handlers in flight get when the app stops (``shutdown_timeout``, seconds) set on the runner,
    and the app's connection limits (:mod:`imagefleet.edge`; accept errors rate-limited in the
    log). A port that is taken raises OSError from here, before anything is served.
    """
    state = edge_state(app)
    rate_limit_accept_errors(asyncio.get_running_loop(), state.errors)
    runner = EdgeRunner(
        app, edge=state, handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
