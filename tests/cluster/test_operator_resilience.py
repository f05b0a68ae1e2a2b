"""The operator, the inference pods and the router as separate processes that die: the operator
killed mid-reconcile, two operator replicas, an inference pod SIGKILLed mid-batch, the router
SIGKILLed, the control plane (apiserver, controller-manager, scheduler) down for 30 s.

These start ``imagefleet operator`` as real processes (SIGKILL must be able to hit it half-way),
each watching only the test's namespace.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from imagefleet import metrics, wire
from imagefleet.devcluster.controlplane import ControlPlane
from imagefleet.testing.routers import Held, generate, pod_busy, scrape
from imagefleet.testing.wait import until
from tests.cluster.conftest import Tools
from tests.cluster.test_operator import Generator, Traffic

START_S = 120.0
APISERVER_DOWN_S = 30.0
CONTROL_PLANE = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
LONG = {"size": "256x256", "num_inference_steps": 60}
"""A request that keeps a tiny pod's batch running for a while (the CPU is shared)."""
MEDIUM = {"size": "128x128", "num_inference_steps": 40}


class OperatorProcess:
    def __init__(self, plane: ControlPlane, namespace: str, log: Path, *extra: str, name: str = "op") -> None:
        self.log = log
        env = {
            **os.environ,
            "KUBECONFIG": str(plane.kubeconfig),
            "POD_NAME": name,
            "POD_NAMESPACE": namespace,
        }
        argv = [
            sys.executable, "-m", "imagefleet", "operator",
            "--namespaces", namespace,
            "--health-port", "0",
            "--status-interval-s", "2",
            "--scrape-timeout-s", "1",
            "--prestop-delay-s", "1",
            *extra,
        ]  # fmt: skip
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def processes() -> Iterator[list[OperatorProcess]]:
    started: list[OperatorProcess] = []
    yield started
    for p in started:
        p.stop()


@pytest.fixture
def generator(tools: Tools, api_client: Any, namespace: str, imagegenerator_crd: str) -> Generator:
    return Generator(tools, api_client, namespace)


def owned_counts(api_client: Any, namespace: str) -> dict[str, int]:
    core, apps = client.CoreV1Api(api_client), client.AppsV1Api(api_client)
    selector = f"{wire.LABEL_GENERATOR}=tiny"
    return {
        "services": len(core.list_namespaced_service(namespace, label_selector=selector).items),
        "deployments": len(apps.list_namespaced_deployment(namespace, label_selector=selector).items),
        "configmaps": len(core.list_namespaced_config_map(namespace, label_selector=selector).items),
    }


def test_an_operator_killed_mid_reconcile_converges_without_duplicates(
    control_plane: ControlPlane,
    generator: Generator,
    processes: list[OperatorProcess],
    tmp_path: Path,
    api_client: Any,
) -> None:
    first = OperatorProcess(control_plane, generator.namespace, tmp_path / "first.log")
    processes.append(first)
    generator.apply(replicas=4)
    until(lambda: len(generator.pods()) >= 1, timeout=60, what="the first pods created", describe=first.text)
    first.kill()  # mid-way: some pods exist, none is ready yet
    assert len(generator.pods()) <= 4
    second = OperatorProcess(control_plane, generator.namespace, tmp_path / "second.log")
    processes.append(second)
    generator.wait_serving(4, timeout=START_S + 60)
    pods = generator.pods()
    slots = sorted(p.metadata.labels[wire.LABEL_SLOT] for p in pods)
    assert slots == ["0", "1", "2", "3"]
    assert owned_counts(api_client, generator.namespace) == {"services": 2, "deployments": 1, "configmaps": 1}
    assert "Traceback" not in second.text()


def test_two_replicas_take_turns_with_a_lease(
    control_plane: ControlPlane,
    generator: Generator,
    processes: list[OperatorProcess],
    tmp_path: Path,
    api_client: Any,
) -> None:
    ns = generator.namespace
    lease_args = ("--leader-election", "--lease-namespace", ns, "--lease-duration-s", "6")
    a = OperatorProcess(control_plane, ns, tmp_path / "a.log", *lease_args, name="op-a")
    b = OperatorProcess(control_plane, ns, tmp_path / "b.log", *lease_args, name="op-b")
    processes += [a, b]
    coordination = client.CoordinationV1Api(api_client)

    def holder() -> str | None:
        try:
            lease = coordination.read_namespaced_lease("imagefleet-operator", ns)
        except client.exceptions.ApiException:
            return None
        return lease.spec.holder_identity or None

    leader_name = until(holder, timeout=60, what="a leader")
    leader, follower = (a, b) if leader_name == "op-a" else (b, a)
    generator.apply(replicas=2)
    generator.wait_serving(2)
    assert "Leading:" in leader.text() and "Following:" in follower.text()
    assert "Leading:" not in follower.text()
    leader.kill()
    until(lambda: holder() not in (None, leader_name), timeout=60, what="the follower taking the Lease")
    generator.tools.kubectl("scale", "imggen/tiny", "--replicas=3", "-n", ns)
    generator.wait_serving(3)
    assert "Leading:" in follower.text()
    assert len(generator.pods()) == 3


