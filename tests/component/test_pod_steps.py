"""Step-level batching (``--batch-mode step``) on a real pod: the SD3-shaped tiny model, CPU.

A running batch is held at one of its steps with the fault-injection hook's ``stall`` while the
test sends the requests that must join it; what ran is read from ``/debug/batches``. Images are
compared within 2 levels of 255, as elsewhere for batching: CPU float32 matrix products are not
bit-identical across batch sizes (about 1e-6 apart), which can move a pixel by one level.
"""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy
import openai
from PIL import Image

from imagefleet import metrics
from imagefleet.testing.servers import wait_until
from tests.component.test_pod_batching import raw_request_then_hang_up, wait_queued
from tests.conftest import Pod, PodFactory

MODEL = "synthetic:sd3-tiny"
STEPS = 12
FIELDS = {"size": "64x64", "num_inference_steps": STEPS}


def pixels(body: dict[str, Any], index: int = 0) -> numpy.ndarray:
    data = base64.b64decode(body["data"][index]["b64_json"])
    return numpy.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def close(a: numpy.ndarray, b: numpy.ndarray) -> bool:
    return bool(numpy.abs(a - b).max() <= 2)


def step_pod(make_pod: PodFactory, **overrides: Any) -> Pod:
    overrides.setdefault("max_batch_size", 8)
    return make_pod(model=MODEL, batch_mode="step", warmup=False, **overrides)


def entries(pod: Pod) -> list[dict[str, Any]]:
    return [b for b in pod.batches() if b["mode"] == "step"]


def test_a_request_alone_makes_the_same_image_in_both_modes(make_pod: PodFactory) -> None:
    request_mode = make_pod(model=MODEL, warmup=False)
    step_mode = step_pod(make_pod)
    status, reference = request_mode.generate(prompt="a fox", seed=5, n=2, **FIELDS)
    assert status == 200
    status, stepped = step_mode.generate(prompt="a fox", seed=5, n=2, **FIELDS)
    assert status == 200
    assert close(pixels(stepped), pixels(reference)) and close(pixels(stepped, 1), pixels(reference, 1))
    assert request_mode.batches()[-1]["mode"] == "request"
    (entry,) = step_mode.batches()
    assert entry["mode"] == "step" and entry["size"] == 2 and entry["steps_done"] == STEPS
    assert (entry["joined_at_step"], entry["left_at_step"]) == (0, STEPS)


def test_a_request_joins_a_running_batch_and_finishes_after_its_own_steps(make_pod: PodFactory) -> None:
    pod = step_pod(make_pod)
    _, alone = pod.generate(prompt="a late fox", seed=9, **FIELDS)
    pod.arm("stall", seconds=5, step=5)
    with ThreadPoolExecutor(4) as pool:
        running = pool.submit(pod.generate, prompt="four", seed=1, n=4, **FIELDS)
        wait_until(lambda: pod.load()["running_samples"] == 4, 30, "the batch of 4 to start")
        late = pool.submit(pod.generate, prompt="a late fox", seed=9, **FIELDS)
        wait_queued(pod, 0)
        wait_until(lambda: pod.load()["running_samples"] == 5, 30, "the late request to join")
        (status, four), (late_status, joined) = running.result(), late.result()
    assert status == 200 and late_status == 200
    assert close(pixels(joined), pixels(alone))  # the seed's image, whoever shared the batch
    first, second = entries(pod)[-2:]
    assert first["size"] == 4 and first["left_at_step"] == STEPS and first["steps_done"] == STEPS
    assert second["size"] == 1 and second["steps_done"] == STEPS and second["peak_batch"] == 5
    assert 1 <= second["joined_at_step"] < STEPS
    assert second["left_at_step"] == second["joined_at_step"] + STEPS
    # its batchmates' images are theirs alone too
    _, four_alone = pod.generate(prompt="four", seed=1, n=4, **FIELDS)
    assert all(close(pixels(four, i), pixels(four_alone, i)) for i in range(4))


