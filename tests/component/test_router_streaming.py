"""Streamed answers through the router: relayed as they come, retried only before the first byte,
cancelled upstream when the client leaves."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from PIL import Image

from imagefleet.testing.routers import RouterThread, call, pod_requests, router_settings
from imagefleet.testing.servers import wait_until
from imagefleet.testing.streams import EventStream
from tests.conftest import Pod, PodFactory

STEPS = 12
EXTRA: dict[str, Any] = {"num_inference_steps": STEPS}


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


def test_a_failure_before_the_first_byte_is_retried_on_another_pod(
    routed: tuple[RouterThread, list[Pod]],
) -> None:
    router, pods = routed
    for pod in pods:
        pod.arm("runtime")  # both fail at their first step, before sending anything
    reply = call(
        "POST", router.url + "/v1/images/generations", {"prompt": "x", "stream": True, "partial_images": 1}
    )
    assert reply.status == 503
    assert [pod_requests(p.url) for p in pods] == [1, 1]  # tried on each pod


def test_a_failure_after_the_first_byte_is_not_retried(routed: tuple[RouterThread, list[Pod]]) -> None:
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
