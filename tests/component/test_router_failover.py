"""Failover with real pods: full queues (429), a pod killed under load, a quarantined pod (503).

To make the router choose a given pod first, these tests give it a stale view: it polls once at
start (while the other pod is busy) and not again, so it keeps believing the other pod is busy.
"""

from __future__ import annotations

import base64
import io
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from PIL import Image

from imagefleet import metrics
from imagefleet.testing.routers import (
    Held,
    RouterThread,
    call,
    generate,
    pod_busy,
    pod_requests,
    router_settings,
    scrape,
)
from imagefleet.testing.servers import UNBOUNDED_WORK, PodProcess, get_json, pods, wait_until

POD_ARGS = (
    "--model",
    "tiny",
    "--max-batch-size",
    "1",
    "--max-queued-images",
    "3",
    "--max-images-per-request",
    "3",
    "--fault-injection",
    "--quarantine-after",
    "1",
    *UNBOUNDED_WORK,
)
LONG: dict[str, Any] = {"size": "256x256", "num_inference_steps": 60}
POD_REQUESTS = metrics.POD_REQUESTS + "_total"
RETRIES = metrics.ROUTER_RETRIES + "_total"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[PodProcess]]:
    log_dir = tmp_path_factory.mktemp("pods")
    with pods(2, POD_ARGS, log_dir=log_dir) as started:
        running = list(started)
        yield running
        for p in running:  # a pod restarted by a test is a new process
            if p not in started:
                p.stop()


@pytest.fixture
def idle(pair: list[PodProcess]) -> list[PodProcess]:
    wait_until(lambda: not any(pod_busy(p.url) for p in pair), 60, "pods idle")
    return pair


def stale_router_preferring(first: PodProcess, other: PodProcess) -> RouterThread:
    """A router that polled once while ``other`` was busy, and will not poll again for ten minutes."""
    busy = Held(other.url, **LONG).start()
    try:
        wait_until(lambda: pod_busy(other.url), 30, "the other pod busy")
        router = RouterThread(router_settings([first.url, other.url], poll_interval_ms=600_000)).start()
        router.wait_ready(2)
        view = router.view()
        assert view[other.url]["expected_wait_seconds"] > view[first.url]["expected_wait_seconds"]
    finally:
        busy.hang_up()
    wait_until(lambda: not pod_busy(other.url), 30, "the other pod idle again")
    return router


def fill(pod: PodProcess) -> list[Held]:
    """One request running (stalled at its first step until it hangs up, however fast this
    machine runs steps) and three queued: the pod's queue is full."""
    reply = call("POST", pod.url + "/debug/faults", {"kind": "stall", "count": 1, "seconds": 600})
    assert reply.status == 200, reply.body
    held = [Held(pod.url, **LONG).start() for _ in range(4)]
    wait_until(lambda: get_json(pod.url + "/v1/load")[1]["queued_samples"] == 3, 30, "a full queue")
    return held


def status_count(pod: PodProcess, status: str) -> float:
    return scrape(pod.url).value(POD_REQUESTS, endpoint="generations", status=status)


