"""A bad sample costs only its own request; only the device's failures quarantine a pod; clients
hear no internal error text; edit uploads are read upright; ``GET /v1/models/{id}``.

Real pods (tiny model, CPU) with the fault-injection hook: ``input`` makes a pipeline call raise
as on an input it cannot take, ``runtime`` stands for a GPU error.
"""

from __future__ import annotations

import io
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
from PIL import Image
from urllib3.filepost import encode_multipart_formdata

from imagefleet import metrics
from imagefleet.testing.servers import wait_until
from tests.component.test_pod_batching import start_blocker, wait_queued
from tests.conftest import Pod, PodFactory

EDIT = "/v1/images/edits"
GENERIC = re.compile(r"^The image could not be generated: internal error\. Request id: [0-9a-f]{32}\.$")


def image_bytes(size: tuple[int, int], fmt: str = "PNG", orientation: int | None = None) -> bytes:
    """An image whose left half is black and right half white, optionally with an EXIF orientation."""
    image = Image.new("RGB", size, (0, 0, 0))
    image.paste((255, 255, 255), (size[0] // 2, 0, size[0], size[1]))
    buf = io.BytesIO()
    if orientation is None:
        image.save(buf, fmt)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(buf, fmt, exif=exif)
    return buf.getvalue()


def edit(pod: Pod, fields: dict[str, Any]) -> tuple[int, Any]:
    body, content_type = encode_multipart_formdata(fields)
    status, _, answer = pod.request("POST", EDIT, raw=body, headers={"Content-Type": content_type})
    return status, answer


def assert_serving(pod: Pod) -> None:
    assert pod.request("GET", "/readyz")[0] == 200
    assert pod.load()["quarantined"] is False
    assert pod.generate(size="64x64")[0] == 200


def test_edits_that_leave_no_denoising_step_are_400s_and_never_quarantine(make_pod: PodFactory) -> None:
    pod = make_pod(quarantine_after=3)
    upload = ("a.png", image_bytes((64, 64)), "image/png")
    for _ in range(4):
        status, body = edit(
            pod, {"prompt": "a", "image": upload, "num_inference_steps": "3", "strength": "0.3"}
        )
        assert status == 400 and body["error"]["param"] == "strength", body
        assert "num_inference_steps" in body["error"]["message"]
    assert_serving(pod)
    status, body = edit(pod, {"prompt": "a", "image": upload, "num_inference_steps": "4", "strength": "0.3"})
    assert status == 200, body


def test_a_failing_sample_fails_alone_and_its_batchmates_get_their_images(make_pod: PodFactory) -> None:
    pod = make_pod(batch_policy="fill", max_batch_size=4, quarantine_after=1)
    with ThreadPoolExecutor(4) as pool:
        blocker = start_blocker(pod, pool, seconds=3)
        # the batch of three fails, and so does its first sample alone; the other two then succeed
        pod.arm("input", count=2)
        answers = []
        for i in range(3):
            answers.append(pool.submit(pod.generate, size="64x64", prompt=f"p{i}"))
            wait_queued(pod, i + 1)
        assert blocker.result()[0] == 200
        (bad_status, bad), *rest = [a.result() for a in answers]
    assert bad_status == 500 and bad["error"]["code"] == "generation_failed"
    assert GENERIC.match(bad["error"]["message"]), bad
    assert [status for status, _ in rest] == [200, 200]
    batches = pod.batches()
    assert [b["size"] for b in batches[-1:]] == [3] and batches[-1]["status"] == "partial"
    assert_serving(pod)  # quarantine_after=1, yet an input's failure does not count


def test_failures_that_are_not_the_devices_never_quarantine(make_pod: PodFactory) -> None:
    pod = make_pod(quarantine_after=2)
    pod.arm("input", count=3)
    for _ in range(3):
        status, body = pod.generate(size="64x64")
        assert status == 500 and GENERIC.match(body["error"]["message"]), body
    assert_serving(pod)
    stats = pod.request("GET", "/stats")[2]
    assert stats["quarantined"] is False and stats["global"]["failed"] == 3


def test_quarantine_is_reported_everywhere_without_exception_text(make_pod: PodFactory) -> None:
    pod = make_pod(quarantine_after=2)
    pod.arm("runtime", count=2)
    for _ in range(2):
        status, body = pod.generate(size="64x64")
        assert status == 503 and body["error"]["code"] == "device_error"
        assert "injected" not in body["error"]["message"]
    report = pod.load()
    assert report["quarantined"] is True and report["phase"] == "quarantined" and report["ready"] is False
    assert pod.request("GET", "/readyz")[2]["reason"] == "quarantined"
    assert metrics.parse(pod.metrics()).value(metrics.POD_QUARANTINED) == 1
    stats = pod.request("GET", "/stats")[2]
    last_error = stats["devices"]["cpu"]["last_error"]
    assert stats["quarantined"] is True and last_error and "injected pipeline fault" not in last_error


def test_an_edit_upload_is_read_with_its_exif_orientation(pod: Pod) -> None:
    # stored 32 wide and 64 tall; orientation 6 (rotate 90 degrees) shows it 64 wide, 32 tall
    photo = ("a.jpg", image_bytes((32, 64), "JPEG", orientation=6), "image/jpeg")
    status, body = edit(pod, {"prompt": "a", "image": photo, "num_inference_steps": "2", "strength": "0.5"})
    assert status == 200 and body["size"] == "64x32", body
    # a mask the size of the upright image fits it
    mask = ("m.png", image_bytes((64, 32)), "image/png")
    status, body = edit(pod, {"prompt": "a", "image": photo, "mask": mask, "num_inference_steps": "2"})
    assert status == 200 and body["size"] == "64x32", body


def test_a_model_is_retrievable_by_its_id(pod: Pod) -> None:
    status, _, body = pod.request("GET", "/v1/models/tiny")
    assert status == 200 and body["id"] == "tiny" and body["object"] == "model"
    assert isinstance(body["created"], int) and body["owned_by"] == "imagefleet"
    model = openai.OpenAI(base_url=pod.url + "/v1", api_key="unused", max_retries=0).models.retrieve("tiny")
    assert model.id == "tiny"
    for other in ("dall-e-3", "stabilityai/stable-diffusion-3.5-medium"):
        status, _, body = pod.request("GET", f"/v1/models/{other}")
        assert status == 404 and body["error"]["code"] == "model_not_found", body
        assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"] == "model"


def test_moderation_auto_and_low_are_accepted(pod: Pod) -> None:
    for value in ("auto", "low"):
        status, body = pod.generate(size="64x64", moderation=value)
        assert status == 200, body


def test_a_batch_that_stops_making_progress_fails_liveness_and_refuses_work_until_it_moves(
    make_pod: PodFactory,
) -> None:
    pod = make_pod(stall_after_s=1)
    assert pod.request("GET", "/healthz")[0] == 200
    with ThreadPoolExecutor(2) as pool:
        blocker = start_blocker(pod, pool, seconds=6)  # no denoising step completes for 6 s
        wait_until(lambda: pod.request("GET", "/healthz")[0] == 503, 10, "the stall to be seen")
        assert pod.request("GET", "/healthz")[2] == {"status": "stalled"}
        status, _, body = pod.request("GET", "/readyz")
        assert status == 503 and body["reason"] == "stalled"
        load = pod.load()
        assert load["ready"] is False and load["phase"] == "stalled"
        status, body = pod.generate(size="64x64")
        assert status == 503 and body["error"]["code"] == "stalled", body
        # the batch moves on: its request is answered, and the pod lives and serves again
        assert blocker.result()[0] == 200
    assert pod.request("GET", "/healthz")[0] == 200
    assert_serving(pod)