def test_the_router_and_the_operator_carry_on_through_30_s_without_the_control_plane(
    control_plane: ControlPlane,
    generator: Generator,
    processes: list[OperatorProcess],
    tmp_path: Path,
    api_client: Any,
) -> None:
    op = OperatorProcess(control_plane, generator.namespace, tmp_path / "op.log")
    processes.append(op)
    generator.apply(replicas=2)
    generator.wait_serving(2)
    url = generator.router_url()
    core = client.CoreV1Api(api_client)

    def api_down() -> bool:
        try:
            core.list_namespace(_request_timeout=2)
        except Exception:  # refused, reset or timed out: unreachable
            return True
        return False

    with Traffic(url) as traffic:
        until(lambda: traffic.ok >= 3, timeout=60, what="traffic flowing")
        # The restart runs on this thread: the components die with the thread that started them.
        served_while_down: list[bool] = []
        checks: list[BaseException] = []

        def check_serving_while_down() -> None:
            try:
                until(api_down, timeout=10, what="the apiserver down")
                during = traffic.ok
                until(
                    lambda: traffic.ok >= during + 3, timeout=APISERVER_DOWN_S, what="traffic, apiserver down"
                )
                served_while_down.append(api_down())  # those requests were served without the API
            except BaseException as exc:
                checks.append(exc)

        checker = threading.Thread(target=check_serving_while_down)
        checker.start()
        # A control-plane node's reboot: the controllers go down with the apiserver. One left
        # running through the outage marks the nodes unreachable on stale leases once the
        # apiserver is back, and their pods not Ready (see ControlPlane.restart).
        control_plane.restart(*CONTROL_PLANE, downtime_s=APISERVER_DOWN_S)
        checker.join(60)
        assert checks == [] and served_while_down == [True], checks
        sent = traffic.ok
        until(lambda: traffic.ok >= sent + 3, timeout=60, what="traffic after the restart")
    assert traffic.failures == []
    generator.tools.kubectl("scale", "imggen/tiny", "--replicas=3", "-n", generator.namespace)
    generator.wait_serving(3, timeout=START_S + 60)  # the operator reconciles and writes status again
    assert "Traceback" not in op.text()  # the outage is logged a line per attempt, not as a crash


def container_pid(pod: Any) -> int:
    """The process of a pod's (only) container, as the process kubelet reports it."""
    (status,) = pod.status.container_statuses
    return int(status.container_id.removeprefix("process://"))


def restarts(pod: Any) -> int:
    (status,) = pod.status.container_statuses
    return int(status.restart_count)


def test_a_pod_sigkilled_mid_batch_loses_no_request(
    control_plane: ControlPlane,
    generator: Generator,
    processes: list[OperatorProcess],
    tmp_path: Path,
) -> None:
    """Requests running on a pod that dies are retried on another pod by the router."""
    processes.append(OperatorProcess(control_plane, generator.namespace, tmp_path / "op.log"))
    generator.apply(replicas=2)
    generator.wait_serving(2)
    url = generator.router_url()
    held = [Held(url, **MEDIUM).start() for _ in range(3)]
    pods = {f"http://{p.status.pod_ip}:8001": p for p in generator.pods()}

    def busy() -> Any:
        return next((p for u, p in pods.items() if pod_busy(u)), None)

    victim = until(busy, timeout=60, what="a pod running a batch")
    os.killpg(container_pid(victim), signal.SIGKILL)
    for h in held:
        assert h.wait(300) == 200, h.error
    assert all(h.error is None for h in held)
    assert scrape(url).value(metrics.ROUTER_RETRIES + "_total", reason="unreachable") >= 1  # it was retried
    assert generate(url, size="64x64").status == 200


def test_a_restarted_router_fails_only_what_was_in_flight(
    control_plane: ControlPlane,
    generator: Generator,
    processes: list[OperatorProcess],
    tmp_path: Path,
) -> None:
    processes.append(OperatorProcess(control_plane, generator.namespace, tmp_path / "op.log"))
    generator.apply(replicas=2)
    generator.wait_serving(2)
    url = generator.router_url()
    assert generate(url, size="64x64").status == 200
    (router,) = generator.pods(wire.COMPONENT_ROUTER)
    inference_pods = {p.metadata.uid for p in generator.pods()}
    in_flight = Held(url, **LONG).start()
    until(lambda: any(pod_busy(f"http://{p.status.pod_ip}:8001") for p in generator.pods()), timeout=60,
          what="the request running on a pod")  # fmt: skip
    os.killpg(container_pid(router), signal.SIGKILL)
    in_flight.wait(60)
    assert in_flight.status is None and in_flight.error is not None  # cut off with the router

    def back() -> bool:
        (pod,) = generator.pods(wire.COMPONENT_ROUTER)
        ready = any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])
        return restarts(pod) > restarts(router) and ready

    until(back, timeout=START_S, what="the router restarted and ready", describe=generator.describe)
    with Traffic(generator.router_url()) as traffic:
        until(lambda: traffic.ok >= 3, timeout=60, what="traffic through the restarted router")
    assert traffic.failures == []
    assert {p.metadata.uid for p in generator.pods()} == inference_pods  # no pod paid for it
