"""Fake GPU nodes, played by KWOK.

A fake node is an ordinary Node object carrying the annotation KWOK watches for; KWOK then keeps it
Ready (node lease heartbeats) and moves the pods bound to it through their lifecycle. Each node
advertises ``gpus`` of an extended resource (``nvidia.com/gpu`` by default), so kube-scheduler
does real GPU accounting, and owns the pod range ``127.1.<index>.0/24``: pod IPs are loopback
addresses a test can bind a real server to (Linux routes all of 127/8 to ``lo``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

KWOK_ANNOTATION = "kwok.x-k8s.io/node"
FAKE_NODE_LABEL = "imagefleet.dev/fake-node"
MAX_NODES = 250


def pod_cidr(index: int) -> str:
    """The loopback range KWOK hands out pod IPs from on node ``index``."""
    return f"127.1.{index}.0/24"


def gpu_node(name: str, index: int, gpus: int = 8, gpu_resource: str = "nvidia.com/gpu") -> dict[str, Any]:
    """The manifest of one fake GPU node; ``index`` (0..249) picks its pod and node addresses."""
    if not 0 <= index < MAX_NODES:
        raise ValueError(f"node index {index} outside 0..{MAX_NODES - 1}")
    quantities = {"cpu": "32", "memory": "256Gi", "pods": "110", gpu_resource: str(gpus)}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {KWOK_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                "nvidia.com/gpu.present": "true",
                FAKE_NODE_LABEL: "true",
            },
        },
        "spec": {"podCIDR": pod_cidr(index), "podCIDRs": [pod_cidr(index)]},
        "status": {
            "allocatable": quantities,
            "capacity": quantities,
            "addresses": [
                {"type": "InternalIP", "address": f"127.0.1.{index + 1}"},
                {"type": "Hostname", "address": name},
            ],
        },
    }


def create(core_v1: Any, manifests: Iterable[dict[str, Any]]) -> list[str]:
    """Create the nodes (status included, as a kubelet registering itself does); their names."""
    names = []
    for manifest in manifests:
        core_v1.create_node(manifest)
        names.append(manifest["metadata"]["name"])
    return names


def not_ready(core_v1: Any, names: Iterable[str]) -> str | None:
    """None when every named node is Ready, else which ones are not."""
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
    return any(c.type == "Ready" and c.status == "True" for c in conditions)
