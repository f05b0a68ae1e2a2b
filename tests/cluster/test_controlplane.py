"""The control plane is a real one: scheduling, garbage collection, CRDs, helm.

Each test checks behaviour that only the real component provides: kube-scheduler's extended
resource accounting, kube-controller-manager's garbage collector and workload controllers,
kube-apiserver's structural-schema validation and defaulting, and helm's install/uninstall.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from imagefleet.devcluster import binaries, nodes
from imagefleet.testing.wait import until

GPU = "nvidia.com/gpu"
# The session's own nodes use indices 0..N; nodes made by single tests count down from the top.
_node_index = itertools.count(nodes.MAX_NODES - 1, -1)


@pytest.fixture
def gpu_node(core_v1: Any, namespace: str) -> Iterator[tuple[str, int]]:
    """A fake 8-GPU node of the test's own, so no other test's pods use its GPUs."""
    index = next(_node_index)
    name = f"gpu-{namespace}"[:63].rstrip("-")
    nodes.create(core_v1, [nodes.gpu_node(name, index, gpus=8)])
    until(lambda: nodes.not_ready(core_v1, [name]) is None, timeout=30, what=f"node {name} Ready")
    yield name, index
    core_v1.delete_node(name)


def _pod(name: str, node: str, gpus: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "gpu-fill"}},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "containers": [
                {"name": "worker", "image": "imagefleet:test", "resources": {"limits": {GPU: str(gpus)}}}
            ],
        },
    }


def test_server_reports_pinned_version(tools: Any) -> None:
    version = json.loads(tools.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == binaries.kubernetes_version()
    assert version["clientVersion"]["gitVersion"] == binaries.kubernetes_version()


def test_gpus_are_scheduled_eight_per_node(core_v1: Any, namespace: str, gpu_node: tuple[str, int]) -> None:
    node, index = gpu_node
    for i in range(9):
        core_v1.create_namespaced_pod(namespace, _pod(f"gpu-{i}", node, gpus=1))

    def settled() -> list[Any] | None:
        pods = core_v1.list_namespaced_pod(namespace).items
        phases = sorted(p.status.phase for p in pods)
        pending = [p for p in pods if p.status.phase == "Pending"]
        unschedulable = pending and all(_unschedulable(p) for p in pending)
        return pods if phases == ["Pending"] + ["Running"] * 8 and unschedulable else None

    pods = until(
        settled,
        timeout=60,
        what="8 Running pods and 1 Unschedulable",
        describe=lambda: str(
            [(p.metadata.name, p.status.phase) for p in core_v1.list_namespaced_pod(namespace).items]
        ),
    )
    running = [p for p in pods if p.status.phase == "Running"]
    (pending,) = [p for p in pods if p.status.phase == "Pending"]
    scheduled = next(c for c in pending.status.conditions if c.type == "PodScheduled")
    assert scheduled.reason == "Unschedulable"
    assert f"Insufficient {GPU}" in scheduled.message
    assert {p.spec.node_name for p in running} == {node}
    pod_range = ipaddress.ip_network(nodes.pod_cidr(index))
    ips = {ipaddress.ip_address(p.status.pod_ip) for p in running}
    assert len(ips) == 8 and all(ip in pod_range for ip in ips)

    # Freeing one GPU lets the pending pod in.
    core_v1.delete_namespaced_pod(running[0].metadata.name, namespace)
    until(
        lambda: core_v1.read_namespaced_pod(pending.metadata.name, namespace).status.phase == "Running",
        timeout=60,
        what=f"{pending.metadata.name} Running once a GPU is free",
    )


def _unschedulable(pod: Any) -> bool:
    return any(
        c.type == "PodScheduled" and c.status == "False" and c.reason == "Unschedulable"
        for c in pod.status.conditions or []
    )


def test_deleting_a_deployment_collects_its_replicaset_and_pods(
    api_client: Any, core_v1: Any, namespace: str
) -> None:
    apps: Any = client.AppsV1Api(api_client)
    labels = {"app": "gc-demo"}
    apps.create_namespaced_deployment(
        namespace,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "gc-demo"},
            "spec": {
                "replicas": 3,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [{"name": "app", "image": "imagefleet:test"}]},
                },
            },
        },
    )
    until(
        lambda: sum(p.status.phase == "Running" for p in core_v1.list_namespaced_pod(namespace).items) == 3,
        timeout=60,
        what="3 Running pods of the Deployment",
    )
    (replica_set,) = apps.list_namespaced_replica_set(namespace).items
    assert replica_set.metadata.owner_references[0].kind == "Deployment"
    assert replica_set.metadata.owner_references[0].name == "gc-demo"

    apps.delete_namespaced_deployment("gc-demo", namespace, propagation_policy="Background")

    until(
        lambda: (
            not apps.list_namespaced_replica_set(namespace).items
            and not core_v1.list_namespaced_pod(namespace).items
        ),
        timeout=60,
        what="ReplicaSet and pods garbage-collected",
        describe=lambda: str([p.metadata.name for p in core_v1.list_namespaced_pod(namespace).items]),
    )


def _generator(name: str, **spec: Any) -> str:
    body = {
        "apiVersion": "imagefleet.dev/v1alpha1",
        "kind": "ImageGenerator",
        "metadata": {"name": name},
        "spec": {"model": {"id": "tiny"}, **spec},
    }
    return json.dumps(body)


def test_imagegenerator_crd_is_served_and_validated(
    tools: Any, namespace: str, imagegenerator_crd: str
) -> None:
    ns = ["--namespace", namespace]
    tools.kubectl("create", *ns, "-f", "-", stdin=_generator("valid", batching={"maxBatchSize": 8}))
    created = json.loads(tools.kubectl("get", *ns, "imggen", "valid", "-o", "json").stdout)
    assert created["spec"]["replicas"] == 1  # schema default
    assert created["spec"]["gpuResourceName"] == GPU
    assert created["spec"]["batching"] == {
        "maxBatchSize": 8,  # given; the rest are schema defaults, the pod settings' own
        "maxWaitMs": 500,
        "maxQueuedImages": 64,
        "maxQueuedGpuSeconds": 1200,
        "policy": "auto",
        "mode": "request",
    }

    negative = tools.kubectl("create", *ns, "-f", "-", stdin=_generator("negative", replicas=-1), check=False)
    assert negative.returncode != 0
    assert "spec.replicas: Invalid value: -1" in negative.stderr
    assert "greater than or equal to 0" in negative.stderr

    wrong_type = tools.kubectl(
        "create", *ns, "-f", "-", stdin=_generator("typed", replicas="two"), check=False
    )
    assert wrong_type.returncode != 0
    assert 'spec.replicas: Invalid value: "string"' in wrong_type.stderr

    crossed = tools.kubectl(
        "create",
        *ns,
        "-f",
        "-",
        stdin=_generator("crossed", autoscaling={"minReplicas": 5, "maxReplicas": 2}),
        check=False,
    )
    assert crossed.returncode != 0
    assert "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" in crossed.stderr

    listed = tools.kubectl("get", *ns, "imagegenerators").stdout
    assert listed.split()[:6] == ["NAME", "REPLICAS", "READY", "QUEUED", "IMG/MIN", "AGE"]
    assert [line.split()[0] for line in listed.splitlines()[1:]] == ["valid"]


def test_imagegenerator_scale_subresource(tools: Any, namespace: str, imagegenerator_crd: str) -> None:
    ns = ["--namespace", namespace]
    tools.kubectl("create", *ns, "-f", "-", stdin=_generator("scaled"))
    tools.kubectl("scale", *ns, "imggen/scaled", "--replicas=3")
    assert tools.kubectl("get", *ns, "imggen", "scaled", "-o", "jsonpath={.spec.replicas}").stdout == "3"


def test_helm_installs_and_uninstalls_a_chart(
    tools: Any, core_v1: Any, namespace: str, tmp_path: Path
) -> None:
    chart = tmp_path / "hello"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: hello\nversion: 0.1.0\n")
    (chart / "values.yaml").write_text("greeting: hello\n")
    (chart / "templates" / "configmap.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-greeting\n"
        "data:\n  greeting: {{ .Values.greeting | quote }}\n"
    )

    tools.helm("install", "demo", str(chart), "--namespace", namespace, "--set", "greeting=hi", "--wait")
    config_map = core_v1.read_namespaced_config_map("demo-greeting", namespace)
    assert config_map.data == {"greeting": "hi"}
    assert config_map.metadata.labels["app.kubernetes.io/managed-by"] == "Helm"
    assert "demo" in tools.helm("list", "--namespace", namespace, "--short").stdout.split()

    tools.helm("uninstall", "demo", "--namespace", namespace, "--wait")
    with pytest.raises(ApiException) as missing:
        core_v1.read_namespaced_config_map("demo-greeting", namespace)
    assert missing.value.status == 404
