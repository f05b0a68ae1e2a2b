"""Batching, seeds, cancellation, backpressure and faults on a real pod (tiny model, CPU).

Queues are built deterministically with the fault-injection hook's ``stall``: the batch on the GPU
pauses at its first step while the test sends the requests that must wait behind it. What ran is
read from the pod's batch log (``/debug/batches``) and its metrics, never from a fake pipeline.
"""

from __future__ import annotations

import base64
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from imagefleet import metrics
from imagefleet.testing.servers import wait_until
from tests.conftest import Pod, PodFactory


def start_blocker(
    pod: Pod, pool: ThreadPoolExecutor, seconds: float, **fields: Any
) -> Future[tuple[int, Any]]:
    """Occupy the GPU: one request whose batch stalls ``seconds`` at its first step."""
    pod.arm("stall", seconds=seconds)
    future = pool.submit(pod.generate, size="64x64", **fields)
    wait_until(lambda: pod.load()["running_samples"] == 1, 30, "the blocker to start")
    return future


def wait_queued(pod: Pod, samples: int) -> None:
    wait_until(lambda: pod.load()["queued_samples"] == samples, 30, f"{samples} queued samples")


def test_compatible_requests_share_a_batch_and_incompatible_ones_do_not(make_pod: PodFactory) -> None:
    pod = make_pod(batch_policy="fill", max_batch_size=4)
    with ThreadPoolExecutor(8) as pool:
        blocker = start_blocker(pod, pool, seconds=3)
        same = [pool.submit(pod.generate, size="64x64", prompt=f"prompt {i}", seed=i) for i in range(4)]
        other = [pool.submit(pod.generate, size="96x64", prompt=f"other {i}") for i in range(2)]
        wait_queued(pod, 6)
        results = [f.result() for f in [blocker, *same, *other]]
    assert all(status == 200 for status, _ in results), results
    runs = pod.batches()[-3:]
    assert [(b["size"], b["width"]) for b in runs] == [(1, 64), (4, 64), (2, 96)]
    # Different prompts and seeds in one batch give different images.
    images = {base64.b64decode(body["data"][0]["b64_json"]) for _, body in results[1:5]}
    assert len(images) == 4
    scrape = metrics.parse(pod.metrics())
    assert scrape.value(metrics.POD_BATCH_SIZE + "_count") == 3
    assert scrape.value(metrics.POD_BATCH_SIZE + "_sum") == 7


def test_n_images_are_samples_that_batch_together(make_pod: PodFactory) -> None:
    pod = make_pod(batch_policy="fill", max_batch_size=8)
    status, body = pod.generate(size="64x64", n=3, seed=11)
    assert status == 200 and len(body["data"]) == 3
    assert pod.batches()[-1]["size"] == 3
    assert len({d["b64_json"] for d in body["data"]}) == 3


def test_same_seed_same_image_and_different_seeds_differ(pod: Pod) -> None:
    def image(seed: int) -> str:
        status, body = pod.generate(size="64x64", prompt="a boat", seed=seed)
        assert status == 200
        return str(body["data"][0]["b64_json"])

    assert image(42) == image(42)
    assert image(42) != image(43)


def test_per_request_steps_and_guidance_are_honoured(pod: Pod) -> None:
    pod.generate(size="64x64", num_inference_steps=7, guidance_scale=3.5)
    last = pod.batches()[-1]
    assert last["steps"] == 7 and last["steps_done"] == 7
    _, a = pod.generate(size="64x64", seed=5, guidance_scale=2.0)
    _, b = pod.generate(size="64x64", seed=5, guidance_scale=9.0)
    assert a["data"][0]["b64_json"] != b["data"][0]["b64_json"]