def test_a_cancelled_request_leaves_at_the_next_step_and_the_others_finish(make_pod: PodFactory) -> None:
    pod = step_pod(make_pod)
    _, alone = pod.generate(prompt="stays", seed=3, **FIELDS)
    # The second request joins within the batch's first steps, and its client hangs up while the
    # batch is held at step 6: before its batchmate is done, whatever this machine's speed.
    pod.arm("stall", seconds=10, step=6)
    with ThreadPoolExecutor(4) as pool:
        stays = pool.submit(pod.generate, prompt="stays", seed=3, **FIELDS)
        wait_until(lambda: pod.load()["running_samples"] == 1, 30, "the batch to start")
        body = b'{"prompt": "gone", "size": "64x64", "num_inference_steps": 12, "n": 2}'
        gone = pool.submit(raw_request_then_hang_up, pod.url, body, 5.0)
        wait_until(lambda: pod.load()["running_samples"] == 3, 5, "the second request to join")
        gone.result()
        status, kept = stays.result()
    assert status == 200 and close(pixels(kept), pixels(alone))
    cancelled = [b for b in entries(pod) if b["status"] == "cancelled"]
    assert len(cancelled) == 1 and cancelled[0]["size"] == 2 and cancelled[0]["left_at_step"] < STEPS
    assert entries(pod)[-1]["status"] == "ok" and entries(pod)[-1]["steps_done"] == STEPS
    assert metrics.parse(pod.metrics()).value(metrics.POD_IMAGES + "_total", outcome="cancelled") == 2
    assert pod.load()["running_samples"] == 0


def test_the_fast_tier_and_edits_batch_per_request(make_pod: PodFactory) -> None:
    pod = step_pod(make_pod, tiers="lossless,fast")
    status, _ = pod.generate(prompt="a fox", seed=5, tier="fast", **FIELDS)
    assert status == 200
    assert pod.batches()[-1]["mode"] == "request"
    assert pod.generate(prompt="a fox", seed=5, **FIELDS)[0] == 200
    assert pod.batches()[-1]["mode"] == "step"


def test_a_device_fault_fails_the_running_batch_with_a_retryable_503(make_pod: PodFactory) -> None:
    pod = step_pod(make_pod, quarantine_after=3)
    pod.arm("runtime", step=3)
    status, body = pod.generate(prompt="x", n=2, **FIELDS)
    assert status == 503 and body["error"]["code"] == "device_error"
    assert entries(pod)[-1]["status"] == "failed"
    assert pod.generate(prompt="x", **FIELDS)[0] == 200


def test_an_input_error_is_retried_sample_by_sample_and_costs_no_image(make_pod: PodFactory) -> None:
    pod = step_pod(make_pod, batch_policy="fill")  # the 3 samples start together
    _, alone = pod.generate(prompt="p", seed=4, n=3, **FIELDS)
    pod.arm("input", min_batch=2, step=4)
    status, body = pod.generate(prompt="p", seed=4, n=3, **FIELDS)
    assert status == 200 and all(close(pixels(body, i), pixels(alone, i)) for i in range(3))
    last = entries(pod)[-1]
    assert last["size"] == 3 and last["status"] == "ok" and last["peak_batch"] == 3
    scrape = metrics.parse(pod.metrics())
    assert scrape.value(metrics.POD_ERRORS + "_total", kind="injected_input") == 1


def test_a_streamed_request_gets_its_partial_images_in_a_step_level_batch(make_pod: PodFactory) -> None:
    pod = step_pod(make_pod)
    _, plain = pod.generate(prompt="a lighthouse", seed=11, **FIELDS)
    client = openai.OpenAI(base_url=pod.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    pod.arm("stall", seconds=4, step=2)
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(pod.generate, prompt="first", seed=1, **FIELDS)
        wait_until(lambda: pod.load()["running_samples"] == 1, 30, "the batch to start")
        events = list(
            client.images.generate(
                model=MODEL,
                prompt="a lighthouse",
                size="64x64",
                stream=True,
                partial_images=2,
                extra_body={"num_inference_steps": STEPS, "seed": 11},
            )
        )
        assert running.result()[0] == 200
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    final = {"data": [{"b64_json": events[-1].b64_json}]}
    assert close(pixels(final), pixels(plain))
    joined = [b for b in entries(pod) if b["size"] == 1 and b["joined_at_step"] > 0]
    assert joined and joined[-1]["left_at_step"] == joined[-1]["joined_at_step"] + STEPS
