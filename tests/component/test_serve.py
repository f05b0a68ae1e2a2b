"""``imagefleet serve`` started exactly as a user starts it, driven by the official openai client."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from PIL import Image

from imagefleet.testing.processes import alive, children
from imagefleet.testing.routers import generate
from imagefleet.testing.servers import free_port, get_json, wait_until


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    url: str
    pod_port: int
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    port, pod_port = free_port(), free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "imagefleet",
                "serve",
                "--model",
                "tiny",
                "--port",
                str(port),
                "--gpus",
                "none",
                "--pod-base-port",
                str(pod_port),
                "--restart-backoff-s",
                "0.5",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    s = Served(proc, f"http://127.0.0.1:{port}", pod_port, log)
    try:
        wait_until(lambda: "imagefleet is ready" in s.output() or proc.poll() is not None, 180, "the banner")
        assert proc.poll() is None, s.output()
        yield s
    finally:
        if proc.poll() is None:
            for pid in children(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait(10)


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_the_banner_says_where_to_send_requests(served: Served) -> None:
    out = served.output()
    assert f"{served.url}/v1" in out
    assert "curl" in out and "from openai import OpenAI" in out
    assert get_json(served.url + "/readyz")[0] == 200


def test_generate_and_edit_with_the_openai_client(served: Served) -> None:
    c = client(served.url)
    result = c.images.generate(prompt="a lighthouse at dusk", n=2, size="64x64")
    assert result.data is not None and len(result.data) == 2
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json or "")))
    assert image.size == (64, 64)

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (0, 0, 200)).save(buf, "PNG")
    edited = c.images.edit(image=("in.png", buf.getvalue(), "image/png"), prompt="a red square")
    assert edited.data is not None and len(edited.data) == 1 and edited.data[0].b64_json

    assert [m.id for m in c.models.list().data] == ["tiny"]


@pytest.mark.slow
def test_a_crashed_pod_is_restarted(served: Served) -> None:
    (pod_pid,) = children(served.proc.pid)
    os.kill(pod_pid, signal.SIGKILL)
    wait_until(lambda: get_json(served.url + "/readyz")[0] == 503, 20, "the router to notice")
    wait_until(lambda: get_json(served.url + "/readyz")[0] == 200, 120, "the restarted pod")
    (new_pid,) = children(served.proc.pid)
    assert new_pid != pod_pid
    assert generate(served.url).status == 200
    assert "restarting" in served.output()


def test_sigterm_drains_and_stops_everything(served: Served) -> None:
    pod_pids = children(served.proc.pid)
    assert len(pod_pids) == 1
    started = time.monotonic()
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(60) == 0, served.output()[-3000:]
    assert time.monotonic() - started < 40
    wait_until(lambda: not any(alive(pid) for pid in pod_pids), 10, "pod processes gone")
    assert "Stopped" in served.output()
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", served.pod_port)) != 0  # nothing listens where the pod was
