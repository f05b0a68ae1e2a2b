"""Getting results to the request that waits for them: encode, resolve, fail.

A caller of :meth:`.scheduler.Scheduler.submit` holds a :class:`Ticket`: its job's id and the
future its images arrive on. Images are encoded on the CPU pool (never on the event loop), each
into its own slot, and the future resolves once every slot is filled. Futures are only ever set
through :func:`resolve` and :func:`reject`, which do nothing once a future is done (a client that
left, a job failed by an earlier sample), as Ray Serve's ``_set_result_if_not_done``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from imagefleet import metrics as m
from imagefleet.errors import APIError, GenerationFailed
from imagefleet.inference_pod.batchstate import Job
from imagefleet.inference_pod.counters import PodCounters
from imagefleet.inference_pod.encoding import Encoded, encode
from imagefleet.schema import ImageRequest

log = logging.getLogger(__name__)

T = TypeVar("T")


def resolve(future: asyncio.Future[T], value: T) -> bool:
    """Set ``future``'s result unless it is done already; True if this call set it."""
    if future.done():
        return False
    future.set_result(value)
    return True


def reject(future: asyncio.Future[Any], error: BaseException) -> bool:
    """Fail ``future`` unless it is done already; True if this call failed it."""
    if future.done():
        return False
    future.set_exception(error)
    future.exception()  # mark it retrieved: its waiter may be gone
    return True


@dataclass(eq=False)
class Ticket:
    """An accepted request, as its caller holds it."""

    job: Job
    request: ImageRequest
    future: asyncio.Future[list[Encoded]]
    outputs: list[Encoded | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.outputs = [None] * len(self.job.samples)

    @property
    def id(self) -> str:
        return self.job.id

    @property
    def done(self) -> bool:
        return self.future.done()


class Delivery:
    """The open tickets; ``forget(job_id)`` is called once a ticket is settled either way."""

    def __init__(self, cpu: Executor, counters: PodCounters, forget: Callable[[str], None]) -> None:
        self._cpu = cpu
        self._counters = counters
        self._forget = forget
        self._tickets: dict[str, Ticket] = {}
        self._encoding: set[asyncio.Future[Encoded]] = set()

    def __len__(self) -> int:
        return len(self._tickets)

    def add(self, ticket: Ticket) -> None:
        self._tickets[ticket.id] = ticket

    def get(self, job_id: str) -> Ticket | None:
        """The open ticket of ``job_id`` (None once settled or cancelled)."""
        return self._tickets.get(job_id)

    def drop(self, ticket: Ticket) -> None:
        """Stop delivering to ``ticket`` (its client left) and cancel its future."""
        self._tickets.pop(ticket.id, None)
        ticket.future.cancel()

    def encode(self, ticket: Ticket, index: int, image: Any) -> None:
        """Encode image ``index`` of ``ticket`` on the CPU pool; resolve the ticket once all are in."""
        req = ticket.request
        fut = asyncio.get_running_loop().run_in_executor(
            self._cpu,
            encode,
            image,
            req.output_format,
            req.output_compression,
            req.response_format == "b64_json",
        )
        self._encoding.add(fut)
        fut.add_done_callback(lambda f: self._encoded(ticket, index, f))

    def _encoded(self, ticket: Ticket, index: int, fut: asyncio.Future[Encoded]) -> None:
        self._encoding.discard(fut)
        if ticket.done or fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            self._counters.other_errors["encode"] += 1
            log.error("Encoding image %d of request %s failed", index, ticket.id, exc_info=exc)
            message = f"The image could not be encoded: internal error. Request id: {ticket.id}."
            self.fail(ticket, GenerationFailed(message, code="encode_failed"))
            return
        ticket.outputs[index] = fut.result()
        self._counters.images[m.OUTCOME_COMPLETED] += 1
        outputs = [o for o in ticket.outputs if o is not None]
        if len(outputs) == len(ticket.outputs) and resolve(ticket.future, outputs):
            self._settle(ticket)
            self._counters.requests_completed += 1

    def fail(self, ticket: Ticket, error: APIError) -> None:
        if reject(ticket.future, error):
            self._settle(ticket)
            self._counters.requests_failed += 1

    def fail_all(self, error: Callable[[], APIError]) -> None:
        """Fail every open ticket, each with its own ``error()``."""
        for ticket in list(self._tickets.values()):
            self.fail(ticket, error())

    def _settle(self, ticket: Ticket) -> None:
        self._tickets.pop(ticket.id, None)
        self._forget(ticket.id)
