"""Fake GPU nodes: KWOK nodes and process nodes.

A node here is an ordinary Node object. Two kinds share one shape (labels, capacity, addresses):

* a **KWOK node** carries the annotation KWOK watches for; KWOK then keeps it Ready (node lease
  heartbeats) and moves the pods bound to it through their lifecycle without running anything;
* a **process node** has no such annotation: the process kubelet (:mod:`.kubelet`) registers it,
  keeps it Ready and runs the containers of its pods as local processes.

Each node advertises ``gpus`` of an extended resource (``nvidia.com/gpu`` by default), so
kube-scheduler does real GPU accounting, and owns the pod range ``127.1.<index>.0/24``: pod IPs
are loopback addresses a real server can bind to (Linux routes all of 127/8 to ``lo``).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from typing import Any

KWOK_ANNOTATION = "kwok.x-k8s.io/node"
FAKE_NODE_LABEL = "imagefleet.dev/fake-node"
NODE_KIND_LABEL = "imagefleet.dev/node-kind"
NOT_READY_TAINT = "node.kubernetes.io/not-ready"
MAX_NODES = 250


def pod_cidr(index: int) -> str:
    """The loopback range pod IPs of node ``index`` come from."""
    return f"127.1.{index}.0/24"


def node_ip(index: int) -> str:
    """The InternalIP of node ``index`` (the pods' hostIP)."""
    return f"127.0.1.{index + 1}"


def _check_index(index: int) -> None:
    if not 0 <= index < MAX_NODES:
        raise ValueError(f"node index {index} outside 0..{MAX_NODES - 1}")


def _base(name: str, index: int, gpus: int, gpu_resource: str, kind: str) -> dict[str, Any]:
    _check_index(index)
    quantities = {"cpu": "32", "memory": "256Gi", "pods": "110", gpu_resource: str(gpus)}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "nvidia.com/gpu.present": "true",
                FAKE_NODE_LABEL: "true",
                NODE_KIND_LABEL: kind,
            },
        },
        "spec": {"podCIDR": pod_cidr(index), "podCIDRs": [pod_cidr(index)]},
        "status": {
            "allocatable": quantities,
            "capacity": quantities,
            "addresses": [
                {"type": "InternalIP", "address": node_ip(index)},
                {"type": "Hostname", "address": name},
            ],
        },
    }


def gpu_node(name: str, index: int, gpus: int = 8, gpu_resource: str = "nvidia.com/gpu") -> dict[str, Any]:
    """The manifest of one KWOK GPU node; ``index`` (0..249) picks its pod and node addresses."""
    manifest = _base(name, index, gpus, gpu_resource, "kwok")
    manifest["metadata"]["annotations"][KWOK_ANNOTATION] = "fake"
    manifest["metadata"]["labels"]["type"] = "kwok"
    return manifest


def process_node(
    name: str,
    index: int,
    gpus: int = 8,
    gpu_resource: str = "nvidia.com/gpu",
    *,
    kubelet_version: str = "imagefleet-process",
    now: datetime.datetime | None = None,
) -> dict[str, Any]:
    """The manifest of one process node, as the process kubelet registers it (Ready, no KWOK
    annotation, so KWOK leaves it alone)."""
    manifest = _base(name, index, gpus, gpu_resource, "process")
    manifest["status"]["conditions"] = node_conditions(now or _now())
    manifest["status"]["nodeInfo"] = {
        "architecture": "amd64",
        "operatingSystem": "linux",
        "kubeletVersion": kubelet_version,
        "kubeProxyVersion": kubelet_version,
        "containerRuntimeVersion": "process://local",
        "kernelVersion": "",
        "osImage": "imagefleet process node",
        "machineID": "",
        "systemUUID": "",
        "bootID": "",
    }
    return manifest


def node_conditions(now: datetime.datetime, since: datetime.datetime | None = None) -> list[dict[str, Any]]:
    """A healthy kubelet's node conditions, with ``now`` as the heartbeat."""
    beat = _time(now)
    start = _time(since or now)
    healthy = [
        ("MemoryPressure", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
        ("DiskPressure", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
        ("PIDPressure", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
    ]
    conditions = [
        {
            "type": kind,
            "status": "False",
            "reason": reason,
            "message": message,
            "lastHeartbeatTime": beat,
            "lastTransitionTime": start,
        }
        for kind, reason, message in healthy
    ]
    conditions.append(
        {
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "process kubelet is posting ready status",
            "lastHeartbeatTime": beat,
            "lastTransitionTime": start,
        }
    )
    return conditions


def create(core_v1: Any, manifests: Iterable[dict[str, Any]]) -> list[str]:
    """Create the nodes (status included, as a kubelet registering itself does); their names."""
    names = []
    for manifest in manifests:
        core_v1.create_node(manifest)
        names.append(manifest["metadata"]["name"])
    return names


def not_ready(core_v1: Any, names: Iterable[str]) -> str | None:
    """None when every named node is Ready and schedulable, else which ones are not.

    A node still carrying the ``node.kubernetes.io/not-ready`` taint (added when it registers,
    removed by kube-controller-manager once it sees the node Ready) counts as not ready yet.
    """
    wanted = set(names)
    ready = {
        node.metadata.name
        for node in core_v1.list_node(label_selector=FAKE_NODE_LABEL).items
        if node.metadata.name in wanted and _is_ready(node)
    }
    waiting = sorted(wanted - ready)
    return f"nodes not Ready: {', '.join(waiting)}" if waiting else None


def _is_ready(node: Any) -> bool:
    conditions = node.status.conditions or []
    taints = (node.spec.taints if node.spec else None) or []
    return any(c.type == "Ready" and c.status == "True" for c in conditions) and not any(
        t.key == NOT_READY_TAINT for t in taints
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _time(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
