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
  writes it, never gathered first; once its first byte has gone to the client it is not retried.
* **ejected** -- the pod was ejected (its load reports stopped) while this request waited for its
  answer, e.g. a hung pod: the connection is closed (the pod, if it ever wakes, takes that as a
  cancellation) and the request goes to another pod, like an unreachable one.

``request_timeout_s`` bounds the whole exchange; past it the client gets 504 in OpenAI's
envelope and the upstream connection is closed, which the pod takes as a cancellation. A client
that disconnects cancels the handler (aiohttp's handler cancellation), which closes the upstream
connection the same way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from imagefleet.errors import BadGateway, Timeout, Unavailable
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
    """The backend being waited on, so a time-out or hang-up is counted against it."""

    view: BackendView | None = None


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
    upstream: Upstream | None = None
    attempt = Attempt()
    try:
        async with asyncio.timeout_at(deadline):
            sent = await _send(rt, request, out, attempt)
            if isinstance(sent, Buffered):  # every pod was full: the router's own 429
                answer = web.Response(body=sent.body, status=sent.status, headers=sent.headers)
                answer[ERROR_MARK] = True
                return answer
            upstream = sent
            attempt.view = upstream.view
            return await _relay(request, upstream, reply, out.rewrite)
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
        if upstream is not None:
            upstream.response.close()
            rt.view.end(upstream.view, upstream.token)
        rt.metrics.request_seconds.labels(out.endpoint).observe(time.monotonic() - started)


async def _send(
    rt: RouterRuntime, request: web.Request, out: Outbound, attempt: Attempt
) -> Upstream | Buffered:
    tried: set[str] = set()
    failures = 0
    full: list[Buffered] = []
    retry_reason: str | None = None
    while failures < rt.settings.max_attempts:
        view = pick(rt, out.shape, tried)
        if view is None:
            break
        if retry_reason is not None:
            rt.metrics.retries.labels(retry_reason).inc()
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
            failures += 1
            retry_reason = t.RETRY_UNREACHABLE
            continue
        except BackendEjected:
            attempt.view = None
            rt.view.end(view, token)
            rt.metrics.requests.labels(view.name, t.EJECTED).inc()
            failures += 1
            retry_reason = t.RETRY_EJECTED
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
            retry_reason = t.RETRY_OVERLOADED
        else:
            rt.view.refused(view)
            failures += 1
            retry_reason = t.RETRY_UNAVAILABLE
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
