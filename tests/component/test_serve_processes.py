"""``imagefleet serve`` and its pod processes when things go wrong: the parent SIGKILLed, a port
already taken, a stranger on a pod's port, a pod that quarantines itself.

Every test runs the real command in a subprocess, as a user runs it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagefleet.testing.processes import alive, children
from imagefleet.testing.routers import RouterThread, call, generate, router_settings
from imagefleet.testing.servers import PodProcess, free_port, get_json, wait_until
from tests.component.test_serve import Served

START_S = 180.0


class Serve:
    """Starts ``imagefleet serve`` processes and kills whatever they left when the test ends."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[Served] = []
        self.pids: set[int] = set()

    def start(self, *extra: str, port: int = 0, pod_port: int = 0, name: str = "serve") -> Served:
        port, pod_port = port or free_port(), pod_port or free_port()
        log = self.tmp_path / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    sys.executable, "-m", "imagefleet", "serve",
                    "--model", "tiny",
                    "--gpus", "none",
                    "--port", str(port),
                    "--pod-base-port", str(pod_port),
                    "--restart-backoff-s", "0.5",
                    *extra,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
        served = Served(proc, f"http://127.0.0.1:{port}", pod_port, log)
        self.started.append(served)
        return served

    def ready(self, served: Served) -> Served:
        wait_until(
            lambda: "imagefleet is ready" in served.output() or served.proc.poll() is not None,
            START_S,
            "the banner",
        )
        assert served.proc.poll() is None, served.output()
        self.pids.update(children(served.proc.pid))
        return served

    def cleanup(self) -> None:
        for served in self.started:
            if served.proc.poll() is None:
                self.pids.update(children(served.proc.pid))
                served.proc.kill()
                served.proc.wait(10)
        for pid in self.pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    s = Serve(tmp_path)
    yield s
    s.cleanup()


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_pods_die_with_a_sigkilled_serve_and_a_new_serve_takes_their_ports(serve: Serve) -> None:
    first = serve.ready(serve.start(name="first"))
    pod_pids = children(first.proc.pid)
    assert len(pod_pids) == 1
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    wait_until(lambda: not any(alive(pid) for pid in pod_pids), 10, "the orphaned pod gone")
    wait_until(lambda: not listening(first.pod_port), 10, "the pod's port free")

    port = int(first.url.rsplit(":", 1)[1])
    second = serve.ready(serve.start(port=port, pod_port=first.pod_port, name="second"))
    assert generate(second.url).status == 200
    (new_pod,) = children(second.proc.pid)
    assert new_pod not in pod_pids
    assert "exited with" not in second.output()  # its own pod started once and stayed up


@pytest.mark.parametrize("taken", ["pod", "router"])
def test_a_taken_port_is_one_clear_error_and_a_nonzero_exit(serve: Serve, taken: str) -> None:
    port, pod_port = free_port(), free_port()
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", pod_port if taken == "pod" else port))
        squatter.listen()
        served = serve.start(port=port, pod_port=pod_port)
        code = served.proc.wait(60)
    out = served.output()
    assert code != 0, out
    taken_port = pod_port if taken == "pod" else port
    errors = [line for line in out.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and f"port {taken_port} " in errors[0] and "not available" in errors[0], out
    assert "Traceback" not in out
    assert "Started pod" not in out  # checked before anything was started


def test_the_router_ignores_a_backend_that_reports_another_instance(tmp_path: Path) -> None:
    with PodProcess(("--model", "tiny", "--instance-id", "someone-else"), log_dir=tmp_path) as pod:
        pod.wait_ready()
        with RouterThread(router_settings([f"{pod.url}#mine"], eject_after=1)) as stranger:
            wait_until(lambda: stranger.view()[pod.url]["ejected"], 20, "the stranger ejected")
            assert stranger.view()[pod.url]["accepting"] is False
            assert get_json(stranger.url + "/readyz")[0] == 503
            reply = generate(stranger.url)
            assert reply.status == 503, reply.body
        with RouterThread(router_settings([f"{pod.url}#someone-else"])) as own:
            own.wait_ready()
            assert generate(own.url).status == 200


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["quarantined", "stalled"])
def test_a_quarantined_or_stalled_pod_is_replaced_by_the_supervisor(serve: Serve, failure: str) -> None:
    flags = ["--quarantine-after", "1"] if failure == "quarantined" else ["--stall-after-s", "1"]
    served = serve.ready(serve.start("--fault-injection", *flags, "--health-interval-s", "0.2"))
    (pod_pid,) = children(served.proc.pid)
    pod_url = f"http://127.0.0.1:{served.pod_port}"
    if failure == "quarantined":
        assert call("POST", pod_url + "/debug/faults", {"kind": "runtime", "count": 1}).status == 200
        assert generate(pod_url).body["error"]["code"] == "device_error"  # that quarantines the pod
    else:  # a batch that makes no progress for far longer than the limit: a hung GPU
        assert call("POST", pod_url + "/debug/faults", {"kind": "stall", "seconds": 300}).status == 200
        answers: list[object] = []

        def send() -> None:
            try:
                answers.append(generate(pod_url).status)
            except OSError as exc:  # cut off when the hung pod is killed
                answers.append(exc)

        stuck = threading.Thread(target=send, daemon=True)
        stuck.start()
    wait_until(lambda: f"reports itself {failure}" in served.output(), 20, "the supervisor noticing")
    wait_until(lambda: children(served.proc.pid) not in ([], [pod_pid]), 60, "a new pod process")
    wait_until(lambda: get_json(served.url + "/readyz")[0] == 200, START_S, "the new pod ready")
    assert not alive(pod_pid)
    assert generate(served.url).status == 200
    assert "replaced" in served.output()
    if failure == "stalled":  # the request on the hung GPU was cut off or refused, never an image
        stuck.join(60)
        assert answers and answers[0] != 200, answers


def test_prompts_are_not_logged_even_at_debug_level(serve: Serve) -> None:
    served = serve.ready(serve.start("--log-level", "debug"))
    secret = "a-private-prompt-7f3a9c"
    assert generate(served.url, prompt=secret).status == 200
    refused = generate(served.url, prompt=secret + "-refused", n=1000)
    assert refused.status == 400, refused.body
    broken = call("POST", served.url + "/v1/images/generations", {"prompt": secret, "size": "huge"})
    assert broken.status == 400, broken.body
    out = served.output()
    assert "DEBUG" in out  # the level took effect: there was something to leak into
    assert secret not in out
