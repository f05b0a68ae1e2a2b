"""The operator end to end on a real control plane: `kubectl apply` to images through the router.

The operator runs in this process under kopf's KopfRunner. Every pod it creates is scheduled by
the real kube-scheduler onto the control plane's process nodes, whose kubelet runs the pod's
real command (``imagefleet pod ...`` with the ``tiny`` model, ``imagefleet router ...``) at the
pod's IP and reports Ready from the real readiness probe. So the pod specs, probes, arguments,
service-account permissions, the router's discovery and the operator's scraping are all real.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import yaml
from kubernetes import client

from imagefleet import wire
from imagefleet.devcluster import nodes
from imagefleet.devcluster.controlplane import ControlPlane
from imagefleet.operator.handlers import Parts
from imagefleet.testing.operators import operator_settings, running_operator
from imagefleet.testing.routers import call
from imagefleet.testing.wait import until
from tests.cluster.conftest import Tools

POD_START_S = 120.0


@pytest.fixture(scope="module")
def operator(control_plane: ControlPlane, imagegenerator_crd: str) -> Iterator[Parts]:
    settings = operator_settings(
        status_interval_s=2.0,
        scrape_timeout_s=1.0,
        prestop_delay_s=1,
        pod_fault_injection=True,
    )
    with running_operator(control_plane.kubeconfig, settings) as parts:
        yield parts


class Generator:
    """One ImageGenerator of a test, read and changed the way a user does (kubectl, the API)."""

    def __init__(self, tools: Tools, api_client: Any, namespace: str, name: str = "tiny") -> None:
        self.tools = tools
        self.namespace = namespace
        self.name = name
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)

    def apply(self, **spec: Any) -> None:
        body = {
            "apiVersion": wire.API_VERSION,
            "kind": wire.KIND,
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {"model": {"id": "tiny"}, **spec},
        }
        self.tools.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(body))

    def get(self) -> dict[str, Any]:
        body: dict[str, Any] = self.custom.get_namespaced_custom_object(
            wire.GROUP, wire.VERSION, self.namespace, wire.PLURAL, self.name
        )
        return body

    def status(self) -> dict[str, Any]:
        return dict(self.get().get("status") or {})

    def condition(self, type_: str) -> dict[str, Any]:
        return next((c for c in self.status().get("conditions") or [] if c["type"] == type_), {})

    def pods(self, component: str = wire.COMPONENT_POD) -> list[Any]:
        selector = wire.selector_string({wire.LABEL_GENERATOR: self.name, wire.LABEL_COMPONENT: component})
        return list(self.core.list_namespaced_pod(self.namespace, label_selector=selector).items)

    def live_pods(self) -> list[Any]:
        return [p for p in self.pods() if not p.metadata.deletion_timestamp]

    def wait_serving(self, replicas: int, timeout: float = POD_START_S) -> dict[str, Any]:
        """Until the status says ``replicas`` pods are ready, up to date, and Ready is True."""

        def settled() -> dict[str, Any] | None:
            st = self.status()
            ready = self.condition("Ready").get("status") == "True"
            counts = (st.get("replicas"), st.get("readyReplicas"), st.get("updatedReplicas"))
            if ready and counts == (replicas, replicas, replicas) and len(self.pods()) == replicas:
                return st
            return None

        return until(
            settled, timeout=timeout, what=f"{replicas} ready pods of {self.name}", describe=self.describe
        )

    def router_url(self) -> str:
        def ready_ip() -> str | None:
            for p in self.pods(wire.COMPONENT_ROUTER):
                conditions = p.status.conditions or []
                if p.status.pod_ip and any(c.type == "Ready" and c.status == "True" for c in conditions):
                    return str(p.status.pod_ip)
            return None

        ip = until(ready_ip, timeout=POD_START_S, what="a ready router pod", describe=self.describe)
        return f"http://{ip}:8000"

    def events(self) -> list[Any]:
        listed = self.core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={self.name}"
        )
        return list(listed.items)

    def describe(self) -> str:
        pods = [(p.metadata.name, p.status.phase, p.status.pod_ip) for p in self.pods()]
        return f"pods {pods}; status {self.status()}"


@pytest.fixture
def generator(tools: Tools, api_client: Any, namespace: str, operator: Parts) -> Generator:
    return Generator(tools, api_client, namespace)


def _openai(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


class Traffic:
    """A client that keeps sending requests through the router until stopped, counting outcomes."""

    def __init__(self, url: str, *, steps: int = 2) -> None:
        self.url = url
        self.steps = steps
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                reply = call(
                    "POST",
                    self.url + "/v1/images/generations",
                    {"prompt": "a lighthouse", "size": "64x64", "num_inference_steps": self.steps},
                    timeout=120,
                )
            except OSError as exc:  # no answer at all: lost, as far as the client can tell
                self.failures.append(f"{type(exc).__name__}: {exc}")
                continue
            if reply.status == 200:
                self.ok += 1
            else:
                self.failures.append(f"{reply.status}: {str(reply.body)[:200]}")


# --- the tests --------------------------------------------------------------------------------


def test_apply_gives_one_gpu_pods_a_router_and_a_ready_status(generator: Generator, tools: Tools) -> None:
    generator.apply(replicas=3)
    st = generator.wait_serving(3)
    pods = generator.pods()
    assert len({p.spec.node_name for p in pods}) >= 1
    for p in pods:
        (c,) = p.spec.containers
        assert c.resources.limits["nvidia.com/gpu"] == "1"
        assert c.command[:2] == ["imagefleet", "pod"]
        assert p.metadata.owner_references[0].kind == wire.KIND
    assert st["routerEndpoint"] == f"http://tiny-router.{generator.namespace}.svc/v1"
    assert st["selector"] == wire.selector_string(wire.pod_selector("tiny"))

    url = generator.router_url()
    until(
        lambda: generator.status().get("routerReadyReplicas") == 1, timeout=30, what="router ready in status"
    )
    images = _openai(url).images.generate(model="tiny", prompt="a lighthouse", n=2, size="64x64")
    assert len(images.data) == 2 and images.data[0].b64_json
    for _ in range(5):
        _openai(url).images.generate(prompt="a fox", size="64x64")

    def counted() -> dict[str, Any] | None:
        st = generator.status()
        entries = st.get("pods") or []
        done = sum(e.get("completed", 0) for e in entries)
        return st if len(entries) == 3 and done >= 7 and st.get("imagesCompleted", 0) >= 7 else None

    st = until(counted, timeout=30, what="the status counting the 7 images", describe=generator.describe)
    assert all(e["phase"] == "Ready" and e["ready"] and e["updated"] for e in st["pods"])
    assert all("avgBatchSeconds" in e and "node" in e for e in st["pods"])
    table = tools.kubectl("get", "imggen", "-n", generator.namespace).stdout
    header, row = table.splitlines()[:2]
    assert header.split()[:5] == ["NAME", "REPLICAS", "READY", "QUEUED", "IMG/MIN"]
    assert row.split()[:3] == ["tiny", "3", "3"]


def test_kubectl_scale_changes_the_pods(generator: Generator, tools: Tools) -> None:
    generator.apply(replicas=1)
    generator.wait_serving(1)
    tools.kubectl("scale", "imggen/tiny", "--replicas=3", "-n", generator.namespace)
    generator.wait_serving(3)
    tools.kubectl("scale", "imggen/tiny", "--replicas=2", "-n", generator.namespace)
    generator.wait_serving(2)
    slots = sorted(p.metadata.labels[wire.LABEL_SLOT] for p in generator.pods())
    assert slots == ["0", "1"]
    assert generator.get()["spec"]["replicas"] == 2


def test_a_gpu_starved_scale_up_is_reported(
    generator: Generator, tools: Tools, core_v1: Any, namespace: str
) -> None:
    """Pods ask for a GPU kind only one small KWOK node has: the third stays Pending, and says so."""
    resource = "example.com/gpu"
    node = f"starved-{namespace}"[:63]
    nodes.create(core_v1, [nodes.gpu_node(node, nodes.MAX_NODES - 60, gpus=2, gpu_resource=resource)])
    try:
        until(lambda: nodes.not_ready(core_v1, [node]) is None, timeout=60, what="the KWOK node")
        generator.apply(replicas=1, gpuResourceName=resource, router={"replicas": 0})
        until(lambda: len(generator.pods()) == 1, timeout=30, what="the first pod")
        tools.kubectl("scale", "imggen/tiny", "--replicas=3", "-n", namespace)

        def starved() -> dict[str, Any] | None:
            degraded = generator.condition("Degraded")
            return degraded if degraded.get("reason") == "InsufficientGPU" else None

        degraded = until(starved, timeout=60, what="Degraded=InsufficientGPU", describe=generator.describe)
        assert degraded["status"] == "True"
        assert f"Insufficient {resource}" in degraded["message"]
        assert "1 pod(s)" in degraded["message"]
        pending = [p for p in generator.pods() if p.status.phase == "Pending"]
        assert len(pending) == 1
        assert generator.condition("Ready")["reason"] == "ReplicasNotReady"
        entry = next(e for e in generator.status()["pods"] if e["name"] == pending[0].metadata.name)
        assert entry["phase"] == "Pending"
    finally:
        core_v1.delete_node(node)


def test_changing_the_model_settings_rolls_the_pods_without_failing_a_request(generator: Generator) -> None:
    generator.apply(replicas=2, batching={"maxBatchSize": 2})
    generator.wait_serving(2)
    before = {p.metadata.name for p in generator.pods()}
    url = generator.router_url()
    with Traffic(url) as traffic:
        until(lambda: traffic.ok >= 3, timeout=60, what="traffic flowing")
        generator.apply(replicas=2, batching={"maxBatchSize": 3})

        def rolled() -> bool:
            names = {p.metadata.name for p in generator.pods()}
            return (
                not (names & before)
                and len(names) == 2
                and generator.condition("Ready").get("status") == "True"
            )

        until(rolled, timeout=2 * POD_START_S, what="both pods replaced", describe=generator.describe)
        sent = traffic.ok
        until(lambda: traffic.ok >= sent + 3, timeout=60, what="traffic on the new pods")
    assert traffic.failures == []
    assert all("--max-batch-size" in p.spec.containers[0].command for p in generator.pods())
    assert {
        p.spec.containers[0].command[p.spec.containers[0].command.index("--max-batch-size") + 1]
        for p in generator.pods()
    } == {"3"}
    assert generator.condition("Progressing")["status"] == "False"


def test_a_quarantined_pod_is_replaced_with_an_event(generator: Generator) -> None:
    generator.apply(replicas=2)
    generator.wait_serving(2)
    url = generator.router_url()
    victim = generator.pods()[0]
    pod_url = f"http://{victim.status.pod_ip}:8001"
    reply = call("POST", pod_url + "/debug/faults", {"kind": "runtime", "count": 50})
    assert reply.status == 200, reply.body
    for _ in range(3):  # straight at the pod: three failed batches quarantine it
        call("POST", pod_url + "/v1/images/generations", {"prompt": "x", "size": "64x64"})
    until(
        lambda: call("GET", pod_url + wire.READY_PATH).status == 503, timeout=30, what="the pod quarantined"
    )
    with Traffic(url) as traffic:

        def replaced() -> bool:
            uids = {p.metadata.uid for p in generator.live_pods()}
            return victim.metadata.uid not in uids and len(uids) == 2

        until(replaced, timeout=60, what="the quarantined pod replaced", describe=generator.describe)
        generator.wait_serving(2)
        sent = traffic.ok
        until(lambda: traffic.ok >= sent + 3, timeout=60, what="traffic after the replacement")
    assert traffic.failures == []
    events = generator.events()
    assert any(e.reason == "PodReplaced" and "Quarantined" in (e.message or e.note or "") for e in events), [
        (e.reason, e.message) for e in events
    ]


def test_a_spec_the_schema_cannot_check_is_reported_in_a_condition(generator: Generator) -> None:
    generator.apply(replicas=1, defaults={"size": "8192x512"})

    def reported() -> dict[str, Any] | None:
        ready = generator.condition("Ready")
        return ready if ready.get("reason") == "InvalidSpec" else None

    ready = until(reported, timeout=30, what="Ready=False InvalidSpec")
    assert "spec.defaults.size" in ready["message"]
    assert generator.pods() == []
    generator.apply(replicas=1, defaults={"size": "64x64"})
    generator.wait_serving(1)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"replicas": -1}, "spec.replicas"),
        ({"batching": {"maxBatchSize": 16, "maxQueuedImages": 8}}, "batching.maxBatchSize must not exceed"),
        ({"defaults": {"steps": 400}}, "defaults.steps must not exceed limits.maxSteps"),
        (
            {"batching": {"maxQueuedGpuSeconds": 100}, "limits": {"maxRequestGpuSeconds": 200.5}},
            "limits.maxRequestGpuSeconds must not exceed batching.maxQueuedGpuSeconds",
        ),
        ({"autoscaling": {"minReplicas": 3, "maxReplicas": 2}}, "minReplicas must not exceed"),
        ({"router": {"serviceType": "Ingress"}}, "spec.router.serviceType"),
    ],
)
def test_invalid_specs_are_refused_naming_the_field(
    tools: Tools, namespace: str, imagegenerator_crd: str, spec: dict[str, Any], message: str
) -> None:
    body = {
        "apiVersion": wire.API_VERSION,
        "kind": wire.KIND,
        "metadata": {"name": "bad", "namespace": namespace},
        "spec": {"model": {"id": "tiny"}, **spec},
    }
    result = tools.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(body), check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_deleting_the_generator_removes_everything_it_made(generator: Generator, api_client: Any) -> None:
    generator.apply(replicas=1)
    generator.wait_serving(1)
    ns = generator.namespace
    core, apps = client.CoreV1Api(api_client), client.AppsV1Api(api_client)
    rbac, policy = client.RbacAuthorizationV1Api(api_client), client.PolicyV1Api(api_client)
    selector = f"{wire.LABEL_GENERATOR}=tiny"

    def owned() -> dict[str, int]:
        return {
            "pods": len(core.list_namespaced_pod(ns, label_selector=selector).items),
            "services": len(core.list_namespaced_service(ns, label_selector=selector).items),
            "configmaps": len(core.list_namespaced_config_map(ns, label_selector=selector).items),
            "serviceaccounts": len(core.list_namespaced_service_account(ns, label_selector=selector).items),
            "deployments": len(apps.list_namespaced_deployment(ns, label_selector=selector).items),
            "roles": len(rbac.list_namespaced_role(ns, label_selector=selector).items),
            "rolebindings": len(rbac.list_namespaced_role_binding(ns, label_selector=selector).items),
            "pdbs": len(policy.list_namespaced_pod_disruption_budget(ns, label_selector=selector).items),
        }

    assert owned() == {
        "pods": 2,  # the inference pod and the router pod
        "services": 2,
        "configmaps": 1,
        "serviceaccounts": 1,
        "deployments": 1,
        "roles": 1,
        "rolebindings": 1,
        "pdbs": 1,
    }
    generator.tools.kubectl("delete", "imggen/tiny", "-n", ns, "--wait=true", "--timeout=60s")
    until(
        lambda: not any(owned().values()),
        timeout=120,
        what="everything collected",
        describe=lambda: str(owned()),
    )


def test_autoscaling_follows_queued_work_up_and_back_down(generator: Generator) -> None:
    """Any queue asks for more pods: the target is far below one request's cost on any machine
    (the tiny model's 64x64 image takes milliseconds at best), so the scale-up depends on there
    being a queue, not on how fast this machine clears it."""
    generator.apply(
        replicas=1,
        autoscaling={
            "minReplicas": 1,
            "maxReplicas": 3,
            "targetQueuedSecondsPerReplica": 0.001,
            "scaleDownDelaySeconds": 10,
        },
        batching={"maxBatchSize": 1},
    )
    generator.wait_serving(1)
    url = generator.router_url()

    def scaled_up() -> bool:  # the scale and the status that explains it are two writes
        body = generator.get()
        return bool(
            body["spec"]["replicas"] >= 2 and (body.get("status") or {}).get("desiredReplicas", 0) >= 2
        )

    with contextlib.ExitStack() as stack:  # a queue: more work than one pod clears at once
        held = [stack.enter_context(Traffic(url, steps=8)) for _ in range(4)]
        until(scaled_up, timeout=90, what="a scale-up under load", describe=generator.describe)
    assert all(not t.failures for t in held), [t.failures for t in held]
    until(
        lambda: generator.get()["spec"]["replicas"] == 1, timeout=120, what="the scale-down after the delay"
    )
    generator.wait_serving(1)
    reasons = [e.reason for e in generator.events()]
    assert reasons.count("Scaled") >= 2


def test_api_keys_come_from_the_secret_and_follow_its_rotation(
    generator: Generator, core_v1: Any, namespace: str
) -> None:
    core_v1.create_namespaced_secret(
        namespace, {"metadata": {"name": "keys"}, "stringData": {"api-keys": "sk-first\n"}}
    )
    generator.apply(replicas=1, router={"apiKeySecretRef": {"name": "keys"}})
    generator.wait_serving(1)
    url = generator.router_url()
    router_pod = generator.pods(wire.COMPONENT_ROUTER)[0]
    rendered = " ".join(router_pod.spec.containers[0].command) + str(router_pod.spec.containers[0].env)
    assert "sk-first" not in rendered

    def status_with(key: str | None) -> int:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        body = {"prompt": "x", "size": "64x64", "num_inference_steps": 1}
        return call("POST", url + "/v1/images/generations", body, headers=headers).status

    assert status_with(None) == 401
    assert status_with("sk-wrong") == 401
    assert status_with("sk-first") == 200
    core_v1.patch_namespaced_secret("keys", namespace, {"stringData": {"api-keys": "sk-second\n"}})
    until(lambda: status_with("sk-second") == 200, timeout=60, what="the rotated key accepted")
    assert status_with("sk-first") == 401


def _can_i(tools: Tools, who: str, *args: str) -> bool:
    result = tools.kubectl("auth", "can-i", f"--as={who}", *args, check=False)
    answer = str(result.stdout).strip()
    assert answer.startswith(("yes", "no")), result.stderr
    return answer.startswith("yes")


def test_the_routers_service_account_can_find_its_pods_and_nothing_more(
    generator: Generator, tools: Tools
) -> None:
    generator.apply(replicas=1)
    generator.wait_serving(1)
    ns = generator.namespace
    who = f"system:serviceaccount:{ns}:tiny-router"
    for verb in ("get", "list", "watch"):
        assert _can_i(tools, who, verb, "pods", "-n", ns)
    assert _can_i(tools, who, "get", "imagegenerators.imagefleet.dev/tiny", "-n", ns)  # the fleet page
    denied = [
        ("get", "imagegenerators.imagefleet.dev/other", "-n", ns),
        ("list", "imagegenerators.imagefleet.dev", "-n", ns),
        ("get", "secrets", "-n", ns),
        ("list", "secrets", "--all-namespaces"),
        ("list", "pods", "-n", "default"),
        ("list", "pods", "--all-namespaces"),
        ("create", "pods", "-n", ns),
        ("delete", "pods", "-n", ns),
        ("create", "pods", "--subresource=exec", "-n", ns),
        ("get", "pods", "--subresource=log", "-n", ns),
        ("list", "configmaps", "-n", ns),
        ("patch", "imagegenerators.imagefleet.dev", "-n", ns),
        ("create", "networkpolicies.networking.k8s.io", "-n", ns),
        ("delete", "customresourcedefinitions.apiextensions.k8s.io"),
        ("list", "nodes"),
    ]
    assert [d for d in denied if _can_i(tools, who, *d)] == []


def test_what_the_operator_creates_is_locked_down(generator: Generator, api_client: Any) -> None:
    """The process kubelet does not enforce securityContext or NetworkPolicy: the objects the API
    server holds are checked instead."""
    generator.apply(replicas=1)
    generator.wait_serving(1)
    ns = generator.namespace
    policy = client.NetworkingV1Api(api_client).read_namespaced_network_policy("tiny-pods", ns)
    assert policy.spec.pod_selector.match_labels == wire.pod_selector("tiny")
    assert policy.spec.policy_types == ["Ingress"]
    (rule,) = policy.spec.ingress
    assert [(p.port, p.protocol) for p in rule.ports] == [(8001, "TCP")]
    peers = [p.pod_selector.match_labels for p in rule._from if p.namespace_selector is None]
    assert peers == [{wire.LABEL_GENERATOR: "tiny", wire.LABEL_COMPONENT: wire.COMPONENT_ROUTER}]

    deployment = client.AppsV1Api(api_client).read_namespaced_deployment("tiny-router", ns)
    specs = [p.spec for p in generator.pods()] + [deployment.spec.template.spec]
    for spec in specs:
        pod_sc = spec.security_context
        assert pod_sc.run_as_non_root and pod_sc.run_as_user == 10001
        assert pod_sc.seccomp_profile.type == "RuntimeDefault"
        (c,) = spec.containers
        sc = c.security_context
        assert sc.read_only_root_filesystem and sc.allow_privilege_escalation is False
        assert sc.capabilities.drop == ["ALL"] and not sc.capabilities.add
        assert any(v.name == "tmp" and v.empty_dir is not None for v in spec.volumes)
    secrets = generator.core.list_namespaced_secret(ns, label_selector=f"{wire.LABEL_GENERATOR}=tiny")
    assert secrets.items == []  # no API key is invented: a router without one says so in its log
