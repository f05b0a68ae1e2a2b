"""The router in front of three real ``tiny`` pod processes: where requests go, and what clients see.

Where a request went is read from the pods' own ``/stats``. Pods are kept busy with requests sent
straight to them and held open; hanging up cancels them at the pod, which leaves it idle again.
"""

from __future__ import annotations

import base64
import io
import random
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from PIL import Image

from imagefleet import metrics, wire
from imagefleet.router.discovery import backend_key
from imagefleet.testing.routers import (
    Held,
    RouterThread,
    call,
    generate,
    pod_busy,
    pod_requests,
    pod_stats,
    router_settings,
    scrape,
)
from imagefleet.testing.servers import PodProcess, get_json, pods, wait_until

LONG: dict[str, Any] = {"size": "256x256", "num_inference_steps": 60}
CANCELLED = metrics.POD_IMAGES + "_total"


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[PodProcess]]:
    with pods(3, log_dir=tmp_path_factory.mktemp("pods")) as started:
        yield started


@pytest.fixture(scope="module")
def router(trio: list[PodProcess]) -> Iterator[RouterThread]:
    with RouterThread(router_settings([p.url for p in trio])) as r:
        r.wait_ready(3)
        yield r


@pytest.fixture
def idle(trio: list[PodProcess]) -> list[PodProcess]:
    """The three pods, once nothing is queued or running on any of them."""
    wait_until(lambda: not any(pod_busy(p.url) for p in trio), 60, "pods idle")
    return trio


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def requests_of(trio: list[PodProcess]) -> list[int]:
    return [pod_requests(p.url) for p in trio]


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