def test_a_full_pod_is_passed_over_and_429_comes_back_only_when_all_are_full(idle: list[PodProcess]) -> None:
    a, b = idle
    router = stale_router_preferring(a, b)
    held: list[Held] = []
    try:
        held += fill(a)
        refused = status_count(a, "429")
        reply = generate(router.url)
        assert reply.status == 200, reply.body
        assert status_count(a, "429") == refused + 1  # the router tried a first, a said it was full
        assert scrape(router.url).value(RETRIES, reason="overloaded") == 1

        held += fill(b)
        reply = generate(router.url)
        assert reply.status == 429
        assert int(reply.headers["Retry-After"]) >= 1
        assert (
            reply.body["error"]["type"] == "rate_limit_error" and reply.body["error"]["code"] == "queue_full"
        )
        responses = metrics.ROUTER_RESPONSES + "_total"
        assert scrape(router.url).value(responses, endpoint="generations", status="429", origin="router") == 1
    finally:
        for h in held:
            h.hang_up()
        router.stop()


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 10)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_a_pod_killed_under_load_loses_no_request(idle: list[PodProcess]) -> None:
    a, b = idle
    settings = router_settings([a.url, b.url], backoff_s=0.5, backoff_max_s=2.0)
    outcomes: list[str] = []
    stop = threading.Event()

    def generations() -> None:
        while not stop.is_set():
            reply = generate(router.url, size="128x128", num_inference_steps=10)
            outcomes.append("ok" if reply.status == 200 else f"generation {reply.status}: {reply.body}")

    def edits() -> None:
        client = openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        while not stop.is_set():
            try:
                result = client.images.edit(image=("in.png", png(), "image/png"), prompt="x", size="64x64")
                assert result.data is not None
                Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json or ""))).load()
                outcomes.append("ok")
            except Exception as exc:
                outcomes.append(f"edit {exc!r}")

    with RouterThread(settings) as router:
        router.wait_ready(2)
        load = [threading.Thread(target=f, daemon=True) for f in (generations, generations, edits)]
        for t in load:
            t.start()
        try:
            wait_until(lambda: pod_busy(a.url), 30, "pod a at work")
            a.kill()
            at_kill = len(outcomes)
            wait_until(lambda: router.view()[a.url]["ejected"], 10, "pod a out of the pool")
            wait_until(lambda: len(outcomes) >= at_kill + 3, 60, "requests served by b alone")
            served_by_b_alone = len(outcomes)

            restarted = PodProcess(POD_ARGS, port=a.port, log_dir=a.log_path.parent).start()
            idle[0] = restarted
            restarted.wait_ready()
            wait_until(lambda: router.view()[a.url]["accepting"], 20, "pod a back in the pool")
            wait_until(lambda: pod_requests(a.url) >= 2, 60, "pod a taking requests again")
        finally:
            stop.set()
            for t in load:
                t.join(120)

        retries = scrape(router.url).value(RETRIES, reason="unreachable")
        unreachable = scrape(router.url).value(
            metrics.ROUTER_REQUESTS + "_total", backend=a.url, outcome="unreachable"
        )
    failures = [o for o in outcomes if o != "ok"]
    assert not failures, failures
    assert len(outcomes) > served_by_b_alone > 0
    assert retries >= 1 and unreachable >= 1


def test_a_quarantined_pod_answering_503_is_passed_over(idle: list[PodProcess]) -> None:
    a, b = idle
    router = stale_router_preferring(a, b)
    try:
        reply = call("POST", a.url + "/debug/faults", {"kind": "runtime", "count": 1})
        assert reply.status == 200, reply.body
        assert generate(a.url).body["error"]["code"] == "device_error"  # that quarantines the pod
        assert generate(a.url).body["error"]["code"] == "quarantined"
        unavailable = status_count(a, "503")

        reply = generate(router.url)
        assert reply.status == 200, reply.body
        assert status_count(a, "503") == unavailable + 1  # tried first, refused
        assert scrape(router.url).value(RETRIES, reason="unavailable") == 1
        assert router.view()[a.url]["accepting"] is False  # not tried again until it reports ready
    finally:
        router.stop()


def test_a_request_on_a_hung_pod_fails_over_once_the_pod_is_ejected(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGSTOP: the pod keeps its connections open and answers nothing, not even its load report.

    Two pods of its own: the shared pair may hold a quarantined pod after the test above."""
    with pods(2, POD_ARGS, log_dir=tmp_path) as (a, b):
        hung = _hung_pod_fails_over(a, b)
    lines = [r.getMessage() for r in caplog.records if f"Backend {hung} ejected" in r.getMessage()]
    assert lines and lines[0].endswith("load report failed: timed out"), lines


def _hung_pod_fails_over(a: PodProcess, b: PodProcess) -> str:
    settings = router_settings([a.url, b.url], request_timeout_s=600, eject_after=2)
    with RouterThread(settings) as router:
        router.wait_ready(2)
        held = Held(router.url, size="128x128", num_inference_steps=12).start()
        wait_until(lambda: pod_busy(a.url) or pod_busy(b.url), 30, "a pod at work")
        hung, other = (a, b) if pod_busy(a.url) else (b, a)
        before = pod_requests(other.url)
        hung.kill(signal.SIGSTOP)
        try:
            status = held.wait(300)  # well before request_timeout_s
            assert router.view()[hung.url]["ejected"]
            ejected = scrape(router.url).value(
                metrics.ROUTER_REQUESTS + "_total", backend=hung.url, outcome="ejected"
            )
            retries = scrape(router.url).value(RETRIES, reason="ejected")
        finally:
            hung.kill(signal.SIGCONT)
        assert status == 200, (status, held.error)
        assert pod_requests(other.url) == before + 1
        assert ejected == 1 and retries >= 1
    return hung.url
