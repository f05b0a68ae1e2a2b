"""Streamed answers through the router: relayed as they come, retried on another pod while the
client has seen only comments (a pod that fails or dies while the request is queued), never after
the first event, cancelled upstream when the client leaves."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from PIL import Image

from imagefleet import metrics
from imagefleet.testing.routers import Held, RouterThread, call, pod_requests, router_settings, scrape
from imagefleet.testing.servers import UNBOUNDED_WORK, get_json, pods, wait_until
from imagefleet.testing.streams import EventStream
from tests.conftest import Pod, PodFactory

STEPS = 12
EXTRA: dict[str, Any] = {"num_inference_steps": STEPS}
RETRIES = metrics.ROUTER_RETRIES + "_total"


@pytest.fixture
def routed(make_pod: PodFactory) -> Iterator[tuple[RouterThread, list[Pod]]]:
    pods = [make_pod(), make_pod()]
    with RouterThread(router_settings([p.url for p in pods])) as router:
        router.wait_ready(backends=2)
        yield router, pods


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_the_openai_client_streams_through_the_router_unchanged(
    routed: tuple[RouterThread, list[Pod]],
) -> None:
    router, pods = routed
    direct = list(
        client(pods[0].url).images.generate(
            prompt="a lighthouse",
            size="64x64",
            stream=True,
            partial_images=2,
            extra_body={**EXTRA, "seed": 4},
        )
    )
    relayed = list(
        client(router.url).images.generate(
            prompt="a lighthouse",
            size="64x64",
            stream=True,
            partial_images=2,
            extra_body={**EXTRA, "seed": 4},
        )
    )
    assert [e.type for e in relayed] == ["image_generation.partial_image"] * 2 + [
        "image_generation.completed"
    ]
    assert [(e.type, e.b64_json) for e in relayed] == [(e.type, e.b64_json) for e in direct]
    edit = list(
        client(router.url).images.edit(
            image=("in.png", _png(), "image/png"),
            prompt="blue",
            stream=True,
            partial_images=1,
            extra_body=EXTRA,
        )
    )
    assert [e.type for e in edit] == ["image_edit.partial_image", "image_edit.completed"]


def test_a_partial_is_relayed_before_the_pod_finishes_and_hanging_up_cancels_upstream(
    routed: tuple[RouterThread, list[Pod]],
) -> None:
    router, pods = routed
    for pod in pods:  # whichever pod gets it stalls after the first preview
        pod.arm("stall", step=STEPS // 2, seconds=120)
    body = {"prompt": "x", "stream": True, "partial_images": 1, **EXTRA}
    with EventStream(router.url, body) as s:
        first = next(s.events())
        assert first.name == "image_generation.partial_image"
        assert all(pod.batches() == [] for pod in pods)  # the pod is still at work: nothing buffered
        s.hang_up()

    def cancelled() -> bool:
        return [b["status"] for pod in pods for b in pod.batches()] == ["cancelled"]

    wait_until(cancelled, 30, "the pod's batch to stop")


def test_a_failure_before_the_first_event_is_retried_on_another_pod(
    routed: tuple[RouterThread, list[Pod]],
) -> None:
    router, pods = routed
    for pod in pods:
        pod.arm("runtime")  # both fail at their first step, having sent only comments
    with EventStream(router.url, {"prompt": "x", "stream": True, "partial_images": 1}) as s:
        assert s.status == 200
        seen = list(s)
    assert seen[0].queued_ahead() == 0  # the first pod's comment reached the client
    errors = [e for e in seen if e.name is not None]
    assert [e.name for e in errors] == ["error"]  # one error event, the last pod's
    assert errors[0].json()["error"]["code"] == "device_error"
    assert [pod_requests(p.url) for p in pods] == [1, 1]  # tried on each pod
    assert scrape(router.url).value(RETRIES, reason="stream_failed") == 1


def queued_on(pods: list[Pod]) -> Pod:
    wait_until(lambda: any(p.load()["queued_samples"] == 1 for p in pods), 30, "the stream to queue")
    return next(p for p in pods if p.load()["queued_samples"] == 1)


def test_a_stream_failing_while_queued_is_retried_and_the_openai_client_gets_its_image(
    make_pod: PodFactory,
) -> None:
    pods = [make_pod(max_batch_size=1), make_pod(max_batch_size=1)]
    holders = {}
    for pod in pods:  # each pod's GPU is held, so the stream queues wherever it goes
        pod.arm("stall", seconds=120)
        holders[pod.url] = Held(pod.url, num_inference_steps=STEPS).start()
    wait_until(lambda: all(p.load()["running_samples"] == 1 for p in pods), 30, "both pods busy")
    with RouterThread(router_settings([p.url for p in pods])) as router:
        router.wait_ready(backends=2)
        events: list[Any] = []
        failures: list[BaseException] = []

        def consume() -> None:
            try:
                stream = client(router.url).images.generate(
                    prompt="x", size="64x64", stream=True, partial_images=2, extra_body=EXTRA
                )
                events.extend(stream)
            except BaseException as exc:
                failures.append(exc)

        reader = threading.Thread(target=consume)
        reader.start()
        first = queued_on(pods)
        other = next(p for p in pods if p is not first)
        first.arm("runtime")  # the stream's batch fails in its first step
        holders[first.url].hang_up()
        wait_until(lambda: other.load()["queued_samples"] == 1, 60, "the stream retried on the other pod")
        holders[other.url].hang_up()
        reader.join(120)
        assert not failures
        assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + [
            "image_generation.completed"
        ]
        assert scrape(router.url).value(RETRIES, reason="stream_failed") == 1


POD_ARGS = ("--model", "tiny", "--max-batch-size", "1", "--fault-injection", *UNBOUNDED_WORK)


def test_a_pod_killed_while_a_stream_is_queued_there_is_retried_on_the_other(tmp_path: Path) -> None:
    with pods(2, POD_ARGS, log_dir=tmp_path) as started:
        urls = [p.url for p in started]
        holders = {}
        for url in urls:
            assert call("POST", url + "/debug/faults", {"kind": "stall", "seconds": 120}).status == 200
            holders[url] = Held(url, num_inference_steps=STEPS).start()

        def load(url: str) -> dict[str, Any]:
            return dict(get_json(url + "/v1/load")[1])

        wait_until(lambda: all(load(u)["running_samples"] == 1 for u in urls), 30, "both pods busy")
        with RouterThread(router_settings(urls)) as router:
            router.wait_ready(backends=2)
            body = {"prompt": "x", "size": "64x64", "stream": True, "partial_images": 2, **EXTRA}
            with EventStream(router.url, body) as s:
                seen = iter(s)
                assert next(seen).queued_ahead() == 0  # relayed from the pod it queued on
                victim = next(p for p in started if load(p.url)["queued_samples"] == 1)
                survivor = next(u for u in urls if u != victim.url)
                victim.kill()
                wait_until(lambda: load(survivor)["queued_samples"] == 1, 60, "the stream on the other pod")
                holders[survivor].hang_up()
                rest = list(seen)
            events = [e for e in rest if e.name is not None]
            assert [e.name for e in events] == ["image_generation.partial_image"] * 2 + [
                "image_generation.completed"
            ]
            for e in events:
                assert Image.open(io.BytesIO(base64.b64decode(e.json()["b64_json"]))).size == (64, 64)
            assert scrape(router.url).value(RETRIES, reason="stream_failed") == 1


def test_a_failure_after_the_first_event_is_not_retried(routed: tuple[RouterThread, list[Pod]]) -> None:
    router, pods = routed
    for pod in pods:
        pod.arm("runtime", step=STEPS // 2)
    events = client(router.url).images.generate(
        prompt="x", size="64x64", stream=True, partial_images=1, extra_body=EXTRA
    )
    seen: list[str] = []
    with pytest.raises(openai.APIError) as info:
        for e in events:
            seen.append(e.type)
    assert seen == ["image_generation.partial_image"] and info.value.code == "device_error"
    assert sum(pod_requests(p.url) for p in pods) == 1  # the stream had begun: no second pod


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 10)).save(buf, "PNG")
    return buf.getvalue()
