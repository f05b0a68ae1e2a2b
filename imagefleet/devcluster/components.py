"""Command lines of the control-plane components and the kubeconfig they share.

Everything listens on 127.0.0.1 only, on ports picked at start. The flag sets are the minimum
that gives real behaviour: RBAC and service-account tokens on the apiserver, garbage collection,
namespace finalisation and the workload controllers in kube-controller-manager, real scheduling
of extended resources in kube-scheduler, KWOK playing the kubelet of the fake nodes, and the
process kubelet (:mod:`.kubelet`) playing the kubelet of the process nodes.

``--advertise-address=127.0.0.1`` needs ``--endpoint-reconciler-type=none``: newer apiservers
refuse a loopback advertise address for the lease reconciler, and nothing here needs the
``kubernetes`` Service's endpoints.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from imagefleet.devcluster.pki import Pki

CONTEXT = "imagefleet-test"
SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"
# Pods of a node without spec.podCIDR get addresses from here (fake nodes all set a podCIDR).
FALLBACK_POD_CIDR = "127.2.0.0/16"


@dataclass(frozen=True)
class Ports:
    """The loopback ports of one control plane."""

    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int
    kwok: int
    kubelet: int

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{self.etcd_client}"

    @property
    def apiserver_url(self) -> str:
        return f"https://127.0.0.1:{self.apiserver}"


def etcd(bin_dir: Path, data_dir: Path, ports: Ports) -> list[str]:
    peer = f"http://127.0.0.1:{ports.etcd_peer}"
    return [
        str(bin_dir / "etcd"),
        "--name=node0",
        f"--data-dir={data_dir}",
        f"--listen-client-urls={ports.etcd_url}",
        f"--advertise-client-urls={ports.etcd_url}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=node0={peer}",
        "--unsafe-no-fsync=true",
        "--auto-compaction-retention=1",
        "--quota-backend-bytes=2147483648",
        "--log-level=warn",
    ]


def apiserver(bin_dir: Path, pki: Pki, cert_dir: Path, ports: Ports) -> list[str]:
    return [
        str(bin_dir / "kube-apiserver"),
        f"--etcd-servers={ports.etcd_url}",
        "--bind-address=127.0.0.1",
        f"--secure-port={ports.apiserver}",
        "--advertise-address=127.0.0.1",
        "--endpoint-reconciler-type=none",
        f"--cert-dir={cert_dir}",
        f"--tls-cert-file={pki.server_cert}",
        f"--tls-private-key-file={pki.server_key}",
        f"--client-ca-file={pki.ca_cert}",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={pki.service_account_pub}",
        f"--service-account-signing-key-file={pki.service_account_key}",
        f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
        "--authorization-mode=RBAC",
        "--allow-privileged=true",
        "--enable-priority-and-fairness=false",
        "--profiling=false",
    ]


def _kube_component(bin_dir: Path, binary: str, kubeconfig: Path, port: int) -> list[str]:
    return [
        str(bin_dir / binary),
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics",
        "--bind-address=127.0.0.1",
        f"--secure-port={port}",
        "--leader-elect=false",
        "--profiling=false",
    ]


def controller_manager(bin_dir: Path, pki: Pki, kubeconfig: Path, cert_dir: Path, ports: Ports) -> list[str]:
    return [
        *_kube_component(bin_dir, "kube-controller-manager", kubeconfig, ports.controller_manager),
        f"--cert-dir={cert_dir}",
        f"--root-ca-file={pki.ca_cert}",
        f"--service-account-private-key-file={pki.service_account_key}",
        f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
        "--allocate-node-cidrs=false",
        "--node-monitor-period=5s",
        "--node-monitor-grace-period=40s",
    ]


def scheduler(bin_dir: Path, kubeconfig: Path, cert_dir: Path, ports: Ports) -> list[str]:
    return [
        *_kube_component(bin_dir, "kube-scheduler", kubeconfig, ports.scheduler),
        f"--cert-dir={cert_dir}",
    ]


def kwok(bin_dir: Path, stages: Path, kubeconfig: Path, ports: Ports) -> list[str]:
    """KWOK manages only nodes annotated ``kwok.x-k8s.io/node=fake``; real ones stay untouched."""
    return [
        str(bin_dir / "kwok"),
        f"--kubeconfig={kubeconfig}",
        f"--config={stages}",
        "--manage-all-nodes=false",
        "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
        f"--cidr={FALLBACK_POD_CIDR}",
        "--node-ip=127.0.0.1",
        "--node-lease-duration-seconds=40",
        f"--server-address=127.0.0.1:{ports.kwok}",
    ]


def kubelet(
    kubeconfig: Path,
    state_dir: Path,
    ports: Ports,
    *,
    nodes: int,
    gpus: int,
    gpu_resource: str,
    crash_backoff_s: float,
    first_index: int = 0,
) -> list[str]:
    """The process kubelet, run by this interpreter (``-P``: the repository root, which holds a
    folder named ``operator``, must not shadow the standard library)."""
    return [
        sys.executable,
        "-P",
        "-m",
        "imagefleet.devcluster.kubelet",
        f"--kubeconfig={kubeconfig}",
        f"--state-dir={state_dir}",
        f"--nodes={nodes}",
        f"--gpus={gpus}",
        f"--gpu-resource={gpu_resource}",
        f"--crash-backoff-s={crash_backoff_s:g}",
        f"--healthz-port={ports.kubelet}",
        f"--first-index={first_index}",
    ]


def kubeconfig_json(pki: Pki, ports: Ports, namespace: str = "default") -> str:
    """A kubeconfig for the admin user (group system:masters); paths are absolute.

    Written as JSON, which is YAML too: kubectl, helm and the ``kubernetes`` client read it, and
    this package needs no YAML library.
    """
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": CONTEXT,
                "cluster": {"server": ports.apiserver_url, "certificate-authority": str(pki.ca_cert)},
            }
        ],
        "users": [
            {
                "name": "admin",
                "user": {"client-certificate": str(pki.admin_cert), "client-key": str(pki.admin_key)},
            }
        ],
        "contexts": [
            {"name": CONTEXT, "context": {"cluster": CONTEXT, "user": "admin", "namespace": namespace}}
        ],
        "current-context": CONTEXT,
    }
    return json.dumps(config, indent=2) + "\n"
