"""The connection level of the pod's and the router's HTTP servers: timeouts, caps, parse errors.

aiohttp runs one :class:`~aiohttp.web_protocol.RequestHandler` per connection. Out of the box it
keeps a connection that sends half a request line open for its keep-alive time (an hour), serves
any number of connections, and answers a request it cannot parse in plain text that echoes the
raw bytes it received (an ``Authorization`` header included), logging the same bytes at ERROR.
:class:`EdgeProtocol` changes that, and nothing else:

* **header timeout** -- a connection must deliver a request's headers within
  ``header_timeout_s`` of its first byte (or of the connection opening); otherwise it is closed;
* **keep-alive idle** -- aiohttp's own keep-alive timer, set to ``keepalive_timeout_s``;
* **connection cap** -- beyond ``max_connections`` open connections, a new connection's request
  is answered 503 (OpenAI's envelope, ``Retry-After``) and the connection closed, so the ones
  already open keep being served;
* **parse errors** -- answered in OpenAI's envelope with a fixed message per kind of error (431
  for a line or header block too large, 400 otherwise), never with the received bytes, and
  logged by kind and peer address only, at most a few lines per interval (:class:`RateLimitedLog`).

Body limits (size, inactivity, bytes held across all requests) apply where a handler reads a
body, in :mod:`imagefleet.httpkit`; their shared state is :class:`EdgeState`, one per app.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from imagefleet.errors import (
    APIError,
    GenerationFailed,
    HeadersTooLarge,
    InvalidRequest,
    Timeout,
    Unavailable,
)

log = logging.getLogger(__name__)

OVER_CAP_RETRY_AFTER_S = 1.0


@dataclass(frozen=True)
class EdgeLimits:
    """The limits of one server, from its settings (:class:`imagefleet.settings.HttpServerSettings`)."""

    header_timeout_s: float
    body_timeout_s: float
    keepalive_timeout_s: float
    max_connections: int
    max_body_bytes: int
    max_buffered_bytes: int

    @classmethod
    def from_settings(cls, settings: Any, max_body_bytes: int) -> EdgeLimits:
        return cls(
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            keepalive_timeout_s=settings.keepalive_timeout_s,
            max_connections=settings.max_connections,
            max_body_bytes=max_body_bytes,
            max_buffered_bytes=settings.max_buffered_bytes,
        )


class RateLimitedLog:
    """At most ``burst`` lines per ``interval_s`` for each kind of message; the rest are counted
    and reported in one line when the next interval begins."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = 5,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.burst = burst
        self.interval_s = interval_s
        self._clock = clock
        self._windows: dict[str, list[float]] = {}
        """kind -> [window start, lines logged in it, lines suppressed in it]."""

    def log(self, level: int, kind: str, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless ``kind`` has used up its lines; True if it was logged."""
        now = self._clock()
        window = self._windows.get(kind)
        if window is None or now - window[0] >= self.interval_s:
            if window is not None and window[2]:
                self.logger.log(
                    level,
                    "%d more '%s' message(s) suppressed in the last %.0f s",
                    int(window[2]),
                    kind,
                    now - window[0],
                )
            window = self._windows[kind] = [now, 0, 0]
        if window[1] >= self.burst:
            window[2] += 1
            return False
        window[1] += 1
        self.logger.log(level, msg, *args)
        return True


@dataclass
class EdgeState:
    """One server's limits and the state they share across connections and requests."""

    limits: EdgeLimits
    connections: int = 0
    buffered: int = 0
    """Bytes of request bodies reserved by requests in flight (see :func:`imagefleet.httpkit.read_body`)."""
    errors: RateLimitedLog = field(default_factory=lambda: RateLimitedLog(log))
    refused: dict[str, int] = field(default_factory=dict)
    """Requests answered at the connection level, by kind (parse errors, over the cap, timeouts)."""

    def count(self, kind: str) -> None:
        self.refused[kind] = self.refused.get(kind, 0) + 1

    def reserve(self, nbytes: int) -> bool:
        """Hold ``nbytes`` of the shared body budget; False (nothing held) when it has no room."""
        if nbytes <= 0:
            return True
        if self.buffered + nbytes > self.limits.max_buffered_bytes:
            return False
        self.buffered += nbytes
        return True

    def release(self, nbytes: int) -> None:
        self.buffered = max(0, self.buffered - nbytes)


# --- parse errors --------------------------------------------------------------------------


def parse_error(exc: BaseException | None, status: int) -> tuple[str, APIError]:
    """(kind for logs and counts, the client's answer) for an error aiohttp met outside handlers.

    Messages are fixed per kind: aiohttp's own messages quote the received bytes.
    """
    if isinstance(exc, http_exceptions.LineTooLong):
        return "line_too_long", HeadersTooLarge(
            "The request line or a header is too long.", code="request_header_too_large"
        )
    if isinstance(exc, http_exceptions.BadHttpMethod):
        return "bad_method", InvalidRequest("The request method is not valid.", code="bad_http_request")
    if isinstance(exc, http_exceptions.BadStatusLine):
        return "bad_request_line", InvalidRequest(
            "The request line is not valid HTTP.", code="bad_http_request"
        )
    if isinstance(exc, http_exceptions.InvalidURLError):
        return "bad_url", InvalidRequest("The request target is not a valid URL.", code="bad_http_request")
    if isinstance(exc, http_exceptions.InvalidHeader):
        return "bad_header", InvalidRequest("A request header is malformed.", code="bad_http_request")
    if isinstance(exc, http_exceptions.PayloadEncodingError):
        return "bad_body_framing", InvalidRequest(
            "The request body's framing or encoding is invalid.", code="bad_http_request"
        )
    if isinstance(exc, http_exceptions.BadHttpMessage) and "Too many headers" in str(exc):
        return "too_many_headers", HeadersTooLarge(
            "The request has too many headers.", code="request_header_too_large"
        )
    if isinstance(exc, http_exceptions.HttpProcessingError) or 400 <= status < 500:
        return "bad_request", InvalidRequest("The request is not valid HTTP.", code="bad_http_request")
    if status == 504:
        return "handler_timeout", Timeout("The request did not complete in time.", code="timeout")
    return "internal_error", GenerationFailed("Internal server error.", code="internal_error")


def envelope_response(error: APIError) -> web.Response:
    """The error in OpenAI's envelope, closing the connection after it."""
    resp = web.Response(
        body=json.dumps(error.envelope(), separators=(",", ":")).encode(),
        status=error.status,
        content_type="application/json",
        headers=error.headers or None,
    )
    resp.force_close()
    return resp


# --- the protocol --------------------------------------------------------------------------


class EdgeProtocol(RequestHandler):
    """aiohttp's per-connection handler with the limits above (see the module docstring)."""

    __slots__ = ("_counted", "_edge", "_header_timer")

    def __init__(self, manager: web.Server, *, edge: EdgeState, **kwargs: Any) -> None:
        super().__init__(manager, keepalive_timeout=edge.limits.keepalive_timeout_s, **kwargs)
        self._edge = edge
        self._header_timer: asyncio.TimerHandle | None = None
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        edge = self._edge
        edge.connections += 1
        self._counted = True
        if edge.connections > edge.limits.max_connections:
            self._request_handler = self._over_cap
        self._arm_header_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._counted:
            self._counted = False
            self._edge.connections -= 1
        self._disarm_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        if data and self._header_timer is None and waiter is not None and not waiter.done():
            self._arm_header_timer()  # the first byte of the next request on a kept-alive connection
        super().data_received(data)
        if self._header_timer is not None and (self._messages or (waiter is not None and waiter.done())):
            self._disarm_header_timer()

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self._loop.call_later(self._edge.limits.header_timeout_s, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self._messages or self._request_in_progress or self.transport is None:
            return
        self._edge.count("header_timeout")
        peer = self.peername
        self._edge.errors.log(
            logging.INFO, "header_timeout", "Closed a connection from %s: no complete request headers", peer
        )
        self.force_close()

    async def _over_cap(self, request: web.BaseRequest) -> web.StreamResponse:
        self._edge.count("over_connection_cap")
        self._edge.errors.log(
            logging.WARNING,
            "over_connection_cap",
            "Refused a request from %s: %d connections open (max_connections %d)",
            request.remote,
            self._edge.connections,
            self._edge.limits.max_connections,
        )
        return envelope_response(
            Unavailable(
                "The server has too many open connections; retry shortly.",
                retry_after=OVER_CAP_RETRY_AFTER_S,
                code="too_many_connections",
            )
        )

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """aiohttp's own error reports: a body that could not be read is the client's doing (no
        traceback, rate-limited); anything else is logged as aiohttp would."""
        exc = kw.get("exc_info")
        if isinstance(exc, (RequestPayloadError, http_exceptions.HttpProcessingError)):
            self._edge.errors.log(
                logging.INFO,
                "bad_body",
                "Unreadable request body from %s: %s",
                self.peername,
                type(exc).__name__,
            )
            return
        super().log_exception(*args, **kw)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Answer in OpenAI's envelope; log the kind of error and the peer, never the bytes."""
        if request.writer.output_size > 0:
            raise ConnectionError("Response is sent already, cannot send another response")
        kind, error = parse_error(exc, status)
        self._edge.count(kind)
        level = logging.ERROR if kind == "internal_error" else logging.INFO
        self._edge.errors.log(level, kind, "Bad request from %s: %s", request.remote, kind)
        return envelope_response(error)


class EdgeServer(web.Server):
    """aiohttp's low-level server, making :class:`EdgeProtocol` connections."""

    def __init__(self, handler: Any, *, edge: EdgeState, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.edge = edge

    def __call__(self) -> RequestHandler:
        return EdgeProtocol(self, edge=self.edge, loop=self._loop, **self._kwargs)


class EdgeRunner(web.AppRunner):
    """:class:`aiohttp.web.AppRunner` serving through :class:`EdgeServer`."""

    def __init__(self, app: web.Application, *, edge: EdgeState, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._edge = edge

    async def _make_server(self) -> web.Server:
        base = await super()._make_server()
        return EdgeServer(
            base.request_handler,
            request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation,
            loop=asyncio.get_running_loop(),
            edge=self._edge,
            **base._kwargs,
        )


# --- accept errors -------------------------------------------------------------------------

ACCEPT_ERROR = "socket.accept() out of system resource"


def rate_limit_accept_errors(loop: asyncio.AbstractEventLoop, errors: RateLimitedLog) -> None:
    """Route the loop's accept errors (file descriptors or memory exhausted) through ``errors``.

    asyncio reports each failed ``accept()`` to the loop's exception handler, with a traceback;
    with the descriptor limit reached that is a flood. Other reports go where they went before.
    Installing twice on one loop is a no-op.
    """
    previous = loop.get_exception_handler()
    if getattr(previous, "imagefleet_accept_filter", False):
        return

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") == ACCEPT_ERROR:
            exc = context.get("exception")
            errors.log(logging.WARNING, "accept_error", "accept() failed: %s", exc)
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    handler.imagefleet_accept_filter = True  # type: ignore[attr-defined]
    loop.set_exception_handler(handler)
