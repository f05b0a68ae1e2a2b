"""The streamed answer (``stream: true``): server-sent events as OpenAI's Images API sends them.

Events, for a generation (an edit's are ``image_edit.*``):

* ``image_generation.partial_image`` -- one per preview (:mod:`.previews`), ``partial_image_index``
  counting from 0; fewer than ``partial_images`` when the request has too few steps;
* ``image_generation.completed`` -- the image; the stream ends after it. No ``usage``: it counts
  the tokens of OpenAI's GPT image models, which a diffusion model has none of;
* ``error`` -- ``{"error": {...}}`` in OpenAI's envelope, when the image fails after the stream
  began (the ``openai`` client raises it as ``APIError``).

Before and between them the stream carries :mod:`imagefleet.sse`'s progress comments, which
every SSE client skips, the ``openai`` client included: at once and then whenever it changes (at
most every :data:`QUEUE_UPDATE_S`) while the request waits in the queue, its position (the
queued samples that will start before it, :meth:`.scheduler.Scheduler.queued_ahead`); after each
denoising step, the steps done (for progress bars).

The response therefore begins (status 200) as soon as the request is queued, and a request that
fails while queued (quarantine, shutdown) or in its batch's first step (a device error) gets an
``error`` event before any other event, after a comment with the status a plain answer would have
had (503). A router retries such a stream on another pod, as it would the plain 503, since its
client has seen only comments (docs/router.md). A client that goes away cancels the request
exactly as a non-streaming one does (:meth:`.service.ImageService.cancel`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from aiohttp import web

from imagefleet import sse
from imagefleet.errors import APIError, ClientClosed, GenerationFailed
from imagefleet.inference_pod.encoding import Encoded
from imagefleet.inference_pod.previews import Watch
from imagefleet.inference_pod.service import Accepted, Gone, ImageService

log = logging.getLogger(__name__)

QUEUE_UPDATE_S = 0.25
"""The least time between two queue-position comments of one stream."""
HEADERS = {"Content-Type": sse.CONTENT_TYPE, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class _Writer:
    def __init__(self, request: web.Request, accepted: Accepted) -> None:
        req = accepted.request
        self._request = request
        self.response = web.StreamResponse(headers=HEADERS)
        self.prefix = sse.EVENT_PREFIX[req.task]
        self.meta = {
            "size": f"{req.width}x{req.height}",
            "quality": "auto",
            "background": "opaque",
            "output_format": req.output_format,
        }

    @property
    def started(self) -> bool:
        return self.response.prepared

    async def send(self, chunk: bytes) -> None:
        if not self.response.prepared:
            await self.response.prepare(self._request)
        await self.response.write(chunk)

    async def partial(self, image: Encoded, index: int) -> None:
        fields = {**self.meta, "created_at": int(time.time()), "partial_image_index": index}
        await self.send(sse.event(f"{self.prefix}.partial_image", fields, image.b64))

    async def completed(self, image: Encoded) -> None:
        fields = {**self.meta, "created_at": int(time.time())}
        await self.send(sse.event(f"{self.prefix}.completed", fields, image.b64))
        await self.response.write_eof()


async def respond(
    request: web.Request, service: ImageService, accepted: Accepted, gone: Gone
) -> web.StreamResponse:
    """Stream ``accepted``'s events to the client until its image is done or the client leaves."""
    ticket = accepted.ticket
    watch = service.watches.get(ticket.id)
    assert watch is not None, "a streaming request is accepted with its watch open"
    writer = _Writer(request, accepted)
    try:
        return await _stream(writer, service, accepted, watch, gone)
    except (ConnectionResetError, ClientClosed):
        service.cancel(ticket, "client disconnected")
        if writer.started:
            return writer.response
        raise ClientClosed("The client disconnected.") from None
    except asyncio.CancelledError:
        service.cancel(ticket, "request cancelled")
        raise
    finally:
        service.watches.close(ticket.id)


async def _stream(
    writer: _Writer, service: ImageService, accepted: Accepted, watch: Watch, gone: Gone
) -> web.StreamResponse:
    ticket = accepted.ticket
    shown_steps = 0
    shown_ahead: int | None = None
    shown_at = -QUEUE_UPDATE_S
    index = 0
    while True:
        if shown_steps == 0 and not ticket.done:
            ahead = service.queued_ahead(ticket)
            now = time.monotonic()
            if ahead is not None and ahead != shown_ahead and now - shown_at >= QUEUE_UPDATE_S:
                shown_ahead, shown_at = ahead, now
                await writer.send(sse.queued(ahead))
        if not ticket.done and not watch.changed.is_set():
            changed = asyncio.ensure_future(watch.changed.wait())
            waiters: set[asyncio.Future[Any]] = {ticket.future, changed}
            try:
                await asyncio.wait(waiters, timeout=service.poll_s)
            finally:
                changed.cancel()
        watch.changed.clear()
        if gone():
            raise ClientClosed("The client disconnected.")
        if watch.steps_done != shown_steps:
            shown_steps = watch.steps_done
            await writer.send(sse.progress(watch.steps_done, watch.steps_total))
        while watch.partials and (ticket.done or watch.partials[0].done()):
            image = await _rendered(watch.partials.popleft())
            if image is not None:
                await writer.partial(image, index)
                index += 1
        if ticket.done:
            return await _finish(writer, accepted)


async def _finish(writer: _Writer, accepted: Accepted) -> web.StreamResponse:
    future = accepted.ticket.future
    error = future.exception() if not future.cancelled() else ClientClosed("The request was cancelled.")
    if error is None:
        await writer.completed(future.result()[0])
        return writer.response
    if not isinstance(error, APIError):
        error = GenerationFailed(f"Image generation failed: {type(error).__name__}")
    if not writer.started:
        raise error  # nothing sent yet: a plain error status
    await writer.send(sse.error(error.envelope(), error.status))
    with contextlib.suppress(ConnectionResetError):
        await writer.response.write_eof()
    return writer.response


async def _rendered(future: asyncio.Future[Encoded]) -> Encoded | None:
    try:
        return await future
    except Exception:  # a preview that failed to render is skipped; the image still comes
        log.exception("Rendering a partial image failed")
        return None
