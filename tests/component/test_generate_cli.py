"""``imagefleet generate`` run as a user runs it (a subprocess) against ``imagefleet serve``."""

from __future__ import annotations

import base64
import io
import os
import pty
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy
import openai
import pytest
from PIL import Image

from imagefleet.testing.routers import Held
from imagefleet.testing.servers import free_port, wait_until
from tests.conftest import PodFactory

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def router_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    args = ["--model", "tiny", "--port", str(port), "--gpus", "none", "--pod-base-port", str(free_port())]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "imagefleet", "serve", *args, "--api-keys", KEY],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
    try:
        ready = lambda: "imagefleet is ready" in log.read_text(errors="replace") or proc.poll() is not None  # noqa: E731
        wait_until(ready, 180, "the banner")
        assert proc.poll() is None, log.read_text(errors="replace")
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)


def generate(
    *args: str, key: str | None = KEY, variable: str = "IMAGEFLEET_API_KEY"
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("IMAGEFLEET_API_KEY", "OPENAI_API_KEY")}
    if key is not None:
        env[variable] = key
    return subprocess.run(
        [sys.executable, "-m", "imagefleet", "generate", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result
    assert result.stdout == "" and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imagefleet generate: "), result.stderr
    return lines[0]


def test_n_images_are_written_by_seed_and_are_the_apis_images(router_url: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = generate("a lighthouse at dusk", "-n", "2", "--size", "64x64", "--seed", "100", "-o", str(out),
                      "--url", router_url)  # fmt: skip
    assert result.returncode == 0, result.stderr
    paths = [out / "100.png", out / "101.png"]
    assert result.stdout.split() == [str(p) for p in paths]
    client = openai.OpenAI(base_url=router_url + "/v1", api_key=KEY, max_retries=0)
    same = client.images.generate(prompt="a lighthouse at dusk", n=2, size="64x64", extra_body={"seed": 100})
    for path, item in zip(paths, same.data or [], strict=True):
        assert Image.open(path).size == (64, 64)
        # The same seeds make the same images up to float rounding: which samples share a batch
        # (the command's requests may be batched apart, the API's n=2 together) changes the last
        # bits of the CPU's matrix products, so compare pixels, not PNG bytes.
        mine = numpy.asarray(Image.open(path).convert("RGB"), dtype=numpy.int16)
        theirs = numpy.asarray(
            Image.open(io.BytesIO(base64.b64decode(item.b64_json or ""))).convert("RGB"), dtype=numpy.int16
        )
        assert numpy.abs(mine - theirs).max() <= 2


def test_the_key_may_come_from_openai_api_key_or_the_flag(router_url: str, tmp_path: Path) -> None:
    flag = generate("x", "--size", "64x64", "--seed", "1", "-o", str(tmp_path), "--url", router_url,
                    "--api-key", KEY, key=None)  # fmt: skip
    assert flag.returncode == 0, flag.stderr
    variable = generate("x", "--size", "64x64", "--seed", "2", "-o", str(tmp_path), "--url", router_url,
                        variable="OPENAI_API_KEY")  # fmt: skip
    assert variable.returncode == 0, variable.stderr
    assert (tmp_path / "1.png").exists() and (tmp_path / "2.png").exists()


def test_a_wrong_key_is_one_line_401(router_url: str, tmp_path: Path) -> None:
    line = one_line_error(generate("x", "-o", str(tmp_path), "--url", router_url, key="wrong"))
    assert "401" in line and "API key" in line


def test_a_bad_size_is_one_line_400(router_url: str, tmp_path: Path) -> None:
    line = one_line_error(generate("x", "--size", "65x64", "-o", str(tmp_path), "--url", router_url))
    assert "400" in line and "65x64" in line


def test_nothing_listening_is_one_line(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    line = one_line_error(generate("x", "-o", str(tmp_path), "--url", url))
    assert f"cannot reach {url}: connection refused" in line


def test_a_full_queue_is_one_line_429(make_pod: PodFactory, tmp_path: Path) -> None:
    pod = make_pod(max_queued_images=1, max_images_per_request=1, max_batch_size=1)
    pod.arm("stall", seconds=60)  # the first image holds the GPU; one waits; the third finds no room
    line = one_line_error(generate("x", "-n", "3", "-o", str(tmp_path), "--url", pod.url))
    assert "429" in line and "retry after" in line


def test_a_failed_gpu_is_one_line(make_pod: PodFactory, tmp_path: Path) -> None:
    pod = make_pod()
    pod.arm("runtime")  # fails the first step: the stream, already begun, carries an error event
    line = one_line_error(generate("x", "-o", str(tmp_path), "--url", pod.url))
    assert "GPU failed" in line


def test_the_progress_line_shows_the_queue_position_then_the_steps(
    make_pod: PodFactory, tmp_path: Path
) -> None:
    pod = make_pod(max_batch_size=1)
    pod.arm("stall", seconds=120)  # the first request holds the GPU
    holder = Held(pod.url, num_inference_steps=6).start()
    wait_until(lambda: pod.load()["running_samples"] == 1, 30, "the first batch to start")
    ahead = Held(pod.url, num_inference_steps=6).start()
    wait_until(lambda: pod.load()["queued_samples"] == 1, 30, "one sample to queue")
    terminal, stderr = pty.openpty()  # the progress line is drawn on a terminal only
    env = {**os.environ, "IMAGEFLEET_API_KEY": KEY}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "imagefleet",
            "generate",
            "x",
            "--steps",
            "6",
            "-o",
            str(tmp_path),
            "--url",
            pod.url,
        ],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=env,
    )
    os.close(stderr)
    shown: list[str] = []
    reader = threading.Thread(target=_read_all, args=(terminal, shown), daemon=True)
    reader.start()
    try:
        wait_until(lambda: "queued: 1 ahead" in "".join(shown), 60, "the position on the progress line")
        ahead.hang_up()
        wait_until(lambda: "queued: 0 ahead" in "".join(shown), 60, "the position falling")
        holder.hang_up()
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(10)
    assert proc.returncode == 0, "".join(shown)
    assert len(out.split()) == 1 and Path(out.strip()).is_file()
    text = "".join(shown)
    assert text.index("queued: 1 ahead") < text.index("queued: 0 ahead") < text.index("steps")


def _read_all(fd: int, into: list[str]) -> None:
    try:
        while chunk := os.read(fd, 4096):
            into.append(chunk.decode(errors="replace"))
    except OSError:  # the other end closed
        pass
    finally:
        os.close(fd)
