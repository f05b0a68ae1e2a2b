"""Streamed answers (``stream: true``, ``partial_images``) from a real pod, read with the official
``openai`` client as a user's code would, and with a raw reader for what the client hides."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import openai
import pytest
from PIL import Image

from imagefleet.testing.routers import Held
from imagefleet.testing.servers import wait_until
from imagefleet.testing.streams import EventStream
from tests.conftest import Pod, PodFactory

STEPS = 12
EVENT_META = {"size": "64x64", "quality": "auto", "background": "opaque", "output_format": "png"}


def client(pod: Pod) -> openai.OpenAI:
    return openai.OpenAI(base_url=pod.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def pixels(b64: str) -> np.ndarray[Any, Any]:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.float64)


def distance(a: str, b: str) -> float:
    return float(np.abs(pixels(a) - pixels(b)).mean())


def png_bytes(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buf, "PNG")
    return buf.getvalue()


def stream(pod: Pod, seed: int, partial_images: int) -> list[Any]:
    return list(
        client(pod).images.generate(
            model="tiny",
            prompt="a lighthouse at dusk",
            size="64x64",
            stream=True,
            partial_images=partial_images,
            extra_body={"num_inference_steps": STEPS, "seed": seed},
        )
    )


def test_the_openai_client_iterates_partials_then_the_image_a_plain_request_makes(pod: Pod) -> None:
    events = stream(pod, seed=11, partial_images=3)
    assert [e.type for e in events] == ["image_generation.partial_image"] * 3 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:-1]] == [0, 1, 2]
    for e in events:
        assert {k: getattr(e, k) for k in EVENT_META} == EVENT_META
        assert e.created_at > 0
        assert Image.open(io.BytesIO(base64.b64decode(e.b64_json))).size == (64, 64)
    plain = client(pod).images.generate(
        prompt="a lighthouse at dusk", size="64x64", extra_body={"num_inference_steps": STEPS, "seed": 11}
    )
    assert events[-1].b64_json == plain.data[0].b64_json  # streaming changes nothing about the image


def test_partials_preview_this_samples_own_image_getting_closer(pod: Pod) -> None:
    events = stream(pod, seed=5, partial_images=3)
    final = events[-1].b64_json
    other = stream(pod, seed=6, partial_images=0)[-1].b64_json
    gaps = [distance(e.b64_json, final) for e in events[:-1]]
    assert gaps == sorted(gaps, reverse=True) and gaps[0] > gaps[-1]
    assert gaps[-1] < distance(events[-1].b64_json, other) / 4


def test_partial_images_0_streams_only_the_image(pod: Pod) -> None:
    assert [e.type for e in stream(pod, seed=1, partial_images=0)] == ["image_generation.completed"]


def test_too_few_steps_give_fewer_partials(pod: Pod) -> None:
    events = list(
        client(pod).images.generate(
            prompt="x", size="64x64", stream=True, partial_images=3, extra_body={"num_inference_steps": 2}
        )
    )
    assert [e.type for e in events] == ["image_generation.partial_image", "image_generation.completed"]


def test_edit_streams_image_edit_events(pod: Pod) -> None:
    extra = {"num_inference_steps": STEPS, "seed": 3, "strength": 0.75}
    image = ("in.png", png_bytes((200, 30, 30)), "image/png")
    events = list(
        client(pod).images.edit(
            image=image, prompt="make it blue", stream=True, partial_images=2, extra_body=extra
        )
    )
    assert [e.type for e in events] == ["image_edit.partial_image"] * 2 + ["image_edit.completed"]
    assert [e.partial_image_index for e in events[:-1]] == [0, 1]
    plain = client(pod).images.edit(image=image, prompt="make it blue", extra_body=extra)
    assert events[-1].b64_json == plain.data[0].b64_json


def test_progress_comments_count_the_steps_before_the_image(pod: Pod) -> None:
    with EventStream(pod.url, {"prompt": "x", "stream": True, "num_inference_steps": 6}) as s:
        assert s.status == 200 and s.headers["Content-Type"].startswith("text/event-stream")
        seen = list(s)
    steps = [p for e in seen if (p := e.progress()) is not None]
    # steps that pass faster than they are written are coalesced into the latest
    assert steps[-1] == (6, 6) and {total for _, total in steps} == {6}
    assert [done for done, _ in steps] == sorted({done for done, _ in steps})
    assert seen[-1].name == "image_generation.completed"


def test_n_above_1_with_stream_is_a_clear_400(pod: Pod) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client(pod).images.generate(prompt="x", n=2, stream=True)
    assert info.value.body["param"] == "n"  # type: ignore[index]


def test_a_failure_after_the_stream_began_is_an_error_event(make_pod: PodFactory) -> None:
    pod = make_pod()
    pod.arm("runtime", step=STEPS // 2)
    events = client(pod).images.generate(
        prompt="x", size="64x64", stream=True, partial_images=1, extra_body={"num_inference_steps": STEPS}
    )
    with pytest.raises(openai.APIError) as info:
        for _ in events:
            pass
    assert info.value.code == "device_error"


def test_a_failure_in_the_first_step_is_an_error_event_before_any_other_with_its_status(
    make_pod: PodFactory,
) -> None:
    pod = make_pod()
    pod.arm("runtime")
    with EventStream(pod.url, {"prompt": "x", "stream": True, "partial_images": 2}) as s:
        assert s.status == 200
        seen = list(s)
    assert seen[0].queued_ahead() == 0  # the stream began while the request was queued
    assert [e.name for e in seen if e.name is not None] == ["error"]
    assert [e.error_status() for e in seen if e.error_status() is not None] == [503]
    assert seen[-1].json()["error"]["code"] == "device_error"
    with pytest.raises(openai.APIError) as info:
        pod.arm("runtime")
        stream(pod, seed=1, partial_images=2)
    assert info.value.code == "device_error"


def test_a_queued_stream_is_told_how_many_samples_are_ahead_as_that_falls(make_pod: PodFactory) -> None:
    pod = make_pod(max_batch_size=1)
    pod.arm("stall", seconds=120)  # the first request holds the GPU
    holder = Held(pod.url, num_inference_steps=STEPS).start()
    wait_until(lambda: pod.load()["running_samples"] == 1, 30, "the first batch to start")
    before = Held(pod.url, n=2, num_inference_steps=STEPS).start()
    wait_until(lambda: pod.load()["queued_samples"] == 2, 30, "two samples to queue")
    body = {"prompt": "queued", "stream": True, "partial_images": 1, "num_inference_steps": STEPS}
    with EventStream(pod.url, body) as s:
        seen = iter(s)
        assert next(seen).queued_ahead() == 2
        before.hang_up()  # the two samples ahead leave the queue
        assert next(seen).queued_ahead() == 0
        holder.hang_up()  # the GPU frees: the stream's batch runs
        rest = list(seen)
    names = [e.name for e in rest if e.name is not None]
    assert names == ["image_generation.partial_image", "image_generation.completed"]
    first_step = next(i for i, e in enumerate(rest) if e.progress() is not None)
    assert all(e.queued_ahead() is None for e in rest[first_step:])  # no position once it runs


def test_a_partial_arrives_while_the_batch_runs_and_hanging_up_cancels_it(make_pod: PodFactory) -> None:
    pod = make_pod()
    pod.arm("stall", step=STEPS // 2, seconds=120)  # the batch stalls after the first preview
    body = {"prompt": "x", "stream": True, "partial_images": 1, "num_inference_steps": STEPS}
    with EventStream(pod.url, body) as s:
        first = next(s.events())
        assert first.name == "image_generation.partial_image"
        assert pod.batches() == []  # still running: the partial was not held back until the end
        s.hang_up()
    wait_until(lambda: [b["status"] for b in pod.batches()] == ["cancelled"], 30, "the batch to stop")


def test_a_queued_stream_whose_client_leaves_never_runs(make_pod: PodFactory) -> None:
    pod = make_pod(max_batch_size=1)
    pod.arm("stall", seconds=120)  # the first request holds the GPU
    holder = Held(pod.url, num_inference_steps=STEPS).start()
    wait_until(lambda: pod.load()["running_samples"] == 1, 30, "the first batch to start")
    with EventStream(pod.url, {"prompt": "queued", "stream": True, "partial_images": 2}) as queued:
        wait_until(lambda: pod.load()["queued_samples"] == 1, 30, "the stream to queue")
        queued.hang_up()
    wait_until(lambda: pod.load()["queued_samples"] == 0, 30, "the queued sample to be dropped")
    holder.hang_up()
    wait_until(lambda: [b["status"] for b in pod.batches()] == ["cancelled"], 30, "the held batch to stop")
