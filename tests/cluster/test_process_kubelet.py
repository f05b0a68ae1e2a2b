"""The process kubelet runs real pods: probes, restarts, deletion, volumes, service accounts.

Pods on ``gpu-node-0``/``gpu-node-1`` run under the session control plane's kubelet (a process the
ControlPlane started); the others under an in-process :class:`ProcessKubelet` of this module with
a 1 s crash back-off, on nodes of its own.
"""

from __future__ import annotations

import ipaddress
import json
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from imagefleet.devcluster import nodes, processes
from imagefleet.devcluster.controlplane import ControlPlane, Settings
from imagefleet.devcluster.kubelet import KubeletConfig, ProcessKubelet
from imagefleet.testing.wait import until

# A tiny server: after $DELAY seconds it serves, on argv[1]:argv[2], its environment and argv as
# JSON at /, and the file named by argv[3] at /file.
SERVER = r"""
import http.server, json, os, sys, time
time.sleep(float(os.environ.get("DELAY", "0")))
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/file":
            body = open(sys.argv[3], "rb").read()
        else:
            body = json.dumps({"env": dict(os.environ), "argv": sys.argv, "cwd": os.getcwd()}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), Handler).serve_forever()
"""
PORT = 18731  # unusual, so a pod of another plane on this machine (same IPs) hardly ever shadows it
TEST_NODES = (
    200,
    201,
)  # the in-process kubelet's node indices (tests in test_controlplane count down from 249)


@pytest.fixture(scope="module")
def kubelet(
    control_plane: ControlPlane, core_v1: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProcessKubelet]:
    config = KubeletConfig(
        kubeconfig=control_plane.kubeconfig,
        state_dir=tmp_path_factory.mktemp("kubelet"),
        nodes=len(TEST_NODES),
        gpus=2,
        first_index=TEST_NODES[0],
        node_prefix="proc-test-",
        crash_backoff_s=1.0,
        max_backoff_s=4.0,
        sync_interval_s=1.0,
    )
    with ProcessKubelet(config) as running:
        until(
            lambda: nodes.not_ready(core_v1, running.node_names) is None, timeout=60, what="test nodes Ready"
        )
        yield running
    for name in config.node_names():
        core_v1.delete_node(name[0])


def _pod(
    name: str,
    node: str,
    command: list[str],
    *,
    env: list[dict[str, Any]] | None = None,
    probe: bool = True,
    **spec: Any,
) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "app",
        "image": "imagefleet:test",
        "command": command,
        "env": env or [],
        "ports": [{"name": "http", "containerPort": PORT}],
    }
    if probe:
        container["readinessProbe"] = {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1}
    container.update(spec.pop("container", {}))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"nodeSelector": {"kubernetes.io/hostname": node}, "containers": [container], **spec},
    }


def _server(*extra: str) -> list[str]:
    return ["python", "-c", SERVER, "0.0.0.0", str(PORT), *extra]


def _read(core_v1: Any, namespace: str, name: str) -> dict[str, Any]:
    pod = core_v1.read_namespaced_pod(name, namespace, _preload_content=False)
    return dict(json.loads(pod.read()))


def _wait_pod(
    core_v1: Any,
    namespace: str,
    name: str,
    ok: Callable[[dict[str, Any]], bool],
    what: str,
    timeout: float = 60,
) -> dict[str, Any]:
    """The pod once ``ok(pod)``; on timeout the message shows its last status."""

    def probe() -> dict[str, Any] | None:
        pod = _read(core_v1, namespace, name)
        return pod if ok(pod) else None

    return until(
        probe,
        timeout=timeout,
        what=f"pod {name}: {what}",
        describe=lambda: json.dumps(_read(core_v1, namespace, name).get("status"))[:3000],
    )


def _phase(phase: str) -> Callable[[dict[str, Any]], bool]:
    return lambda pod: (pod.get("status") or {}).get("phase") == phase


