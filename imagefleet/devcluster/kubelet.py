"""The process kubelet: plays the kubelet of some nodes and runs their pods' containers as local
processes bound to the pods' IPs.

KWOK runs no containers; this does, so the pod specs an operator writes (commands, env, probes,
preStop hooks, Secret volumes, service accounts) are exercised for real on one machine.

**Nodes.** It registers its "process nodes" itself, *without* KWOK's annotation (KWOK keeps only
the nodes annotated ``kwok.x-k8s.io/node=fake``), with the same labels, capacity and pod range as
KWOK nodes plus ``imagefleet.dev/node-kind=process``, and keeps them Ready: a Lease in
``kube-node-lease`` renewed and the Ready condition's heartbeat patched every 10 s, and retried
soon after a failure (0.2 s doubling to 7 s, as the kubelet's lease controller does). Nodes that
already exist (a restarted kubelet) are adopted.

**Pods.** For every pod bound to one of its nodes (list, then watch; relists after errors, so it
survives an apiserver restart while its processes keep running) a :class:`~.podworker.PodWorker`

* gives the pod an IP from the node's podCIDR (``127.1.<index>.0/24``; .0, .1 and .255 never),
* materialises its volumes as directories (:mod:`.volumes`) and, unless
  ``automountServiceAccountToken`` is false, a token for its ServiceAccount (TokenRequest, bound
  to the pod, re-requested at 80% of its life) with ``token``, ``ca.crt``, ``namespace`` and a
  ``kubeconfig`` that uses them, exported as ``KUBECONFIG`` (in-cluster loaders read fixed paths
  under /var/run/secrets that a local process cannot have, so in-pod code falls back to it);
* runs init containers to completion, then the containers: argv is ``command + args`` with
  ``$(VAR)`` expansion, the first word resolved on a PATH that starts with this interpreter's
  directory (the project's venv, so ``imagefleet`` and ``python`` resolve); the image is ignored;
* runs startup, readiness and liveness probes (httpGet, tcpSocket, exec) and reports the pod's
  status like a kubelet (phase, IPs, conditions, containerStatuses);
* restarts exited containers by ``restartPolicy`` with CrashLoopBackOff (10 s doubling to 300 s;
  the base is a flag);
* on deletion runs ``preStop``, sends SIGTERM to the process group, SIGKILL when the grace period
  ends, and makes the final delete (grace 0, UID precondition); a pod that vanishes without that
  (force delete) is killed at once.

**Translations** (a local process shares this machine's network and filesystem; see
:mod:`.podspec`): an argv element or environment value that is exactly ``0.0.0.0`` becomes the
pod IP; one equal to a volumeMount's path, or below it, becomes the host directory of that volume.

Not emulated: image pulls, network namespaces, DNS, resource limits, security contexts
(readOnlyRootFilesystem, runAsNonRoot, ...), ``kubectl logs/exec/port-forward`` (logs are files:
``<state-dir>/pods/<namespace>_<pod>/<container>.log``).

Run it alone (``python -m imagefleet.devcluster.kubelet --kubeconfig ... --state-dir ...``),
from :class:`~.controlplane.ControlPlane`, or in-process as :class:`ProcessKubelet`.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from imagefleet.devcluster import nodes
from imagefleet.devcluster.ipam import IpPool
from imagefleet.devcluster.kubeapi import MERGE, SMP, Informer, Kube, KubeError, path
from imagefleet.devcluster.podstatus import now, rfc3339_micro
from imagefleet.devcluster.podworker import NodeContext, PodWorker, WorkerContext
from imagefleet.devcluster.runtime import Spawner

log = logging.getLogger("imagefleet.devcluster.kubelet")

KUBELET_VERSION = "imagefleet-process"
LEASE_NAMESPACE = "kube-node-lease"
HEARTBEAT_RETRY_S = (0.2, 7.0)
"""After a failed heartbeat: the first retry's delay, doubling up to the second (the kubelet's
lease controller's backoff)."""


