"""Local mode's plan: which GPUs, which pod processes with which flags, and what it prints."""

from __future__ import annotations

import socket

import pytest

from imagefleet import settings
from imagefleet.localmode import (
    PortTaken,
    banner,
    check_port,
    plan_pods,
    pod_command,
    public_url,
    restart_delay,
    select_gpus,
)
from imagefleet.router.discovery import static_backends
from imagefleet.settings import PodSettings, ServeSettings


def test_gpu_selection() -> None:
    assert select_gpus("none", env={}) == []
    assert select_gpus("0, 2", env={}) == ["0", "2"]
    assert select_gpus("all", env={"CUDA_VISIBLE_DEVICES": "3,5"}) == ["3", "5"]
    assert select_gpus("all", env={"CUDA_VISIBLE_DEVICES": ""}) == []
    assert select_gpus("all", env={"CUDA_VISIBLE_DEVICES": "-1"}) == []


def test_one_pod_per_gpu_on_consecutive_ports() -> None:
    local = settings.load(ServeSettings, {}, env={}, pod_base_port=9000)
    plans = plan_pods(["0", "3"], local)
    assert [(p.name, p.port, p.cuda_visible_devices) for p in plans] == [
        ("gpu0", 9000, "0"),
        ("gpu3", 9001, "3"),
    ]
    assert plans[1].url == "http://127.0.0.1:9001"


def test_cpu_pods_see_no_gpu() -> None:
    local = settings.load(ServeSettings, {}, env={}, cpu_pods=2)
    assert [(p.name, p.cuda_visible_devices) for p in plan_pods([], local)] == [("cpu0", ""), ("cpu1", "")]


def test_pod_command_listens_on_loopback() -> None:
    local = settings.load(ServeSettings, {}, env={})
    (plan,) = plan_pods(["0"], local)
    cmd = pod_command(settings.load(PodSettings, {}, env={}), plan)
    assert cmd[1:4] == ["-m", "imagefleet", "pod"]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == str(plan.port)


def test_each_pod_gets_an_instance_id_of_this_run_that_the_router_expects() -> None:
    local = settings.load(ServeSettings, {}, env={}, cpu_pods=2)
    plans = plan_pods([], local, "run1")
    assert [p.instance_id for p in plans] == ["run1-cpu0", "run1-cpu1"]
    cmd = pod_command(settings.load(PodSettings, {}, env={}), plans[1])
    assert cmd[cmd.index("--instance-id") + 1] == "run1-cpu1"
    assert cmd.count("--instance-id") == 1
    (backend,) = static_backends([plans[1].backend]).values()
    assert backend.url == plans[1].url and backend.instance_id == "run1-cpu1"
    assert backend.owns("run1-cpu1") and not backend.owns("run0-cpu1") and not backend.owns("")


def test_a_port_with_a_listener_is_taken() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.listen()
        with pytest.raises(PortTaken, match=f"port {port} on 127.0.0.1 \\(test\\)"):
            check_port("127.0.0.1", port, "test")
    check_port("127.0.0.1", port, "test")


def test_restart_backoff() -> None:
    assert [restart_delay(n, 1.0) for n in (1, 2, 3, 8)] == [1.0, 2.0, 4.0, 60.0]


@pytest.mark.parametrize(
    "host,url",
    [
        ("127.0.0.1", "http://127.0.0.1:8000"),
        ("0.0.0.0", "http://127.0.0.1:8000"),
        ("::1", "http://[::1]:8000"),
    ],
)
def test_public_url(host: str, url: str) -> None:
    assert public_url(host, 8000) == url


def test_the_banner_shows_curl_and_python_and_never_a_key() -> None:
    local = settings.load(ServeSettings, {}, env={})
    text = banner("http://127.0.0.1:8000", "tiny", plan_pods([], local), keys=True)
    assert "curl -s http://127.0.0.1:8000/v1/images/generations" in text
    assert 'OpenAI(base_url="http://127.0.0.1:8000/v1"' in text
    assert "Bearer $API_KEY" in text and 'api_key=os.environ["API_KEY"]' in text
    assert "(CPU)" in text