def raw_request_then_hang_up(url: str, body: bytes, wait_s: float) -> None:
    """Send a request and close the connection without reading the answer, as a client that gave up."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        time.sleep(wait_s)


def test_a_disconnected_clients_queued_work_never_runs(make_pod: PodFactory) -> None:
    pod = make_pod()
    with ThreadPoolExecutor(4) as pool:
        blocker = start_blocker(pod, pool, seconds=3)
        gone = pool.submit(
            raw_request_then_hang_up, pod.url, b'{"prompt": "gone", "size": "128x64", "n": 2}', 0.5
        )
        wait_queued(pod, 2)
        gone.result()
        wait_queued(pod, 0)  # dropped as soon as the hang-up is seen, while the GPU is still busy
        assert blocker.result()[0] == 200
    assert all(b["width"] != 128 for b in pod.batches())
    assert metrics.parse(pod.metrics()).value(metrics.POD_IMAGES + "_total", outcome="cancelled") == 2


def test_a_running_batch_whose_clients_all_left_stops_at_the_next_step(make_pod: PodFactory) -> None:
    pod = make_pod()
    pod.arm("stall", seconds=20)
    started = time.monotonic()
    raw_request_then_hang_up(pod.url, b'{"prompt": "gone", "size": "64x64", "num_inference_steps": 50}', 1.0)
    wait_until(lambda: pod.batches() and pod.batches()[-1]["status"] == "cancelled", 15, "the batch to stop")
    assert time.monotonic() - started < 15  # did not sit out the 20 s stall or run 50 steps
    last = pod.batches()[-1]
    assert last["steps_done"] < 50
    assert pod.load()["running_samples"] == 0
    assert pod.generate(size="64x64")[0] == 200


def test_backpressure_429_with_retry_after_and_accepted_work_completes(make_pod: PodFactory) -> None:
    pod = make_pod(max_queued_images=4, max_images_per_request=4, max_batch_size=2, batch_policy="fill")
    with ThreadPoolExecutor(12) as pool:
        blocker = start_blocker(pod, pool, seconds=3)
        burst = [
            pool.submit(pod.request, "POST", "/v1/images/generations", {"prompt": f"p{i}", "size": "64x64"})
            for i in range(10)
        ]
        answers = [f.result() for f in burst]
        assert blocker.result()[0] == 200
    accepted = [a for a in answers if a[0] == 200]
    refused = [a for a in answers if a[0] == 429]
    assert len(accepted) == 4 and len(refused) == 6, [a[0] for a in answers]
    for _, headers, body in refused:
        assert int(headers["Retry-After"]) >= 1
        assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "queue_full"
    assert all(len(body["data"]) == 1 for _, _, body in accepted)


def test_a_small_request_does_not_wait_behind_larger_shapes_queued_ahead_of_it(make_pod: PodFactory) -> None:
    pod = make_pod(batch_policy="fill", max_batch_size=1)
    with ThreadPoolExecutor(8) as pool:
        blocker = start_blocker(pod, pool, seconds=3)
        large = [pool.submit(pod.generate, size="128x128", prompt=f"large {i}") for i in range(3)]
        wait_queued(pod, 3)
        small = pool.submit(pod.generate, size="64x64", prompt="small")
        wait_queued(pod, 4)
        results = [f.result() for f in [blocker, *large, small]]
    assert all(status == 200 for status, _ in results), results
    # First in first out would run the three large ones first; fair queueing by GPU time lets the
    # small one in after at most one of them.
    assert [b["width"] for b in pod.batches()[-5:]] == [64, 128, 64, 128, 128]


def test_a_request_over_the_gpu_time_ceiling_gets_400_and_the_pod_serves_on(make_pod: PodFactory) -> None:
    pod = make_pod(max_request_gpu_seconds=60.0)
    huge = {"prompt": "x", "size": "2048x2048", "num_inference_steps": 150, "n": 10}  # 6,291 units
    status, _, body = pod.request("POST", "/v1/images/generations", huge)
    assert status == 400, body
    error = body["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "request_too_expensive"
    assert "10 images of 2048x2048 at 150 steps" in error["message"] and "at most 60 s" in error["message"]
    assert pod.generate(size="64x64")[0] == 200  # 0.016 units: far below the ceiling
    assert pod.load()["queued_samples"] == 0


def test_queued_gpu_time_is_bounded_with_429_and_accepted_work_completes(make_pod: PodFactory) -> None:
    bound = 15.0
    pod = make_pod(max_request_gpu_seconds=bound, max_queued_gpu_seconds=bound, max_queued_images=1000)
    # Requests of about a fifth of the bound each, by this machine's measured cost per unit.
    units = bound / 5 / pod.load()["unit_seconds"]
    steps = max(1, min(150, round(units / (64 * 64 / 1e6))))
    with ThreadPoolExecutor(48) as pool:
        blocker = start_blocker(pod, pool, seconds=3)
        accepted: list[Future[tuple[int, dict[str, str], Any]]] = []
        refused: tuple[int, dict[str, str], Any] | None = None
        for i in range(40):
            body = {"prompt": f"p{i}", "size": "64x64", "num_inference_steps": steps}
            future = pool.submit(pod.request, "POST", "/v1/images/generations", body)
            queued = len(accepted) + 1
            wait_until(
                lambda f=future, q=queued: f.done() or pod.load()["queued_samples"] == q, 30, "an answer"
            )
            if future.done():
                refused = future.result()
                break
            accepted.append(future)
        assert refused is not None and accepted, f"{len(accepted)} requests of {steps} steps accepted"
        queued_seconds = pod.load()["queued_seconds"]
        results = [f.result() for f in accepted] + [blocker.result()]
    status, headers, answer = refused
    assert status == 429 and int(headers["Retry-After"]) >= 1, answer
    assert answer["error"]["code"] == "queue_full" and "GPU work" in answer["error"]["message"]
    assert queued_seconds <= bound and all(r[0] == 200 for r in results)


def test_a_device_fault_is_a_retryable_503_and_the_pod_recovers(make_pod: PodFactory) -> None:
    pod = make_pod(quarantine_after=3)
    pod.arm("runtime")  # stands for a GPU error: not the request's fault
    status, headers, body = pod.request("POST", "/v1/images/generations", {"prompt": "x", "size": "64x64"})
    assert status == 503 and int(headers["Retry-After"]) >= 1
    assert body["error"]["type"] == "server_error" and body["error"]["code"] == "device_error"
    assert pod.generate(size="64x64")[0] == 200
    assert pod.request("GET", "/readyz")[0] == 200


def test_repeated_faults_quarantine_the_pod(make_pod: PodFactory) -> None:
    pod = make_pod(quarantine_after=3)
    pod.arm("runtime", count=3)
    assert [pod.generate(size="64x64")[1]["error"]["code"] for _ in range(3)] == ["device_error"] * 3
    status, _, body = pod.request("GET", "/readyz")
    assert status == 503 and body["reason"] == "quarantined"
    status, body = pod.generate(size="64x64")
    assert status == 503 and body["error"]["code"] == "quarantined"
    assert pod.load()["quarantined"] is True
    scrape = metrics.parse(pod.metrics())
    assert scrape.value(metrics.POD_QUARANTINED) == 1
    assert scrape.value(metrics.POD_READY) == 0


def test_out_of_memory_splits_the_batch_and_retries(make_pod: PodFactory) -> None:
    pod = make_pod(batch_policy="fill", max_batch_size=4)
    pod.arm("oom", min_batch=4)
    with ThreadPoolExecutor(8) as pool:
        blocker = start_blocker(pod, pool, seconds=2)
        burst = [pool.submit(pod.generate, size="64x64", prompt=f"p{i}") for i in range(4)]
        wait_queued(pod, 4)
        assert all(f.result()[0] == 200 for f in [blocker, *burst])
        # The pod now knows batches of 4 do not fit: the next burst runs as two batches of 2.
        blocker = start_blocker(pod, pool, seconds=2)
        burst = [pool.submit(pod.generate, size="64x64", prompt=f"q{i}") for i in range(4)]
        wait_queued(pod, 4)
        assert all(f.result()[0] == 200 for f in [blocker, *burst])
    sizes = [b["size"] for b in pod.batches()]
    assert sizes[-2:] == [2, 2]
    assert metrics.parse(pod.metrics()).value(metrics.POD_ERRORS + "_total", kind="oom") == 1
