"""Keeping the load view current: one polling task per backend, started and stopped with discovery.

Each task fetches ``GET /v1/load`` every ``poll_interval_ms`` (with +-10% jitter, so that many
router replicas do not poll in lockstep), noting when the fetch *began*: requests sent after that
moment cannot be in the report (see :mod:`.loadview`). A failed fetch is a health failure; an
ejected backend is not polled until its backoff ends, and the poll then is the probe that brings
it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

import aiohttp

from imagefleet.loadreport import LoadReport
from imagefleet.router.discovery import Backend
from imagefleet.router.loadview import BackendView, LoadView
from imagefleet.wire import LOAD_PATH

log = logging.getLogger(__name__)

POLL_TIMEOUT_S = 2.0
JITTER = 0.1


class ForeignBackend(Exception):
    """The process answering at a backend's URL is another instance than the one expected there."""

    def __init__(self, reported: str, expected: str) -> None:
        super().__init__(f"it reports instance {reported or '(none)'!r}, expected {expected!r}")


class Poller:
    def __init__(self, view: LoadView, session: aiohttp.ClientSession, interval_s: float) -> None:
        self.view = view
        self.session = session
        self.interval_s = interval_s
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._rng = random.Random()

    def on_change(self, backends: dict[str, Backend]) -> None:
        """Discovery's callback: adopt the snapshot, start and stop polling tasks to match."""
        added, removed = self.view.sync(backends)
        for view in removed:
            task = self._tasks.pop(view.name, None)
            if task is not None:
                task.cancel()
            log.info("Backend %s left", _describe(view.backend))
        for view in added:
            self._tasks[view.name] = asyncio.get_running_loop().create_task(
                self._poll(view), name=f"poll {view.name}"
            )
            log.info("Backend %s joined", _describe(view.backend))

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def poll_once(self, view: BackendView) -> bool:
        """Fetch one report into the view; False if the backend failed to answer."""
        started = time.monotonic()
        try:
            async with self.session.get(
                view.backend.url + LOAD_PATH, timeout=aiohttp.ClientTimeout(total=POLL_TIMEOUT_S)
            ) as response:
                if response.status != 200:
                    raise ValueError(f"status {response.status}")
                report = LoadReport.from_json(await response.json())
            if not view.backend.owns(report.instance_id):
                raise ForeignBackend(report.instance_id, view.backend.instance_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # unreachable, timed out, not a load report, not ours: a failed probe
            if isinstance(exc, ForeignBackend):
                view.report = None  # never route to it on the strength of an earlier report
                log.warning("Backend %s ignored: %s", view.name, exc)
            self.view.failed(view, time.monotonic(), f"load report failed: {describe_error(exc)}")
            return False
        if self.view.reported(view, report, started, time.monotonic()):
            log.info("Backend %s is back", view.name)
        return True

    async def _poll(self, view: BackendView) -> None:
        while True:
            now = time.monotonic()
            if not view.health.may_probe(now):
                await asyncio.sleep(view.health.probe_at - now)
                continue
            await self.poll_once(view)
            await asyncio.sleep(self.interval_s * self._rng.uniform(1 - JITTER, 1 + JITTER))


def describe_error(exc: BaseException) -> str:
    """An exception for a log line: its type, and its message when it has one (a time-out has none)."""
    text = str(exc).strip()
    name = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
    return f"{name}: {text}"[:300] if text else name


def _describe(backend: Backend) -> str:
    return backend.name if backend.name == backend.url else f"{backend.name} ({backend.url})"
