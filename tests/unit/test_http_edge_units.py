"""Pure parts of the HTTP edge: rate-limited logging, the body budget, accept errors, ejection reasons."""

from __future__ import annotations

import asyncio
import logging
import socket

import aiohttp
import pytest

from imagefleet.edge import ACCEPT_ERROR, EdgeLimits, EdgeState, RateLimitedLog, rate_limit_accept_errors
from imagefleet.router.discovery import Backend
from imagefleet.router.loadview import LoadView
from imagefleet.router.poller import Poller


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_flood_is_logged_a_few_lines_per_interval_then_summarised(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    clock = Clock()
    limited = RateLimitedLog(logging.getLogger("flood"), burst=3, interval_s=10, clock=clock)
    logged = [limited.log(logging.WARNING, "accept", "accept failed %d", i) for i in range(100_000)]
    assert logged.count(True) == 3
    assert limited.log(logging.WARNING, "other", "another kind has its own lines")
    clock.now = 10.5
    assert limited.log(logging.WARNING, "accept", "accept failed again")
    messages = [r.getMessage() for r in caplog.records if r.name == "flood"]
    assert len(messages) == 6
    assert "99997 more 'accept' message(s) suppressed" in messages[4]


def test_the_body_budget_is_shared_and_given_back() -> None:
    state = EdgeState(EdgeLimits(1, 1, 1, 10, max_body_bytes=100, max_buffered_bytes=150))
    assert state.reserve(100)
    assert not state.reserve(60)
    assert state.reserve(50)
    state.release(100)
    assert state.reserve(60)
    assert state.buffered == 110


def test_accept_errors_go_through_the_rate_limit(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    loop = asyncio.new_event_loop()
    try:
        rate_limit_accept_errors(loop, RateLimitedLog(logging.getLogger("accepts"), burst=2, interval_s=60))
        rate_limit_accept_errors(loop, RateLimitedLog(logging.getLogger("accepts"), burst=2, interval_s=60))
        for _ in range(10_000):
            loop.call_exception_handler(
                {"message": ACCEPT_ERROR, "exception": OSError(24, "Too many open files")}
            )
        loop.call_exception_handler({"message": "something else"})
    finally:
        loop.close()
    assert len([r for r in caplog.records if r.name == "accepts"]) == 2
    assert any(r.name == "asyncio" and "something else" in r.getMessage() for r in caplog.records)


def test_an_ejection_says_why_even_for_a_time_out(caplog: pytest.LogCaptureFixture) -> None:
    """A pod that accepts the connection and never answers: the poll times out (no message)."""
    caplog.set_level(logging.INFO)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"

    async def run() -> None:
        view = LoadView(eject_after=1, backoff_s=1.0, backoff_max_s=30.0)
        async with aiohttp.ClientSession() as session:
            poller = Poller(view, session, 1.0)
            view.sync({url: Backend(url, url)})
            backend = view.views[url]
            backend.report = object()  # type: ignore[assignment]  # it had answered before
            assert not await poller.poll_once(backend)
            assert backend.health.ejected

    try:
        asyncio.run(run())
    finally:
        listener.close()
    (line,) = [r.getMessage() for r in caplog.records if "ejected" in r.getMessage()]
    assert line.endswith("load report failed: timed out"), line
