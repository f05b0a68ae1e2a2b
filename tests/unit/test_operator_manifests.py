"""What the operator asks of Kubernetes for one ImageGenerator: pure functions of the spec."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest

from imagefleet import cli, settings, wire
from imagefleet.operator import manifests
from imagefleet.operator.spec import InvalidSpec, parse
from imagefleet.settings import OperatorSettings, PodSettings, RouterSettings

OP = OperatorSettings()


def generator(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": {"id": "tiny", "dtype": "auto"},
        "replicas": 3,
        "batching": {"maxBatchSize": 4, "maxWaitMs": 500, "maxQueuedImages": 64, "policy": "auto"},
        "limits": {"maxImagesPerRequest": 10, "maxPixels": 4194304, "maxSteps": 150},
        "router": {"replicas": 1, "serviceType": "ClusterIP", "servicePort": 80},
    }
    base.update(spec)
    return {
        "apiVersion": wire.API_VERSION,
        "kind": wire.KIND,
        "metadata": {"name": "sd", "namespace": "team-a", "uid": "uid-1", "generation": 4},
        "spec": base,
    }


def container(pod: dict[str, Any]) -> dict[str, Any]:
    (c,) = pod["spec"]["containers"]
    return c


def test_the_pod_command_is_the_real_cli_with_the_specs_settings() -> None:
    g = parse(generator(defaults={"steps": 12, "size": "512x512"}, batching={"maxBatchSize": 8}), OP)
    pod = manifests.inference_pod(g, OP, slot=0)
    command = container(pod)["command"]
    assert command[:2] == ["imagefleet", "pod"]
    parsed = settings.load(PodSettings, cli.build_parser().parse_args(command[1:]), env={})
    assert parsed == g.pod
    assert (parsed.default_steps, parsed.default_size, parsed.max_batch_size) == (12, "512x512", 8)
    assert (parsed.host, parsed.port) == ("0.0.0.0", OP.pod_port)


def test_the_batching_mode_and_policy_reach_the_pod_command() -> None:
    g = parse(generator(batching={"mode": "step", "policy": "fixed", "maxWaitMs": 250}), OP)
    command = container(manifests.inference_pod(g, OP, slot=0))["command"]
    parsed = settings.load(PodSettings, cli.build_parser().parse_args(command[1:]), env={})
    assert (parsed.batch_mode, parsed.batch_policy, parsed.max_wait_ms) == ("step", "fixed", 250)
    plain = container(manifests.inference_pod(parse(generator(), OP), OP, slot=0))["command"]
    assert (
        settings.load(PodSettings, cli.build_parser().parse_args(plain[1:]), env={}).batch_mode == "request"
    )


def test_the_attention_kernel_reaches_the_pod_command() -> None:
    g = parse(generator(acceleration={"attention": "sdpa"}), OP)
    command = container(manifests.inference_pod(g, OP, slot=0))["command"]
    assert settings.load(PodSettings, cli.build_parser().parse_args(command[1:]), env={}).attention == "sdpa"


def test_each_pod_asks_for_exactly_one_gpu_of_the_named_resource() -> None:
    g = parse(generator(gpuResourceName="amd.com/gpu", resources={"requests": {"cpu": "4"}}), OP)
    resources = container(manifests.inference_pod(g, OP, 0))["resources"]
    assert resources["limits"]["amd.com/gpu"] == 1 and resources["requests"]["amd.com/gpu"] == 1
    assert resources["requests"]["cpu"] == "4"


def test_probes_use_the_pods_health_paths_and_startup_covers_the_load_budget() -> None:
    g = parse(generator(health={"startupTimeoutSeconds": 900}), OP)
    c = container(manifests.inference_pod(g, OP, 0))
    assert c["readinessProbe"]["httpGet"]["path"] == wire.READY_PATH
    assert c["livenessProbe"]["httpGet"]["path"] == wire.HEALTH_PATH
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 900


def test_the_grace_period_covers_prestop_drain_and_shutdown() -> None:
    g = parse(generator(), OP)
    pod = manifests.inference_pod(g, OP, 0)
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    pause = container(pod)["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pause == OP.prestop_delay_s
    assert grace >= pause + g.pod.drain_timeout_s + g.pod.shutdown_timeout_s
    assert grace >= pause + g.pod.stop_timeout_s


def test_pods_run_unprivileged_on_a_read_only_root_with_writable_tmp_and_cache() -> None:
    g = parse(generator(modelCache={"pvc": {"claimName": "weights"}, "mountPath": "/cache"}), OP)
    pod = manifests.inference_pod(g, OP, 0)
    c = container(pod)
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["automountServiceAccountToken"] is False
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts == {"tmp": "/tmp", "model-cache": "/cache"}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == "weights"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["HF_HOME"] == "/cache/huggingface" and env["TORCHINDUCTOR_CACHE_DIR"].startswith("/cache/")


HARDENED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
}


def test_pods_and_routers_run_as_a_fixed_non_root_user_with_the_default_seccomp_profile() -> None:
    g = parse(generator(), OP)
    pod_spec = manifests.inference_pod(g, OP, 0)["spec"]
    router_spec = manifests.router_deployment(g, OP)["spec"]["template"]["spec"]
    for spec in (pod_spec, router_spec):
        assert spec["securityContext"] == {
            "runAsNonRoot": True,
            "runAsUser": manifests.RUN_AS,
            "runAsGroup": manifests.RUN_AS,
            "fsGroup": manifests.RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        (c,) = spec["containers"]
        assert c["securityContext"] == HARDENED_CONTAINER
        (tmp,) = [v for v in spec["volumes"] if v["name"] == "tmp"]
        assert "emptyDir" in tmp and {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
        assert "hostNetwork" not in spec and "hostPID" not in spec
    assert manifests.RUN_AS != 0


def test_only_the_routers_the_operator_and_metrics_namespaces_reach_the_pods() -> None:
    op = dataclasses.replace(OP, operator_namespace="imagefleet-system", metrics_namespaces=("monitoring",))
    g = parse(generator(), op)
    (policy,) = [o for o in manifests.shared_objects(g, op) if o["kind"] == "NetworkPolicy"]
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": wire.pod_selector("sd")}
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    assert rule["ports"] == [{"port": g.pod.port, "protocol": "TCP"}]
    router, operator, monitoring = rule["from"]
    assert router == {
        "podSelector": {"matchLabels": {wire.LABEL_GENERATOR: "sd", wire.LABEL_COMPONENT: "router"}}
    }
    router_pod_labels = manifests.router_deployment(g, op)["spec"]["template"]["metadata"]["labels"]
    assert router["podSelector"]["matchLabels"].items() <= router_pod_labels.items()
    assert operator["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": "imagefleet-system"}
    }
    assert operator["podSelector"]["matchLabels"] == {
        wire.LABEL_PART_OF: "imagefleet",
        wire.LABEL_COMPONENT: "operator",
    }
    assert monitoring == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    # With no namespace of its own known (run outside the cluster) only the routers are let in.
    (bare,) = [o for o in manifests.shared_objects(g, OP) if o["kind"] == "NetworkPolicy"]
    assert bare["spec"]["ingress"][0]["from"] == [router]
    off = dataclasses.replace(OP, network_policy=False)
    assert "NetworkPolicy" not in {o["kind"] for o in manifests.shared_objects(g, off)}


def test_users_env_wins_over_the_operators() -> None:
    g = parse(generator(env=[{"name": "HF_HOME", "value": "/elsewhere"}, {"name": "X", "value": "1"}]), OP)
    env = container(manifests.inference_pod(g, OP, 0))["env"]
    assert [e["value"] for e in env if e["name"] == "HF_HOME"] == ["/elsewhere"]
    assert {"name": "X", "value": "1"} in env


def test_every_object_is_owned_by_the_generator_and_labelled() -> None:
    g = parse(generator(), OP)
    objects = [*manifests.shared_objects(g, OP), manifests.inference_pod(g, OP, 0)]
    kinds = sorted(o["kind"] for o in objects)
    shared = ["ConfigMap", "NetworkPolicy", "Service", "PodDisruptionBudget", "ServiceAccount", "Role"]
    shared.append("RoleBinding")
    assert kinds == sorted([*shared, "Deployment", "Service", "Pod"])
    for o in objects:
        (owner,) = o["metadata"]["ownerReferences"]
        assert owner == {
            "apiVersion": wire.API_VERSION,
            "kind": wire.KIND,
            "name": "sd",
            "uid": "uid-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
        assert o["metadata"]["labels"][wire.LABEL_GENERATOR] == "sd"
        assert o["metadata"]["namespace"] == "team-a"


def test_the_template_hash_follows_what_shapes_a_pod_and_nothing_else() -> None:
    base = parse(generator(), OP)
    same = manifests.template_hash(base, OP)
    assert manifests.template_hash(dataclasses.replace(base, replicas=7), OP) == same
    other_router = parse(generator(router={"replicas": 3, "serviceType": "NodePort", "servicePort": 80}), OP)
    assert manifests.template_hash(other_router, OP) == same
    for change in (
        {"model": {"id": "synthetic:sdxl"}},
        {"image": "registry/x:2"},
        {"batching": {"maxBatchSize": 2}},
    ):
        assert manifests.template_hash(parse(generator(**change), OP), OP) != same, change


def test_pod_names_are_deterministic_per_slot_and_template() -> None:
    g = parse(generator(), OP)
    names = {manifests.inference_pod(g, OP, s)["metadata"]["name"] for s in range(3)}
    again = {manifests.inference_pod(g, OP, s)["metadata"]["name"] for s in range(3)}
    assert names == again and len(names) == 3
    pod = manifests.inference_pod(g, OP, 2)
    assert pod["metadata"]["labels"][wire.LABEL_SLOT] == "2"
    assert pod["metadata"]["labels"][wire.LABEL_TEMPLATE_HASH] == manifests.template_hash(g, OP)
    assert wire.pod_selector("sd").items() <= pod["metadata"]["labels"].items()


def test_the_router_finds_exactly_its_pods_and_reads_keys_from_the_mounted_secret() -> None:
    g = parse(
        generator(
            router={
                "replicas": 2,
                "serviceType": "LoadBalancer",
                "servicePort": 80,
                "apiKeySecretRef": {"name": "keys", "key": "list"},
            }
        ),
        OP,
    )
    deployment = manifests.router_deployment(g, OP)
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    parsed = settings.load(RouterSettings, cli.build_parser().parse_args(c["command"][1:]), env={})
    assert parsed.discovery == "kubernetes" and parsed.namespace == "team-a"
    assert parsed.selector == wire.selector_string(wire.pod_selector("sd"))
    assert parsed.api_keys_file is not None and parsed.api_keys_file.endswith("/list")
    assert "list" not in " ".join(e.get("value", "") for e in c["env"])
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["api-keys"]["secret"]["secretName"] == "keys"
    mount = next(m for m in c["volumeMounts"] if m["name"] == "api-keys")
    assert parsed.api_keys_file.startswith(mount["mountPath"] + "/") and mount["readOnly"]
    assert deployment["spec"]["replicas"] == 2
    assert manifests.router_service(g)["spec"]["type"] == "LoadBalancer"


def test_the_routers_role_can_only_read_pods_and_its_own_generator() -> None:
    g = parse(generator(), OP)
    role = manifests.router_role(g)
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
        {
            "apiGroups": ["imagefleet.dev"],
            "resources": ["imagegenerators"],
            "resourceNames": [g.name],
            "verbs": ["get"],
        },
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"defaults": {"steps": 400}},
            "spec.defaults.steps (400) must not exceed spec.limits.maxSteps (150)",
        ),
        ({"batching": {"maxBatchSize": 64, "maxQueuedImages": 32}}, "spec.batching.maxBatchSize"),
        ({"modelCache": {"pvc": {"claimName": "a"}, "hostPath": {"path": "/x"}}}, "at most one of"),
    ],
)
def test_specs_the_schema_cannot_refuse_are_invalid_with_the_field_named(
    change: dict[str, Any], message: str
) -> None:
    body = generator()
    merged = copy.deepcopy(body)
    merged["spec"].update(change)
    with pytest.raises(InvalidSpec, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(merged, OP)