def _ready(pod: dict[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        return bytes(response.read())


def _gone(core_v1: Any, namespace: str, name: str) -> bool:
    try:
        core_v1.read_namespaced_pod(name, namespace)
    except ApiException as err:
        return bool(err.status == 404)
    return False


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone before or while /proc was read
        return False


def test_pod_runs_at_its_ip_and_is_ready_once_its_probe_passes(core_v1: Any, namespace: str) -> None:
    env: list[dict[str, Any]] = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "MY_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "GREETING", "value": "hello $(MY_NAME)"},
        {"name": "BIND", "value": "0.0.0.0"},
        {"name": "DELAY", "value": "4"},
    ]
    gpu = {"resources": {"limits": {"nvidia.com/gpu": "1"}}}
    core_v1.create_namespaced_pod(namespace, _pod("web", "gpu-node-0", _server(), env=env, container=gpu))

    running = _wait_pod(core_v1, namespace, "web", _phase("Running"), "Running")
    assert not _ready(running)  # the server sleeps 4 s before it listens: the probe fails until then
    status = running["status"]
    ip = status["podIP"]
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(nodes.pod_cidr(0))
    assert status["podIPs"] == [{"ip": ip}] and status["hostIP"] == nodes.node_ip(0)
    (container,) = status["containerStatuses"]
    assert container["containerID"].startswith("process://") and container["started"] is True
    assert container["ready"] is False and "running" in container["state"]

    ready = _wait_pod(core_v1, namespace, "web", _ready, "Ready", timeout=30)
    assert ready["status"]["containerStatuses"][0]["ready"] is True
    seen = json.loads(_get(f"http://{ip}:{PORT}/"))
    assert seen["argv"][1] == ip  # 0.0.0.0 in argv became the pod IP
    assert seen["env"]["BIND"] == ip  # and in the environment
    assert seen["env"]["POD_IP"] == ip
    assert seen["env"]["GREETING"] == "hello web"
    assert seen["env"]["PYTHONUNBUFFERED"] == "1"
    assert "KUBECONFIG" in seen["env"] and "admin" not in Path(seen["env"]["KUBECONFIG"]).read_text()
    node = core_v1.read_node("gpu-node-0")
    assert node.metadata.labels[nodes.NODE_KIND_LABEL] == "process"
    assert nodes.KWOK_ANNOTATION not in (node.metadata.annotations or {})


def test_crashing_container_restarts_with_back_off(
    kubelet: ProcessKubelet, core_v1: Any, namespace: str
) -> None:
    command = ["python", "-c", "import sys; print('crashing', flush=True); sys.exit(1)"]
    core_v1.create_namespaced_pod(namespace, _pod("crash", kubelet.node_names[0], command, probe=False))
    reasons: set[str] = set()

    def restarted() -> dict[str, Any] | None:
        (container,) = _read(core_v1, namespace, "crash")["status"].get("containerStatuses") or [{}]
        reasons.update(s.get("reason", "") for s in (container.get("state") or {}).values())
        return container if container.get("restartCount", 0) >= 2 and "CrashLoopBackOff" in reasons else None

    container = until(restarted, timeout=60, interval=0.1, what="restartCount >= 2 with CrashLoopBackOff")
    assert container["lastState"]["terminated"]["exitCode"] == 1
    assert container["lastState"]["terminated"]["reason"] == "Error"
    assert _read(core_v1, namespace, "crash")["status"]["phase"] == "Running"
    log = kubelet.config.state_dir / "pods" / f"{namespace}_crash" / "app.log"
    assert log.read_text().count("crashing\n") >= 2


def test_a_ready_condition_someone_else_overwrote_is_posted_again(
    kubelet: ProcessKubelet, core_v1: Any, namespace: str
) -> None:
    """The node controller marks pods not ready when their node's heartbeats stopped (say, the
    apiserver was away); the kubelet puts its own view back, as its status manager does."""
    core_v1.create_namespaced_pod(namespace, _pod("marked", kubelet.node_names[0], _server()))
    _wait_pod(core_v1, namespace, "marked", _ready, "Ready")
    patched = core_v1.patch_namespaced_pod_status(
        "marked",
        namespace,
        {"status": {"conditions": [{"type": "Ready", "status": "False", "reason": "NodeNotReady"}]}},
    )
    # the status as written (reading it back races the kubelet, which may have fixed it already)
    assert not _ready(core_v1.api_client.sanitize_for_serialization(patched))
    _wait_pod(core_v1, namespace, "marked", _ready, "Ready again", timeout=30)


def test_failing_liveness_probe_restarts_the_container(
    kubelet: ProcessKubelet, core_v1: Any, namespace: str
) -> None:
    sleeper = ["python", "-c", "import time; time.sleep(3600)"]
    never = {"tcpSocket": {"port": 1}, "periodSeconds": 1, "failureThreshold": 2}
    container = {"startupProbe": {"exec": {"command": ["true"]}, "periodSeconds": 1}, "livenessProbe": never}
    pod = _pod("unhealthy", kubelet.node_names[1], sleeper, probe=False, container=container)
    pod["spec"]["terminationGracePeriodSeconds"] = 2
    core_v1.create_namespaced_pod(namespace, pod)

    def restarted_once() -> dict[str, Any] | None:
        statuses = _read(core_v1, namespace, "unhealthy")["status"].get("containerStatuses") or []
        return statuses[0] if statuses and statuses[0]["restartCount"] >= 1 else None

    restarted = until(restarted_once, timeout=60, what="a restart after the liveness probe failed")
    assert restarted["lastState"]["terminated"]["exitCode"] == 128 + signal.SIGTERM
    log = (kubelet.config.state_dir / "pods" / f"{namespace}_unhealthy" / "app.log").read_text()
    assert "Liveness probe failed" in log


def test_restart_policy_never_ends_in_failed(kubelet: ProcessKubelet, core_v1: Any, namespace: str) -> None:
    init = {"name": "setup", "image": "i", "command": ["python", "-c", "print('init done')"]}
    pod = _pod("once", kubelet.node_names[1], ["python", "-c", "raise SystemExit(3)"], probe=False)
    pod["spec"].update(restartPolicy="Never", initContainers=[init])
    core_v1.create_namespaced_pod(namespace, pod)
    failed = _wait_pod(core_v1, namespace, "once", _phase("Failed"), "Failed")
    assert failed["status"]["initContainerStatuses"][0]["state"]["terminated"]["reason"] == "Completed"
    (container,) = failed["status"]["containerStatuses"]
    assert container["state"]["terminated"]["exitCode"] == 3 and container["restartCount"] == 0


def test_delete_runs_pre_stop_then_sigterm(kubelet: ProcessKubelet, core_v1: Any, namespace: str) -> None:
    script = (
        "import os, signal, sys, time\n"
        "d = os.environ['SCRATCH']\n"
        "def term(*_):\n"
        "    open(os.path.join(d, 'sigterm'), 'w').write(repr(time.time()))\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, term)\n"
        "open(os.path.join(d, 'started'), 'w').write('1')\n"
        "while True: time.sleep(0.1)\n"
    )
    pre_stop = "import os, time; open(os.environ['SCRATCH'] + '/prestop', 'w').write(repr(time.time())); time.sleep(1)"
    host_dir = f"/kubelet-test/{namespace}"
    pod = _pod(
        "graceful",
        kubelet.node_names[0],
        ["python", "-c", script],
        env=[{"name": "SCRATCH", "value": "/scratch"}],
        probe=False,
        container={
            "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
            "lifecycle": {"preStop": {"exec": {"command": ["python", "-c", pre_stop]}}},
        },
        volumes=[{"name": "scratch", "hostPath": {"path": host_dir, "type": "DirectoryOrCreate"}}],
        terminationGracePeriodSeconds=20,
    )
    core_v1.create_namespaced_pod(namespace, pod)
    scratch = kubelet.config.state_dir / "hostpath" / host_dir.lstrip("/")
    until(lambda: (scratch / "started").exists(), timeout=60, what="the container started")

    started = time.monotonic()
    core_v1.delete_namespaced_pod("graceful", namespace)
    until(lambda: _gone(core_v1, namespace, "graceful"), timeout=30, what="pod graceful gone")
    assert time.monotonic() - started < 15  # it exited on SIGTERM, long before the 20 s grace
    assert float((scratch / "prestop").read_text()) < float((scratch / "sigterm").read_text())
    assert all(p["name"] != "graceful" for p in kubelet.describe())


def test_secret_volume_appears_at_the_mount_path_and_follows_updates(core_v1: Any, namespace: str) -> None:
    core_v1.create_namespaced_secret(
        namespace, {"metadata": {"name": "api-keys"}, "stringData": {"keys": "sk-one\n"}}
    )
    pod = _pod(
        "keys",
        "gpu-node-1",
        _server("/etc/imagefleet/keys/keys"),
        container={"volumeMounts": [{"name": "keys", "mountPath": "/etc/imagefleet/keys", "readOnly": True}]},
        volumes=[{"name": "keys", "secret": {"secretName": "api-keys"}}],
    )
    core_v1.create_namespaced_pod(namespace, pod)
    ready = _wait_pod(core_v1, namespace, "keys", _ready, "Ready")
    url = f"http://{ready['status']['podIP']}:{PORT}"
    seen = json.loads(_get(url + "/"))
    assert seen["argv"][3] != "/etc/imagefleet/keys/keys" and seen["argv"][3].endswith("/keys/keys")
    assert _get(url + "/file") == b"sk-one\n"

    core_v1.patch_namespaced_secret("api-keys", namespace, {"stringData": {"keys": "sk-two\n"}})
    until(lambda: _get(url + "/file") == b"sk-two\n", timeout=30, what="the rotated key in the mounted file")


WHOAMI = r"""
import json, os
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
config.load_kube_config(os.environ["KUBECONFIG"])
api = client.ApiClient()
review = client.AuthenticationV1Api(api).create_self_subject_review(
    {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
)
try:
    names = [p.metadata.name for p in client.CoreV1Api(api).list_namespaced_pod(os.environ["NS"]).items]
    status = 200
except ApiException as err:
    names, status = [], err.status
print("RESULT " + json.dumps({"user": review.status.user_info.username, "status": status, "pods": names}))
"""


def _whoami(kubelet: ProcessKubelet, core_v1: Any, namespace: str, name: str) -> dict[str, Any]:
    env = [{"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}]
    pod = _pod(name, kubelet.node_names[1], ["python", "-c", WHOAMI], env=env, probe=False)
    pod["spec"].update(restartPolicy="Never", serviceAccountName="reader")
    core_v1.create_namespaced_pod(namespace, pod)
    log = kubelet.config.state_dir / "pods" / f"{namespace}_{name}" / "app.log"
    _wait_pod(core_v1, namespace, name, _phase("Succeeded"), "Succeeded")
    (line,) = [line for line in log.read_text().splitlines() if line.startswith("RESULT ")]
    return dict(json.loads(line.removeprefix("RESULT ")))


def test_service_account_kubeconfig_authenticates_as_the_pod_service_account(
    kubelet: ProcessKubelet, api_client: Any, core_v1: Any, namespace: str
) -> None:
    core_v1.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
    denied = _whoami(kubelet, core_v1, namespace, "whoami-1")
    assert denied == {"user": f"system:serviceaccount:{namespace}:reader", "status": 403, "pods": []}

    rbac: Any = client.RbacAuthorizationV1Api(api_client)
    rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "pod-reader"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}],
        },
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "reader-reads-pods"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
        },
    )
    allowed = _whoami(kubelet, core_v1, namespace, "whoami-2")
    assert allowed["status"] == 200 and "whoami-2" in allowed["pods"]