def png(size: tuple[int, int], noise: bool = False) -> bytes:
    buf = io.BytesIO()
    if noise:  # incompressible: the upload is as large as the pixels
        Image.frombytes("RGB", size, random.Random(0).randbytes(size[0] * size[1] * 3)).save(buf, "PNG")
    else:
        Image.new("RGB", size, (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def cancelled_images(trio: list[PodProcess]) -> float:
    return sum(scrape(p.url).value(CANCELLED, outcome=metrics.OUTCOME_CANCELLED) for p in trio)


# --- where requests go -----------------------------------------------------------------------------


def test_requests_go_to_the_pod_with_the_least_queued_work(
    idle: list[PodProcess], router: RouterThread
) -> None:
    a, b, _ = idle
    held = [Held(p.url, **LONG).start() for p in (a, a, b, b)]
    try:
        wait_until(
            lambda: all(router.view()[p.url]["expected_wait_seconds"] > 1.0 for p in (a, b)),
            30,
            "the router to see a and b busy",
        )
        before = requests_of(idle)
        for _ in range(3):
            reply = generate(router.url)
            assert reply.status == 200, reply.body
        after = requests_of(idle)
        assert [y - x for x, y in zip(before, after, strict=True)] == [0, 0, 3]
        assert not any(h.done for h in held)  # a and b were busy the whole time
    finally:
        for h in held:
            h.hang_up()


def test_one_huge_request_loses_to_several_small_ones(idle: list[PodProcess]) -> None:
    """A request-count router would choose ``a`` (1 request) over ``b`` (3 requests)."""
    a, b, _ = idle
    with RouterThread(router_settings([a.url, b.url])) as pair:
        pair.wait_ready(2)
        held = [Held(a.url, size="512x512", num_inference_steps=150).start()]
        try:
            wait_until(lambda: pair.view()[a.url]["expected_wait_seconds"] > 10, 30, "a's huge request seen")
            small = [Held(b.url, size="192x192", num_inference_steps=40).start() for _ in range(3)]
            held += small
            wait_until(
                lambda: pair.view()[b.url]["expected_wait_seconds"] > 0.5, 30, "b's small requests seen"
            )
            view = pair.view()
            assert view[b.url]["expected_wait_seconds"] < view[a.url]["expected_wait_seconds"]
            before = requests_of(idle)
            held.append(Held(pair.url).start())  # the probe; it is counted by the pod that accepts it
            wait_until(lambda: sum(requests_of(idle)) > sum(before), 30, "the probe to reach a pod")
            after = requests_of(idle)
            assert [y - x for x, y in zip(before, after, strict=True)] == [0, 1, 0]
            assert not any(s.done for s in small)  # b still held its queue when the router chose
        finally:
            for h in held:
                h.hang_up()


def test_two_routers_with_a_stale_view_do_not_herd(idle: list[PodProcess]) -> None:
    """Both routers keep their first (idle) view of the pods; a burst through both spreads out."""
    urls = [p.url for p in idle]
    stale = router_settings(urls, poll_interval_ms=600_000)
    with RouterThread(stale) as r1, RouterThread(stale) as r2:
        r1.wait_ready(3)
        r2.wait_ready(3)
        before = requests_of(idle)
        start = threading.Barrier(12)
        statuses: list[int] = []

        def one(url: str) -> None:
            start.wait()
            # long enough that each router's six requests are all in flight while it picks
            statuses.append(generate(url, size="128x128", num_inference_steps=20).status)

        threads = [threading.Thread(target=one, args=(r.url,)) for r in (r1, r2) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        spread = [y - x for x, y in zip(before, requests_of(idle), strict=True)]
    assert statuses == [200] * 12
    assert sum(spread) == 12
    # Herding would put all twelve on one pod. Each router's in-flight accounting sends its first
    # three requests to three different pods; after that, pods whose measured unit cost is lower
    # (noise between identical CPU pods) absorb more, up to 4 of each router's 6.
    assert min(spread) >= 2 and max(spread) <= 8, spread


# --- what clients see ------------------------------------------------------------------------------


def test_stats_aggregates_every_pod(idle: list[PodProcess], router: RouterThread) -> None:
    generate(router.url)
    wait_until(lambda: not any(pod_busy(p.url) for p in idle), 30, "pods idle")
    status, stats = get_json(router.url + "/stats")
    assert status == 200
    own = [pod_stats(p.url) for p in idle]
    assert stats["mode"] == "distributed"
    assert set(stats["devices"]) == {p.url for p in idle}
    for p, pod in zip(idle, own, strict=True):
        device = stats["devices"][p.url]
        (pod_device,) = pod["devices"].values()
        for field in (
            "available",
            "processing",
            "images_completed",
            "avg_batch_time",
            "estimated_load",
            "error_count",
        ):
            assert device[field] == pod_device[field], field
        assert device["router"]["accepting"] is True
    for key in (
        "total_requests",
        "total_batches",
        "total_images",
        "queued",
        "active_batches",
        "completed",
        "failed",
    ):
        assert stats["global"][key] == sum(p["global"][key] for p in own), key
    assert stats["global"]["total_requests"] > 0


def test_models_come_from_a_pod(router: RouterThread) -> None:
    models = client(router.url).models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_image_files_are_fetched_from_the_pod_that_holds_them(idle: list[PodProcess]) -> None:
    a, b, _ = idle
    with RouterThread(router_settings([a.url, b.url])) as pair:
        pair.wait_ready(2)
        urls: list[str] = []

        def one() -> None:
            result = client(pair.url).images.generate(
                prompt="x", size="64x64", response_format="url", extra_body={"num_inference_steps": 20}
            )
            urls.extend(item.url for item in result.data or [] if item.url)

        threads = [threading.Thread(target=one) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(urls) == 4
        holder = {_key_of(_file_id(u)) for u in urls}
        assert holder == {backend_key(a.url), backend_key(b.url)}  # both pods hold some
        for url in urls:
            assert url.startswith(pair.url + "/v1/images/files/")
            with urllib.request.urlopen(url, timeout=10) as resp:
                assert resp.headers["Content-Type"] == "image/png"
                assert Image.open(io.BytesIO(resp.read())).size == (64, 64)
            file_id = _file_id(url)  # the URL is signed: ?expires=...&signature=...
            other = b if _key_of(file_id) == backend_key(a.url) else a
            assert call("GET", f"{other.url}/v1/images/files/{file_id}").status == 404  # only its pod has it

        forged = [
            "0123456789~AAAAAAAAAAAAAAAAAAAAAA.png",  # a key no backend has
            "AAAAAAAAAAAAAAAAAAAAAA.png",  # no key at all
            f"{backend_key(a.url)}~doesnotexist.png",  # a known pod, a file it never had
            "127.0.0.1:22~x.png",
        ]
        for file_id in forged:
            reply = call("GET", f"{pair.url}/v1/images/files/{file_id}")
            assert reply.status == 404, file_id
            assert reply.body["error"]["type"] == "invalid_request_error"


def _file_id(url: str) -> str:
    return urllib.parse.urlsplit(url).path.rsplit("/", 1)[1]


def test_edits_are_streamed_through(idle: list[PodProcess], router: RouterThread) -> None:
    edits = metrics.POD_REQUESTS + "_total"
    before = sum(scrape(p.url).value(edits, endpoint="edits", status="200") for p in idle)
    result = client(router.url).images.edit(
        image=("in.png", png((64, 64)), "image/png"),
        mask=("mask.png", png((64, 64)), "image/png"),
        prompt="blue",
        n=2,
    )
    assert result.data is not None and len(result.data) == 2
    big = png((600, 600), noise=True)
    assert len(big) > 500_000
    result = client(router.url).images.edit(image=("big.png", big, "image/png"), prompt="x", size="64x64")
    assert result.data is not None
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json or "")))
    assert image.size == (64, 64)
    after = sum(scrape(p.url).value(edits, endpoint="edits", status="200") for p in idle)
    assert after - before == 2


def test_a_bad_request_gets_the_same_envelope(router: RouterThread) -> None:
    reply = call(
        "POST",
        router.url + "/v1/images/generations",
        raw=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert reply.status == 400 and reply.body["error"]["type"] == "invalid_request_error"
    reply = generate(router.url, size="13x13")  # the pod validates, the router passes its answer on
    assert reply.status == 400 and reply.body["error"]["param"] == "size"
    with pytest.raises(openai.BadRequestError):
        client(router.url).images.generate(prompt="x", n=99)


def test_a_body_over_the_limit_is_refused(trio: list[PodProcess]) -> None:
    with RouterThread(router_settings([trio[0].url], max_body_mb=0.01)) as small:
        reply = call("POST", small.url + "/v1/images/generations", {"prompt": "x" * 20_000})
        assert reply.status == 413 and reply.body["error"]["type"] == "invalid_request_error"


# --- time-outs, hang-ups, nothing to route to ------------------------------------------------------


def test_a_slow_request_times_out_with_504_and_is_cancelled_at_the_pod(idle: list[PodProcess]) -> None:
    c = idle[2]
    with RouterThread(router_settings([c.url], request_timeout_s=1.0)) as hurried:
        hurried.wait_ready(1)
        cancelled = cancelled_images(idle)
        started = time.monotonic()
        reply = generate(hurried.url, size="256x256", num_inference_steps=100)
        assert reply.status == 504
        assert reply.body["error"]["type"] == "timeout_error" and reply.body["error"]["code"] == "timeout"
        assert time.monotonic() - started < 10
        wait_until(lambda: cancelled_images(idle) == cancelled + 1, 15, "the pod to cancel the image")
        outcomes = scrape(hurried.url)
        assert outcomes.value(metrics.ROUTER_REQUESTS + "_total", backend=c.url, outcome="timeout") == 1


def test_a_client_that_hangs_up_cancels_its_request_at_the_pod(
    idle: list[PodProcess], router: RouterThread
) -> None:
    cancelled = cancelled_images(idle)
    hung_up = scrape(router.url).value(metrics.ROUTER_REQUESTS + "_total", outcome="cancelled")
    held = Held(router.url, size="256x256", num_inference_steps=100).start()
    wait_until(lambda: any(pod_busy(p.url) for p in idle), 30, "the request to reach a pod")
    held.hang_up()
    wait_until(lambda: cancelled_images(idle) == cancelled + 1, 15, "the pod to cancel the image")
    assert scrape(router.url).value(metrics.ROUTER_REQUESTS + "_total", outcome="cancelled") == hung_up + 1
    wait_until(lambda: not any(pod_busy(p.url) for p in idle), 15, "the pod to stop working on it")


def test_no_backends_means_503_with_retry_after(free_port_url: str) -> None:
    with RouterThread(router_settings([])) as empty, RouterThread(router_settings([free_port_url])) as dead:
        for r in (empty, dead):
            reply = generate(r.url)
            assert reply.status == 503
            assert int(reply.headers["Retry-After"]) >= 1
            assert reply.body["error"]["code"] == "no_backends"
            assert get_json(r.url + "/readyz")[0] == 503
            assert get_json(r.url + "/healthz")[0] == 200


@pytest.fixture
def free_port_url() -> str:
    from imagefleet.testing.servers import free_port

    return f"http://127.0.0.1:{free_port()}"


# --- API keys ------------------------------------------------------------------------------------


def test_api_keys(trio: list[PodProcess], tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# mounted Secret\nfile-key-1\n")
    settings = router_settings(
        [trio[0].url], api_keys=("env-key-1", "env-key-2"), api_keys_file=str(key_file)
    )
    with RouterThread(settings) as r:
        r.wait_ready(1)
        for headers in ({}, bearer("wrong"), {"Authorization": "Basic env-key-1"}):
            reply = generate(r.url, headers=headers)
            assert reply.status == 401
            assert reply.body["error"]["type"] == "authentication_error"
            assert "env-key" not in str(reply.body)
        for key in ("env-key-1", "env-key-2", "file-key-1"):
            assert generate(r.url, headers=bearer(key)).status == 200, key

        with pytest.raises(openai.AuthenticationError):
            client(r.url, "wrong").images.generate(prompt="x")
        assert len(client(r.url, "env-key-2").images.generate(prompt="x").data or []) == 1

        for path in ("/healthz", "/readyz"):
            assert get_json(r.url + path)[0] == 200
        for path in ("/metrics", "/stats"):
            assert call("GET", r.url + path).status == 401
            assert call("GET", r.url + path, headers=bearer("env-key-1")).status == 200
        assert call("GET", r.url + "/v1/images/files/x~y.png").status == 401

        key_file.write_text("file-key-2\n")  # a rotated Secret
        wait_until(lambda: generate(r.url, headers=bearer("file-key-2")).status == 200, 10, "the new key")
        assert generate(r.url, headers=bearer("file-key-1")).status == 401

    open_metrics = router_settings([trio[0].url], api_keys=("k",), protect_metrics=False)
    with RouterThread(open_metrics) as r:
        assert call("GET", r.url + "/metrics").status == 200
        assert call("GET", r.url + "/stats").status == 200
        assert generate(r.url).status == 401


def test_router_metrics(router: RouterThread) -> None:
    assert generate(router.url).status == 200
    m = scrape(router.url)
    assert m.value(metrics.ROUTER_REQUESTS + "_total", outcome="ok") >= 1
    assert m.value(metrics.ROUTER_BACKENDS, state="known") == 3
    assert m.value(metrics.ROUTER_BACKENDS, state="healthy") == 3
    assert m.value(metrics.ROUTER_PICK_SECONDS + "_count") >= 1
    assert m.value(metrics.ROUTER_REQUEST_SECONDS + "_count", endpoint="generations") >= 1


def _key_of(file_id: str) -> str | None:
    parsed = wire.parse_file_id(file_id)
    return parsed.key if parsed else None
