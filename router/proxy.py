"""Sending one request to a pod, and to another one when the first cannot take it.

The request body is read once and kept, so every attempt sends the same bytes; nothing a client
sent is lost because one pod died. An attempt ends in one of four ways:

* **unreachable** -- connection refused, reset or closed before the response began: the pod may
  be dead. Counts against the backend's health and against ``max_attempts``; try another pod.
* **503** -- the pod is draining, quarantined or loading. Marked not accepting until its next
  report; counts against ``max_attempts``; try another pod.
* **429** -- the pod's queue is full. Try every other pod once (a full pod answers at once, so
  this is cheap and not bounded by ``max_attempts``); if none has room, the client gets the 429
  with the smallest Retry-After seen.
* **anything else** -- the pod's answer, streamed to the client as it arrives (2xx, and also 4xx
  and 5xx: a request the pod rejects would be rejected by every pod). A streamed image
  (``stream: true``, server-sent events without a length) is relayed chunk by chunk as the pod
  writes it, never gathered first (see below for when it is retried).
* **ejected** -- the pod was ejected (its load reports stopped) while this request waited for its
  answer, e.g. a hung pod: the connection is closed (the pod, if it ever wakes, takes that as a
  cancellation) and the request goes to another pod, like an unreachable one.

A streamed answer (200, ``text/event-stream``) begins as soon as the pod has queued the request,
with comment lines only (the queue position, :mod:`imagefleet.sse`); they are relayed as they
come. Until the first event (a ``data:`` line) the client has seen nothing but comments, so a
stream that fails before it -- cut off (the pod died or reset the connection) or an ``error``
event of status 503 (the request failed while queued or in its first step: shutdown,
quarantine, a device error) -- is **retried on another pod** into the same client response,
counting against ``max_attempts`` like an unreachable pod. An error event of another status
(the request's own failure, which would recur elsewhere) is relayed, as a plain 500 would be. Once
an event other than an error has begun, the rest is relayed chunk by chunk and never retried; a
pod that breaks off then cuts the client's answer short. When no pod is left to try, the client
gets an ``error`` event: the last pod's own, or the router's 503 envelope.

``request_timeout_s`` bounds the whole exchange; past it the client gets 504 in OpenAI's
envelope and the upstream connection is closed, which the pod takes as a cancellation. A client
that disconnects cancels the handler (aiohttp's handler cancellation), which closes the upstream
connection the same way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from imagefleet import sse
from imagefleet.errors import APIError, BadGateway, Timeout, Unavailable, error_envelope
from imagefleet.httpkit import ERROR_MARK
from imagefleet.router import telemetry as t
from imagefleet.router.cost import Shape
from imagefleet.router.loadview import BackendView
from imagefleet.router.poller import describe_error
from imagefleet.router.publicurl import forwarded_for, public_base
from imagefleet.router.state import RouterRuntime
from imagefleet.wire import FILE_PREFIX_HEADER, PUBLIC_BASE_HEADER, file_prefix

log = logging.getLogger(__name__)

NO_BACKEND_RETRY_AFTER_S = 1.0
BUFFER_LIMIT = 256 * 1024
"""Pod answers up to this size are read whole and sent in one piece; larger ones are streamed."""
CHUNK = 64 * 1024
PASSED_RESPONSE_HEADERS = (
    "Content-Type",
    "Content-Encoding",
    "Retry-After",
    "Cache-Control",
    "ETag",
    "Last-Modified",
    "X-Accel-Buffering",
)


@dataclass(frozen=True)
class Outbound:
    """What to send: the same for every attempt."""

    method: str
    path: str
    body: bytes | None
    content_type: str | None
    shape: Shape
    endpoint: str
    rewrite: Callable[[bytes], bytes] | None = None
    """Applied to a 200 answer's body before it is relayed (signing image URLs); read whole then."""


@dataclass(frozen=True)
class Buffered:
    """A short pod answer already read (a 429 to pass on)."""

    status: int
    body: bytes
    headers: dict[str, str]

    @property
    def retry_after(self) -> float:
        try:
            return float(self.headers.get("Retry-After", "inf"))
        except ValueError:
            return float("inf")


@dataclass
class Upstream:
    view: BackendView
    token: int
    response: aiohttp.ClientResponse


@dataclass
class Attempt:
    """The backend being waited on, so a time-out or hang-up is counted against it, and the
    answer being relayed (closed when the exchange ends)."""

    view: BackendView | None = None
    upstream: Upstream | None = None


@dataclass
class Tries:
    """The attempts of one request so far (shared by every retry of a stream)."""

    tried: set[str] = field(default_factory=set)
    failures: int = 0
    retry_reason: str | None = None


@dataclass(frozen=True)
class StreamFailed:
    """A streamed answer that ended before its first event: ``error`` holds the pod's error event
    (its bytes), or None when the stream was cut off."""

    error: bytes | None