def test_restarted_kubelet_adopts_its_pods_and_force_delete_kills_at_once(
    control_plane: ControlPlane, core_v1: Any, namespace: str, tmp_path: Path
) -> None:
    config = KubeletConfig(
        kubeconfig=control_plane.kubeconfig,
        state_dir=tmp_path,
        nodes=1,
        first_index=210,
        node_prefix="adopt-",
    )
    first = ProcessKubelet(config).start()
    try:
        core_v1.create_namespaced_pod(namespace, _pod("adopted", "adopt-210", _server()))
        before = _wait_pod(core_v1, namespace, "adopted", _ready, "Ready")
    finally:
        first.stop()
    pid = int(before["status"]["containerStatuses"][0]["containerID"].removeprefix("process://"))
    until(lambda: not _alive(pid), timeout=10, what="the container dies with its kubelet")

    with ProcessKubelet(config) as second:
        after = _wait_pod(
            core_v1,
            namespace,
            "adopted",
            lambda p: _ready(p) and p["status"]["containerStatuses"][0]["restartCount"] == 1,
            "Ready again, restarted by the new kubelet",
        )
        assert after["status"]["podIP"] == before["status"]["podIP"]
        assert after["status"]["startTime"] == before["status"]["startTime"]
        new_pid = int(after["status"]["containerStatuses"][0]["containerID"].removeprefix("process://"))
        assert new_pid != pid
        core_v1.delete_namespaced_pod("adopted", namespace, grace_period_seconds=0)
        until(lambda: not _alive(new_pid), timeout=10, what="the force-deleted pod's process killed")
        until(lambda: not second.describe(), timeout=10, what="the kubelet forgot the pod")
    core_v1.delete_node("adopt-210")


