"""The image service: between HTTP and the scheduler, what it takes to answer one request.

For a parsed request it checks what the served model supports, resolves the defaults (once, with
:func:`imagefleet.schema.resolve_defaults`; an edit must then leave its pipeline a denoising
step), decodes an edit's uploads on the CPU pool, submits
the work and waits for it, cancelling the work when the client goes away. Handlers only read the
body, parse it, call :meth:`ImageService.generate` or :meth:`ImageService.edit`, and render the
result (TGI's ``Infer``). A streaming request is accepted the same way
(:meth:`ImageService.accept_generate`, :meth:`ImageService.accept_edit`) with a
:class:`~.previews.Watch` opened on its sample, and :mod:`.streaming` does the waiting.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

from imagefleet.errors import ClientClosed, InvalidRequest
from imagefleet.inference_pod import uploads
from imagefleet.inference_pod.encoding import Encoded
from imagefleet.inference_pod.models import ModelInfo
from imagefleet.inference_pod.previews import Watch, Watches
from imagefleet.inference_pod.scheduler import Scheduler, Ticket
from imagefleet.schema import (
    Defaults,
    EditFiles,
    ImageRequest,
    Limits,
    check_denoising_steps,
    resolve_defaults,
)

DISCONNECT_POLL_S = 0.1
UPLOAD_PIXEL_FACTOR = 4  # uploads may be this many times larger than the largest output

Gone = Callable[[], bool]
"""True once the client has gone away (its connection closed)."""


@dataclass(frozen=True)
class Accepted:
    """A queued request (defaults resolved) and its ticket."""

    request: ImageRequest
    ticket: Ticket


@dataclass(frozen=True)
class Result:
    """The request as served (defaults resolved) and its images, in order."""

    request: ImageRequest
    images: list[Encoded]


class ImageService:
    def __init__(
        self,
        *,
        info: ModelInfo,
        defaults: Defaults,
        limits: Limits,
        scheduler: Scheduler,
        cpu: Executor,
        rng: random.Random | None = None,
        poll_s: float = DISCONNECT_POLL_S,
        watches: Watches | None = None,
    ) -> None:
        self.info = info
        self.defaults = defaults
        self.limits = limits
        self._scheduler = scheduler
        self._cpu = cpu
        self._rng = rng
        self.poll_s = poll_s
        self.watches = watches if watches is not None else Watches()

    async def generate(self, request: ImageRequest, gone: Gone) -> Result:
        accepted = await self.accept_generate(request)
        return Result(accepted.request, await self._wait(accepted.ticket, gone))

    async def edit(self, request: ImageRequest, files: EditFiles, gone: Gone) -> Result:
        accepted = await self.accept_edit(request, files)
        return Result(accepted.request, await self._wait(accepted.ticket, gone))

    async def accept_generate(self, request: ImageRequest) -> Accepted:
        """Check, resolve and queue a generation (a streaming one with its watch open)."""
        self._check_support(request, "generate")
        request = resolve_defaults(request, self.defaults, self.limits, rng=self._rng)
        return self._accepted(request, self._scheduler.submit(request))

    async def accept_edit(self, request: ImageRequest, files: EditFiles) -> Accepted:
        pipeline = "inpaint" if files.mask is not None else "img2img"
        self._check_support(request, pipeline)
        image, mask, original = await asyncio.get_running_loop().run_in_executor(
            self._cpu,
            uploads.prepare,
            files.image,
            files.mask,
            request.size,
            UPLOAD_PIXEL_FACTOR * self.limits.max_pixels,
        )
        request = resolve_defaults(request, self.defaults, self.limits, image_size=original, rng=self._rng)
        check_denoising_steps(request, self.info.strengths.get(pipeline))
        ticket = self._scheduler.submit(request, pipeline=pipeline, image=image, mask=mask)
        return self._accepted(request, ticket)

    def _accepted(self, request: ImageRequest, ticket: Ticket) -> Accepted:
        if request.stream:  # before the batch loop runs again: no step of the sample goes unseen
            assert request.size is not None
            self.watches.open(
                Watch(
                    ticket.id,
                    request.partial_images,
                    request.size,
                    request.output_format,
                    request.output_compression,
                )
            )
        return Accepted(request, ticket)

    def queued_ahead(self, ticket: Ticket) -> int | None:
        """Queued samples that will start before ``ticket``'s (None once it left the queue)."""
        return self._scheduler.queued_ahead(ticket)

    def cancel(self, ticket: Ticket, reason: str) -> None:
        """Forget ``ticket``'s work (its client left)."""
        self._scheduler.cancel(ticket, reason)

    def _check_support(self, request: ImageRequest, pipeline: str) -> None:
        if pipeline not in self.info.tasks:
            raise InvalidRequest(
                f"This model cannot {pipeline}.", param="image" if request.task == "edit" else None
            )
        if request.negative_prompt is not None and not self.info.supports_negative_prompt:
            raise InvalidRequest("This model does not take a negative_prompt.", param="negative_prompt")

    async def _wait(self, ticket: Ticket, gone: Gone) -> list[Encoded]:
        """Await the ticket; cancel its work if the client goes away or the caller is cancelled."""
        try:
            while True:
                done, _ = await asyncio.wait({ticket.future}, timeout=self.poll_s)
                if done:
                    return ticket.future.result()
                if gone():
                    self._scheduler.cancel(ticket, "client disconnected")
                    raise ClientClosed("The client disconnected.")
        except asyncio.CancelledError:
            self._scheduler.cancel(ticket, "request cancelled")
            raise
