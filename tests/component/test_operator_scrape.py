"""The operator reads a real pod's /metrics: the metric names are a contract between the two."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

import aiohttp
import pytest

from imagefleet.operator.scrape import Scraper, summarize


async def _scrape(host: str, port: int, timeout_s: float = 2.0) -> Any:
    async with aiohttp.ClientSession() as session:
        return await Scraper(session, timeout_s, 4).scrape(host, port)


def test_a_pods_metrics_become_its_status_numbers(pod: Any) -> None:
    before = summarize(pod.metrics())
    status, body = pod.generate(n=2, size="64x64", num_inference_steps=2)
    assert status == 200, body
    host, port = pod.url.removeprefix("http://").split(":")
    after = asyncio.run(_scrape(host, int(port)))
    assert after is not None
    assert after.completed == before.completed + 2
    assert after.ready and not after.quarantined
    assert after.batches >= before.batches + 1 and after.batch_seconds > before.batch_seconds
    assert after.queued == 0 and after.failed == before.failed


def test_a_page_that_is_not_prometheus_text_is_refused() -> None:
    with pytest.raises(ValueError):
        summarize("imagefleet_pod_queued_samples{ not valid\n")


def test_a_pod_that_does_not_answer_in_time_gives_no_numbers() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts, never answers
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        assert asyncio.run(_scrape("127.0.0.1", listener.getsockname()[1], timeout_s=0.5)) is None
    finally:
        stop.set()
        thread.join()
        for s in accepted:
            s.close()
        listener.close()


def test_a_pod_that_refuses_connections_gives_no_numbers() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert asyncio.run(_scrape("127.0.0.1", port)) is None