def test_kubelet_survives_an_apiserver_restart(tmp_path: Path, bin_dir: Path) -> None:
    """A plane of its own (no process nodes: pod IPs would clash with the session plane's), whose
    apiserver is stopped and started again under an in-process kubelet."""
    plane = ControlPlane(Settings(state_dir=tmp_path / "plane", bin_dir=bin_dir, gpu_nodes=0))
    plane.start()
    config = KubeletConfig(
        kubeconfig=plane.kubeconfig, state_dir=tmp_path / "kubelet", first_index=220, node_prefix="steady-"
    )
    try:
        with plane.api_client() as api, ProcessKubelet(config):
            core = client.CoreV1Api(api)
            until(lambda: nodes.not_ready(core, ["steady-220"]) is None, timeout=60, what="node Ready")
            core.create_namespaced_pod("default", _pod("steady", "steady-220", _server()))
            before = _wait_pod(core, "default", "steady", _ready, "Ready")
            url = f"http://{before['status']['podIP']}:{PORT}/"

            (apiserver,) = [p for p in plane.processes if p.name == "kube-apiserver"]
            argv = Path(f"/proc/{apiserver.pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
            processes.stop(apiserver, 2)  # SIGKILL after 2 s: a crash, as far as clients can tell
            time.sleep(3)
            assert json.loads(_get(url))["argv"][1] == before["status"]["podIP"]  # still serving
            restarted = processes.start(
                "kube-apiserver", [a.decode() for a in argv], apiserver.log, detach=False
            )
            plane.processes[plane.processes.index(apiserver)] = restarted
            until(lambda: _responds(core), timeout=60, what="the apiserver back")

            core.delete_namespaced_pod("steady", "default")  # seen only through a new watch
            until(lambda: _gone(core, "default", "steady"), timeout=60, what="pod deleted after the restart")
            until(lambda: nodes.not_ready(core, ["steady-220"]) is None, timeout=30, what="node still Ready")
    finally:
        plane.stop()


def _responds(core: Any) -> bool:
    try:
        core.list_namespace(limit=1)
    except Exception:
        return False
    return True