def heartbeat_delay(interval_s: float, failures: int) -> float:
    """Seconds until the next heartbeat after ``failures`` failed ones in a row: the interval while
    they succeed, else a quick retry, so an apiserver back from an outage sees fresh Leases before
    the node controller's grace period has run out."""
    if failures <= 0:
        return interval_s
    first, most = HEARTBEAT_RETRY_S
    return min(interval_s, most, first * 2.0 ** (failures - 1))


# Passed on from the kubelet's environment when set: locale, and the Hugging Face cache, so pods
# share one model cache as they would share a node's volume.
DEFAULT_INHERITED_ENV = ("LANG", "LC_ALL", "LC_CTYPE", "TZ", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE")


class NodeTakenError(RuntimeError):
    """A node of the configured name exists and belongs to KWOK."""


@dataclass(frozen=True)
class KubeletConfig:
    """Everything that shapes one process kubelet."""

    kubeconfig: Path
    state_dir: Path
    nodes: int = 1
    gpus: int = 8
    gpu_resource: str = "nvidia.com/gpu"
    first_index: int = 0
    node_prefix: str = "gpu-node-"
    crash_backoff_s: float = 10.0
    max_backoff_s: float = 300.0
    sync_interval_s: float = 2.0
    heartbeat_s: float = 10.0
    lease_duration_s: int = 40
    token_expiration_s: int = 86400
    healthz_port: int | None = None  # serve /healthz and /pods on 127.0.0.1:<port>; 0 picks one
    inherit_env: tuple[str, ...] = DEFAULT_INHERITED_ENV  # variables passed on to every container

    def node_names(self) -> list[tuple[str, int]]:
        last = self.first_index + self.nodes - 1
        if self.nodes < 0 or self.first_index < 0 or last >= nodes.MAX_NODES:
            raise ValueError(f"node indices {self.first_index}..{last} outside 0..{nodes.MAX_NODES - 1}")
        return [(f"{self.node_prefix}{i}", i) for i in range(self.first_index, self.first_index + self.nodes)]


@dataclass
class _Node:
    context: NodeContext
    uid: str = ""
    registered: bool = False
    since: Any = None
    last_beat: float = 0.0
    informer: Informer | None = None
    workers: set[str] = field(default_factory=set)


class ProcessKubelet:
    """The kubelet of ``config.nodes`` process nodes (module docstring); a context manager."""

    def __init__(self, config: KubeletConfig) -> None:
        self.config = config
        self._stop = threading.Event()
        self._lock = threading.RLock()
        self._workers: dict[str, PodWorker] = {}
        self._done: collections.deque[str] = collections.deque(maxlen=1000)
        self._nodes = {
            name: _Node(NodeContext(name, index, nodes.node_ip(index), IpPool(nodes.pod_cidr(index))))
            for name, index in config.node_names()
        }
        self._threads: list[threading.Thread] = []
        self._server: ThreadingHTTPServer | None = None
        self.kube: Kube | None = None
        self.spawner: Spawner | None = None

    @property
    def node_names(self) -> list[str]:
        return list(self._nodes)

    @property
    def healthz_port(self) -> int | None:
        return int(self._server.server_address[1]) if self._server else None

    def __enter__(self) -> ProcessKubelet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> ProcessKubelet:
        """Register (or adopt) the nodes, start heartbeats and pod informers; returns once every
        node is registered and its pods were listed. On failure everything started is stopped."""
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        self.kube = Kube.from_kubeconfig(self.config.kubeconfig)
        self.spawner = Spawner()
        deadline = time.monotonic() + timeout
        for node in self._nodes.values():
            while True:
                try:
                    self._register(node)
                    self._heartbeat(node)
                    break
                except Exception as err:
                    if isinstance(err, NodeTakenError) or time.monotonic() > deadline:
                        raise
                    log.warning("registering node %s failed: %s; retrying", node.context.name, err)
                    self._stop.wait(1.0)
        self._thread(self._heartbeats, "node-heartbeats")
        context = WorkerContext(
            kube=self.kube,
            spawner=self.spawner,
            state_dir=self.config.state_dir,
            stop=self._stop,
            on_done=self._worker_done,
            crash_backoff_s=self.config.crash_backoff_s,
            max_backoff_s=self.config.max_backoff_s,
            sync_interval_s=self.config.sync_interval_s,
            token_expiration_s=self.config.token_expiration_s,
            inherit_env={k: os.environ[k] for k in self.config.inherit_env if k in os.environ},
        )
        for node in self._nodes.values():
            node.informer = Informer(
                self.kube,
                "/api/v1/pods",
                [("fieldSelector", f"spec.nodeName={node.context.name}")],
                on_list=functools.partial(self._on_list, context, node),
                on_event=functools.partial(self._on_event, context, node),
                stop=self._stop,
                name=f"pods-on-{node.context.name}",
            ).start()
        if self.config.healthz_port is not None:
            self._serve(self.config.healthz_port)
        for node in self._nodes.values():
            assert node.informer is not None
            if not node.informer.synced.wait(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"listing the pods of {node.context.name} timed out")
        log.info("process kubelet ready: nodes %s", ", ".join(self._nodes))

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the informers and heartbeats and end every pod's processes (the pods stay in the API:
        a kubelet started later adopts them)."""
        self._stop.set()
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            worker.shutdown()
        deadline = time.monotonic() + timeout
        for worker in workers:
            worker.thread.join(max(0.1, deadline - time.monotonic()))
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for thread in self._threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        for node in self._nodes.values():
            if node.informer is not None:
                node.informer.close(max(0.1, deadline - time.monotonic()))
        if self.spawner is not None:
            self.spawner.close()
        if self.kube is not None:
            self.kube.close()

    def wait(self) -> None:
        """Block until :meth:`stop`."""
        self._stop.wait()

    def _thread(self, target: Any, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    # -- nodes -----------------------------------------------------------------------------------

    def _register(self, node: _Node) -> None:
        assert self.kube is not None
        ctx = node.context
        manifest = nodes.process_node(
            ctx.name, ctx.index, self.config.gpus, self.config.gpu_resource, kubelet_version=KUBELET_VERSION
        )
        try:
            created = self.kube.request("POST", "/api/v1/nodes", body=manifest)
            log.info("registered node %s", ctx.name)
        except KubeError as err:
            if err.status != 409:
                raise
            created = self._adopt(node, manifest)
        node.uid = str(created["metadata"]["uid"])
        node.since = node.since or now()
        node.registered = True

    def _adopt(self, node: _Node, manifest: dict[str, Any]) -> dict[str, Any]:
        assert self.kube is not None
        name = node.context.name
        existing = self.kube.get(path("/api/v1/nodes", name)) or {}
        annotations = (existing.get("metadata") or {}).get("annotations") or {}
        if nodes.KWOK_ANNOTATION in annotations:
            raise NodeTakenError(f"node {name} exists and is a KWOK node: refusing to take it over")
        self.kube.request(
            "PATCH",
            path("/api/v1/nodes", name),
            body={"metadata": {"labels": manifest["metadata"]["labels"]}},
            content_type=MERGE,
        )
        status = {
            k: manifest["status"][k]
            for k in ("capacity", "allocatable", "addresses", "nodeInfo", "conditions")
        }
        self.kube.request(
            "PATCH", path("/api/v1/nodes", name, "status"), body={"status": status}, content_type=SMP
        )
        cidr = (existing.get("spec") or {}).get("podCIDR")
        if cidr and cidr != node.context.pool.cidr:
            log.warning("node %s has podCIDR %s (not %s): using it", name, cidr, node.context.pool.cidr)
            node.context.pool = IpPool(cidr)
        log.info("adopted existing node %s", name)
        return existing

    def _heartbeat(self, node: _Node) -> None:
        """Renew the node's Lease and the Ready condition's heartbeat."""
        assert self.kube is not None
        name, moment = node.context.name, now()
        lease = path(f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases", name)
        spec = {
            "holderIdentity": name,
            "leaseDurationSeconds": self.config.lease_duration_s,
            "renewTime": rfc3339_micro(moment),
        }
        try:
            self.kube.request("PATCH", lease, body={"spec": spec}, content_type=MERGE)
        except KubeError as err:
            if err.status != 404:
                raise
            owner = {"apiVersion": "v1", "kind": "Node", "name": name, "uid": node.uid}
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": name, "namespace": LEASE_NAMESPACE, "ownerReferences": [owner]},
                "spec": spec,
            }
            self.kube.request(
                "POST", path(f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases"), body=body
            )
        try:
            self.kube.request(
                "PATCH",
                path("/api/v1/nodes", name, "status"),
                body={"status": {"conditions": nodes.node_conditions(moment, node.since)}},
                content_type=SMP,
            )
        except KubeError as err:
            if err.status != 404:
                raise
            log.warning("node %s was deleted: registering it again", name)
            self._register(node)
        node.last_beat = time.monotonic()

    def _heartbeats(self) -> None:
        failures = 0
        while not self._stop.wait(heartbeat_delay(self.config.heartbeat_s, failures)):
            failed = False
            for node in self._nodes.values():
                try:
                    self._heartbeat(node)
                except Exception as err:
                    failed = True
                    if failures < 3 or failures % 30 == 0:
                        log.warning("heartbeat of node %s failed: %s", node.context.name, err)
            failures = failures + 1 if failed else 0

    # -- pods ------------------------------------------------------------------------------------

    def _on_list(self, context: WorkerContext, node: _Node, pods: list[dict[str, Any]]) -> None:
        with self._lock:
            listed = {p["metadata"]["uid"]: p for p in pods}
            # Adopted pods keep their IPs: reserve them before any new pod gets one.
            for uid, pod in listed.items():
                ip = (pod.get("status") or {}).get("podIP")
                phase = (pod.get("status") or {}).get("phase")
                if (
                    uid not in self._workers
                    and uid not in self._done
                    and ip in node.context.pool
                    and phase not in ("Succeeded", "Failed")
                ):
                    node.context.pool.allocate(uid, preferred=ip)
            for uid in list(node.workers):
                if uid not in listed and uid in self._workers:
                    self._workers[uid].vanish()
            for pod in pods:
                self._dispatch(context, node, pod)

    def _on_event(self, context: WorkerContext, node: _Node, kind: str, pod: dict[str, Any]) -> None:
        with self._lock:
            uid = pod["metadata"]["uid"]
            if kind == "DELETED":
                worker = self._workers.get(uid)
                if worker is not None:
                    worker.vanish()
                return
            self._dispatch(context, node, pod)

    def _dispatch(self, context: WorkerContext, node: _Node, pod: dict[str, Any]) -> None:
        if (pod.get("spec") or {}).get("nodeName") != node.context.name or self._stop.is_set():
            return
        uid = pod["metadata"]["uid"]
        worker = self._workers.get(uid)
        if worker is not None:
            worker.update(pod)
            return
        if uid in self._done:
            return
        worker = PodWorker(context, node.context, pod)
        self._workers[uid] = worker
        node.workers.add(uid)
        log.info("pod %s/%s (%s) on %s", worker.namespace, worker.name, uid, node.context.name)
        worker.start()

    def _worker_done(self, uid: str, normal: bool) -> None:
        with self._lock:
            self._workers.pop(uid, None)
            for node in self._nodes.values():
                node.workers.discard(uid)
            if normal:
                self._done.append(uid)

    # -- health ----------------------------------------------------------------------------------

    def problem(self) -> str | None:
        """None while healthy: every node registered, heartbeats recent, pods listed."""
        stale = time.monotonic() - 3 * self.config.heartbeat_s
        for name, node in self._nodes.items():
            if not node.registered:
                return f"node {name} not registered"
            if node.last_beat < stale:
                return f"node {name}: no successful heartbeat for {3 * self.config.heartbeat_s:g}s"
            if node.informer is None or not node.informer.synced.is_set():
                return f"pods of node {name} not listed yet"
        return None

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            workers = list(self._workers.values())
        return [w.describe() for w in workers]

    def _serve(self, port: int) -> None:
        kubelet = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/healthz":
                    problem = kubelet.problem()
                    self._reply(503 if problem else 200, (problem or "ok").encode(), "text/plain")
                elif self.path == "/pods":
                    self._reply(200, json.dumps(kubelet.describe(), indent=2).encode(), "application/json")
                else:
                    self._reply(404, b"not found", "text/plain")

            def _reply(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self._thread(self._server.serve_forever, "healthz")


# -- command line -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> KubeletConfig:
    parser = argparse.ArgumentParser(
        prog="python -m imagefleet.devcluster.kubelet",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    default_kubeconfig = os.environ.get("KUBECONFIG")
    parser.add_argument(
        "--kubeconfig", type=Path, default=default_kubeconfig, required=not default_kubeconfig
    )
    parser.add_argument("--state-dir", type=Path, required=True, help="pods' directories, logs, volumes")
    parser.add_argument("--nodes", type=int, default=1, help="process nodes to run (default 1)")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs each node advertises (default 8)")
    parser.add_argument("--gpu-resource", default="nvidia.com/gpu", help="extended resource name of a GPU")
    parser.add_argument(
        "--first-index", type=int, default=0, help="index of the first node (pod range, name)"
    )
    parser.add_argument("--node-prefix", default="gpu-node-", help="node names: <prefix><index>")
    parser.add_argument("--crash-backoff-s", type=float, default=10.0, help="first CrashLoopBackOff delay")
    parser.add_argument("--max-backoff-s", type=float, default=300.0, help="longest CrashLoopBackOff delay")
    parser.add_argument("--sync-interval-s", type=float, default=2.0, help="volume re-sync period")
    parser.add_argument(
        "--token-expiration-s", type=int, default=86400, help="service-account token lifetime"
    )
    parser.add_argument(
        "--healthz-port", type=int, default=None, help="serve /healthz and /pods on 127.0.0.1"
    )
    parser.add_argument(
        "--inherit-env",
        action="append",
        default=[],
        metavar="NAME",
        help="pass this variable of the kubelet's environment to every container (repeatable)",
    )
    args = parser.parse_args(argv)
    return KubeletConfig(
        kubeconfig=args.kubeconfig.expanduser().resolve(),
        state_dir=args.state_dir.expanduser().resolve(),
        nodes=args.nodes,
        gpus=args.gpus,
        gpu_resource=args.gpu_resource,
        first_index=args.first_index,
        node_prefix=args.node_prefix,
        crash_backoff_s=args.crash_backoff_s,
        max_backoff_s=args.max_backoff_s,
        sync_interval_s=args.sync_interval_s,
        token_expiration_s=args.token_expiration_s,
        healthz_port=args.healthz_port,
        inherit_env=(*DEFAULT_INHERITED_ENV, *args.inherit_env),
    )


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s [%(threadName)s] %(message)s",
        stream=sys.stderr,
    )
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    kubelet = ProcessKubelet(config)
    try:
        kubelet.start(timeout=120.0)
    except Exception as err:
        log.error("process kubelet failed to start: %s", err)
        return 1
    while not stopping.wait(1.0):
        pass
    log.info("stopping: ending every pod's processes")
    kubelet.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