class BackendEjected(Exception):
    """The backend was ejected while a request waited on it."""


async def unless_ejected(
    view: BackendView, pending: Awaitable[aiohttp.ClientResponse]
) -> aiohttp.ClientResponse:
    """``pending``'s result, or :class:`BackendEjected` (``pending`` cancelled) if ``view`` is ejected first."""
    loop = asyncio.get_running_loop()
    ejected: asyncio.Future[None] = loop.create_future()
    view.ejection_waiters.add(ejected)
    task = asyncio.ensure_future(pending)
    try:
        await asyncio.wait((task, ejected), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        _abandon(task)
        raise
    finally:
        view.ejection_waiters.discard(ejected)
    if task.done():
        return task.result()
    _abandon(task)
    raise BackendEjected


def _abandon(task: asyncio.Future[aiohttp.ClientResponse]) -> None:
    """Cancel a request nobody waits for any more; close its response should one still arrive."""

    def close(done: asyncio.Future[aiohttp.ClientResponse]) -> None:
        if not done.cancelled() and done.exception() is None:
            done.result().close()

    task.add_done_callback(close)
    task.cancel()


async def forward(rt: RouterRuntime, request: web.Request, out: Outbound) -> web.StreamResponse:
    """Send ``out`` to the best pod (retrying elsewhere as above) and relay the answer."""
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + rt.settings.request_timeout_s
    reply = web.StreamResponse()
    attempt = Attempt()
    tries = Tries()
    try:
        async with asyncio.timeout_at(deadline):
            sent = await _send(rt, request, out, attempt, tries)
            if isinstance(sent, Buffered):  # every pod was full: the router's own 429
                answer = web.Response(body=sent.body, status=sent.status, headers=sent.headers)
                answer[ERROR_MARK] = True
                return answer
            attempt.upstream = sent
            attempt.view = sent.view
            if _is_event_stream(sent.response):
                return await _relay_events(rt, request, out, attempt, tries, reply)
            return await _relay(request, sent, reply, out.rewrite)
    except TimeoutError:
        if attempt.view is not None:
            rt.metrics.requests.labels(attempt.view.name, t.TIMEOUT).inc()
        if reply.prepared:  # too late for a 504: cut the answer short
            _abort(request)
            return reply
        raise Timeout(
            f"The request did not complete within {rt.settings.request_timeout_s:g} s.", code="timeout"
        ) from None
    except asyncio.CancelledError:
        if attempt.view is not None:
            rt.metrics.requests.labels(attempt.view.name, t.CANCELLED).inc()
        raise
    finally:
        if attempt.upstream is not None:
            attempt.upstream.response.close()
            rt.view.end(attempt.upstream.view, attempt.upstream.token)
        rt.metrics.request_seconds.labels(out.endpoint).observe(time.monotonic() - started)


async def _send(
    rt: RouterRuntime, request: web.Request, out: Outbound, attempt: Attempt, tries: Tries
) -> Upstream | Buffered:
    tried = tries.tried
    full: list[Buffered] = []
    while tries.failures < rt.settings.max_attempts:
        view = pick(rt, out.shape, tried)
        if view is None:
            break
        if tries.retry_reason is not None:
            rt.metrics.retries.labels(tries.retry_reason).inc()
        tried.add(view.name)
        token = rt.view.begin(view, out.shape, time.monotonic())
        attempt.view = view
        try:
            response = await unless_ejected(
                view,
                rt.client.request(
                    out.method,
                    view.backend.url + out.path,
                    data=out.body,
                    headers=_headers(rt, request, view, out),
                ),
            )
        except aiohttp.ClientError as exc:
            attempt.view = None
            rt.view.end(view, token)
            rt.metrics.requests.labels(view.name, t.UNREACHABLE).inc()
            rt.view.failed(view, time.monotonic(), f"request failed: {describe_error(exc)}")
            tries.failures += 1
            tries.retry_reason = t.RETRY_UNREACHABLE
            continue
        except BackendEjected:
            attempt.view = None
            rt.view.end(view, token)
            rt.metrics.requests.labels(view.name, t.EJECTED).inc()
            tries.failures += 1
            tries.retry_reason = t.RETRY_EJECTED
            continue
        except BaseException:
            rt.view.end(view, token)
            raise
        attempt.view = None
        status = response.status
        if status not in (429, 503):
            rt.metrics.requests.labels(view.name, t.outcome_of(status)).inc()
            return Upstream(view, token, response)
        try:
            answer = Buffered(status, await response.read(), _passed_headers(response))
        except aiohttp.ClientError:
            answer = Buffered(status, b"", {})
        finally:
            response.release()
            rt.view.end(view, token)
        rt.metrics.requests.labels(view.name, t.outcome_of(status)).inc()
        if status == 429:
            full.append(answer)
            tries.retry_reason = t.RETRY_OVERLOADED
        else:
            rt.view.refused(view)
            tries.failures += 1
            tries.retry_reason = t.RETRY_UNAVAILABLE
    if full:
        return min(full, key=lambda a: a.retry_after)
    if not tried:
        raise Unavailable(
            "No backend is ready to take the request.",
            retry_after=NO_BACKEND_RETRY_AFTER_S,
            code="no_backends",
        )
    raise Unavailable(
        f"No backend could take the request ({len(tried)} tried).",
        retry_after=NO_BACKEND_RETRY_AFTER_S,
        code="backends_unavailable",
    )


def pick(rt: RouterRuntime, shape: Shape, exclude: set[str]) -> BackendView | None:
    """The chosen backend for a request of ``shape``, or None if none is accepting."""
    started = time.perf_counter()
    candidates = rt.view.candidates(shape, exclude)
    if not candidates:
        return None
    chosen = rt.picker(candidates, rt.rng)
    rt.metrics.pick_seconds.observe(time.perf_counter() - started)
    return rt.view.views[chosen.name]


async def fetch_from(
    rt: RouterRuntime, request: web.Request, view: BackendView, path: str
) -> web.StreamResponse:
    """GET ``path`` from one given backend (no choice, no retry): image files live on one pod."""
    token = rt.view.begin(view, Shape(n=0), time.monotonic())
    upstream: Upstream | None = None
    reply = web.StreamResponse()
    try:
        async with asyncio.timeout(rt.settings.request_timeout_s):
            try:
                response = await rt.client.get(view.backend.url + path)
            except aiohttp.ClientError:
                rt.metrics.requests.labels(view.name, t.UNREACHABLE).inc()
                raise BadGateway(
                    "The pod that holds this image cannot be reached.", code="backend_unreachable"
                ) from None
            rt.metrics.requests.labels(view.name, t.outcome_of(response.status)).inc()
            upstream = Upstream(view, token, response)
            return await _relay(request, upstream, reply)
    except TimeoutError:
        if reply.prepared:
            _abort(request)
            return reply
        raise Timeout("The pod holding this image did not answer in time.", code="timeout") from None
    finally:
        if upstream is not None:
            upstream.response.close()
        rt.view.end(view, token)


async def _relay(
    request: web.Request,
    upstream: Upstream,
    reply: web.StreamResponse,
    rewrite: Callable[[bytes], bytes] | None = None,
) -> web.StreamResponse:
    """The pod's answer to the client: read whole when small (or to be rewritten), streamed when large."""
    response = upstream.response
    headers = _passed_headers(response)
    length = response.content_length
    rewrite = rewrite if response.status == 200 else None
    try:
        if rewrite is not None or (length is not None and length <= BUFFER_LIMIT):
            body = await response.read()
            return web.Response(
                body=rewrite(body) if rewrite else body, status=response.status, headers=headers
            )
        reply.set_status(response.status)
        reply.headers.update(headers)
        if length is not None:
            reply.content_length = length
        await reply.prepare(request)
        async for chunk in response.content.iter_chunked(CHUNK):
            await reply.write(chunk)
        await reply.write_eof()
        return reply
    except aiohttp.ClientError as exc:
        if reply.prepared:  # the pod went away mid-answer: the client sees a cut-short response
            log.warning("Backend %s broke off its answer: %s", upstream.view.name, type(exc).__name__)
            _abort(request)
            return reply
        raise BadGateway("The pod broke off its answer.", code="backend_disconnected") from None


async def _relay_events(
    rt: RouterRuntime,
    request: web.Request,
    out: Outbound,
    attempt: Attempt,
    tries: Tries,
    reply: web.StreamResponse,
) -> web.StreamResponse:
    """A streamed answer to the client, retried on another pod while the client has seen only
    comments (see the module's docstring); ``attempt.upstream`` is the first pod's 200 stream."""
    while True:
        upstream = attempt.upstream
        assert upstream is not None
        failed = await _relay_until_event(request, upstream, reply)
        if failed is None:
            return reply
        view = upstream.view
        log.warning(
            "Backend %s's stream %s before its first event; trying another",
            view.name,
            "failed" if failed.error is not None else "broke off",
        )
        upstream.response.close()
        rt.view.end(view, upstream.token)
        attempt.upstream = None
        if failed.error is None:
            rt.metrics.requests.labels(view.name, t.UNREACHABLE).inc()
            rt.view.failed(view, time.monotonic(), "its stream broke off")
        else:  # as a plain 503: not accepting until its next report
            rt.view.refused(view)
        tries.failures += 1
        tries.retry_reason = t.RETRY_STREAM_FAILED
        try:
            sent = await _send(rt, request, out, attempt, tries)
        except APIError as exc:  # no pod left to try
            return await _end_stream(reply, failed.error or sse.error(exc.envelope()))
        if isinstance(sent, Buffered):  # every other pod is full
            return await _end_stream(reply, sse.error(_envelope(sent.body, sent.status)))
        attempt.upstream = sent
        attempt.view = sent.view
        if not _is_event_stream(sent.response):  # a plain error answer: as an error event now
            try:
                body = await sent.response.read()
            except aiohttp.ClientError:
                body = b""
            return await _end_stream(reply, sse.error(_envelope(body, sent.response.status)))


async def _relay_until_event(
    request: web.Request, upstream: Upstream, reply: web.StreamResponse
) -> StreamFailed | None:
    """Relay ``upstream``'s stream: comment lines one by one until an event begins, then all the
    rest as it comes (None). A stream that ends or breaks off before any event, or whose first
    event is an ``error`` with status 503 (:func:`imagefleet.sse.error`), is not relayed further
    (:class:`StreamFailed`); any other error event is relayed, as a plain 500 answer would be."""
    response = upstream.response
    if not reply.prepared:
        reply.set_status(200)
        reply.headers.update(_passed_headers(response))
        await reply.prepare(request)
    pending = b""
    status: int | None = None  # from the comment right before an error event
    error: list[bytes] | None = None  # the lines of an error event being read
    committed = False
    chunks = response.content.iter_any()
    try:
        while not committed:
            line, sep, rest = pending.partition(b"\n")
            if error is not None or pending.startswith(b":"):
                if not sep:  # a comment or an error event's line: read it whole
                    pending += await anext(chunks)
                    continue
                pending = rest
                if error is None:
                    status = _error_status(line)
                    await reply.write(line + sep)
                elif line.rstrip(b"\r"):
                    error.append(line + sep)
                elif status in RETRIED_STATUSES:
                    return StreamFailed(b"".join(error) + line + sep)
                else:  # an error the next pod would give as well: the client's answer
                    pending, committed = b"".join(error) + line + sep + pending, True
            elif pending.startswith((b"\n", b"\r\n")):
                pending = rest
                await reply.write(line + sep)
            elif len(pending) < len(ERROR_EVENT) and ERROR_EVENT.startswith(pending):
                pending += await anext(chunks)  # "event: error" or another event: not yet known
            elif pending.startswith(ERROR_EVENT):
                error = []
            else:  # the first event: from here on relayed as it comes, never retried
                committed = True
        await reply.write(pending)
        async for chunk in response.content.iter_chunked(CHUNK):
            await reply.write(chunk)
        await reply.write_eof()
        return None
    except (aiohttp.ClientError, StopAsyncIteration):
        if committed:
            log.warning("Backend %s broke off its answer", upstream.view.name)
            _abort(request)  # an event had begun: the client sees a cut-short response
            return None
        return StreamFailed(None)


ERROR_EVENT = b"event: error"
RETRIED_STATUSES = (503,)
"""Error statuses of a stream's first event that send it to another pod (as a plain 503 would)."""


def _error_status(comment: bytes) -> int | None:
    """The status an ``imagefleet.error`` comment line announces; None for any other line."""
    for event in sse.Parser().feed(comment.rstrip(b"\r").decode(errors="replace")):
        return event.error_status()
    return None


async def _end_stream(reply: web.StreamResponse, event: bytes) -> web.StreamResponse:
    """End a stream the client has seen only comments of with ``event`` (an ``error`` event)."""
    try:
        await reply.write(event)
        await reply.write_eof()
    except ConnectionResetError:
        pass
    return reply


def _envelope(body: bytes, status: int) -> dict[str, Any]:
    """A pod's error answer as OpenAI's envelope (its own when it sent one)."""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        return parsed
    return error_envelope(f"The backend answered {status}.", "server_error")


def _is_event_stream(response: aiohttp.ClientResponse) -> bool:
    return response.status == 200 and response.content_type == sse.CONTENT_TYPE


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.close()


def _passed_headers(response: aiohttp.ClientResponse) -> dict[str, str]:
    return {k: response.headers[k] for k in PASSED_RESPONSE_HEADERS if k in response.headers}


def _headers(rt: RouterRuntime, request: web.Request, view: BackendView, out: Outbound) -> dict[str, str]:
    """Headers for the pod, all set here (none copied from the client but the content type): the
    base of image URLs (:mod:`.publicurl`), the client's address, and the file-id prefix."""
    headers = {
        PUBLIC_BASE_HEADER: public_base(request, rt.settings.public_base_url, rt.trusted),
        FILE_PREFIX_HEADER: file_prefix(view.backend.key),
    }
    chain = forwarded_for(request, rt.trusted)
    if chain:
        headers["X-Forwarded-For"] = chain
    if out.content_type:
        headers["Content-Type"] = out.content_type
    return headers
