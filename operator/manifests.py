"""What an ImageGenerator should consist of: pure functions from its spec to Kubernetes objects.

Nothing here talks to the API. Every object carries the generator's labels and an
ownerReference to it, so deleting the ImageGenerator lets the garbage collector remove the rest.
The operator applies these with server-side apply under one field manager: fields it does not
set (an HPA's replicas, a user's extra labels) stay whoever else's.

Objects of one generator ``g``:

* inference pods ``g-<template hash>-<slot>``: one GPU each; their names are deterministic, so
  applying the same plan twice (an operator restarted mid-way) never makes a duplicate;
* ``g-pods``: a headless Service over the inference pods (stable DNS for each pod);
* ``g-router`` Deployment + Service, ServiceAccount, Role and RoleBinding (list/watch pods in
  this namespace, nothing else);
* ``g-config``: a ConfigMap with the settings the pods and routers were rendered from;
* ``g-pods`` PodDisruptionBudget: at most one inference pod voluntarily disrupted at a time;
* ``g-pods`` NetworkPolicy (unless ``--no-network-policy``): the inference pods' port is open to
  the generator's routers, the operator's pods (it scrapes them) and the pods of
  ``--metrics-namespaces`` only. Inference pods have no authentication of their own: they trust
  whoever reaches them, so this policy is what keeps everyone else from going around the router.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from imagefleet import settings as settings_mod
from imagefleet import wire
from imagefleet.operator.spec import API_KEYS_DIR, GeneratorSpec, pod_command, router_command
from imagefleet.settings import OperatorSettings

Manifest = dict[str, Any]

POD_CONTAINER = "pod"
ROUTER_CONTAINER = "router"
RUN_AS = 10001
HASH_CHARS = 10
READINESS_PERIOD_S = 5
STARTUP_PERIOD_S = 2


def object_reference(g: GeneratorSpec) -> dict[str, Any]:
    """The ImageGenerator as an object reference (what an Event is ``regarding``)."""
    return {
        "apiVersion": wire.API_VERSION,
        "kind": wire.KIND,
        "name": g.name,
        "namespace": g.namespace,
        "uid": g.uid,
    }


def owner_reference(g: GeneratorSpec) -> dict[str, Any]:
    """The ImageGenerator as the controlling owner of an object in its namespace."""
    reference = object_reference(g)
    del reference["namespace"]  # owners are always in the object's own namespace
    return {**reference, "controller": True, "blockOwnerDeletion": True}


def _meta(g: GeneratorSpec, name: str, component: str, **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": g.namespace,
        "labels": wire.generator_labels(g.name, component),
        "ownerReferences": [owner_reference(g)],
    }
    meta.update(extra)
    return meta


def stable_hash(value: Any) -> str:
    """A short hash of a JSON-able value, the same in every process and every run."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_CHARS]


# --- names ----------------------------------------------------------------------------------------


def router_name(g: GeneratorSpec) -> str:
    return f"{g.name}-router"


def pods_service_name(g: GeneratorSpec) -> str:
    return f"{g.name}-pods"


def config_name(g: GeneratorSpec) -> str:
    return f"{g.name}-config"


def pod_name(g: GeneratorSpec, template_hash: str, slot: int) -> str:
    return f"{g.name}-{template_hash}-{slot}"


def router_endpoint(g: GeneratorSpec) -> str:
    """The URL clients use inside the cluster: the router Service's DNS name."""
    port = "" if g.router.service_port == 80 else f":{g.router.service_port}"
    return f"http://{router_name(g)}.{g.namespace}.svc{port}/v1"


# --- inference pods -------------------------------------------------------------------------------


def _security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "fsGroup": RUN_AS,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _probe(path: str, period_s: int, failures: int, timeout_s: int = 3) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period_s,
        "timeoutSeconds": timeout_s,
        "failureThreshold": failures,
    }


def _cache_volume(g: GeneratorSpec) -> dict[str, Any]:
    cache = g.model_cache
    if cache.pvc:
        return {
            "name": "model-cache",
            "persistentVolumeClaim": {"claimName": cache.pvc, "readOnly": cache.read_only},
        }
    if cache.host_path:
        return {"name": "model-cache", "hostPath": {"path": cache.host_path, "type": "DirectoryOrCreate"}}
    empty: dict[str, Any] = {"sizeLimit": cache.size_limit} if cache.size_limit else {}
    return {"name": "model-cache", "emptyDir": empty}


def _pod_env(g: GeneratorSpec) -> list[dict[str, Any]]:
    cache = g.model_cache.mount_path.rstrip("/") or "/"
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": f"{cache}/huggingface"},
        {"name": "TORCHINDUCTOR_CACHE_DIR", "value": f"{cache}/torchinductor"},
        {"name": "TRITON_CACHE_DIR", "value": f"{cache}/triton"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if g.model_cache.read_only:
        env.append({"name": "HF_HUB_OFFLINE", "value": "1"})
    overridden = {u["name"] for u in g.env}  # the user's own value of a variable wins
    return [e for e in env if e["name"] not in overridden] + list(g.env)


def _pod_resources(g: GeneratorSpec) -> dict[str, Any]:
    requests = dict(g.resources.get("requests") or {})
    limits = dict(g.resources.get("limits") or {})
    requests[g.gpu_resource] = 1
    limits[g.gpu_resource] = 1
    return {"requests": requests, "limits": limits}


def termination_grace_s(g: GeneratorSpec, operator: OperatorSettings) -> int:
    """preStop pause + the pod's stop budget (which already exceeds its drain and shutdown)."""
    return int(operator.prestop_delay_s + g.pod.stop_timeout_s + 0.999)


def pod_template(g: GeneratorSpec, operator: OperatorSettings) -> Manifest:
    """Everything that shapes an inference pod, slot and name aside; its hash names the pods."""
    startup_failures = max(1, -(-g.health.startup_timeout_s // STARTUP_PERIOD_S))
    spec: dict[str, Any] = {
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": termination_grace_s(g, operator),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": _pod_security_context(),
        "containers": [
            {
                "name": POD_CONTAINER,
                "image": g.image,
                "command": pod_command(g.pod),
                "ports": [{"name": "http", "containerPort": g.pod.port, "protocol": "TCP"}],
                "env": _pod_env(g),
                "resources": _pod_resources(g),
                "startupProbe": _probe(wire.READY_PATH, STARTUP_PERIOD_S, startup_failures),
                "readinessProbe": _probe(wire.READY_PATH, READINESS_PERIOD_S, 2),
                "livenessProbe": _probe(wire.HEALTH_PATH, 10, 6, timeout_s=5),
                "lifecycle": {"preStop": {"sleep": {"seconds": operator.prestop_delay_s}}},
                "securityContext": _security_context(),
                "volumeMounts": [
                    {"name": "tmp", "mountPath": "/tmp"},
                    {
                        "name": "model-cache",
                        "mountPath": g.model_cache.mount_path,
                        "readOnly": g.model_cache.read_only,
                    },
                ],
            }
        ],
        "volumes": [{"name": "tmp", "emptyDir": {}}, _cache_volume(g)],
    }
    container = spec["containers"][0]
    if g.image_pull_policy:
        container["imagePullPolicy"] = g.image_pull_policy
    if operator.prestop_delay_s == 0:
        del container["lifecycle"]
    if g.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": n} for n in g.image_pull_secrets]
    if g.node_selector:
        spec["nodeSelector"] = dict(g.node_selector)
    if g.tolerations:
        spec["tolerations"] = list(g.tolerations)
    if g.affinity:
        spec["affinity"] = g.affinity
    if g.priority_class:
        spec["priorityClassName"] = g.priority_class
    return {
        "labels": dict(g.pod_labels),
        "annotations": {
            **g.pod_annotations,
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(g.pod.port),
            "prometheus.io/path": wire.METRICS_PATH,
        },
        "spec": spec,
    }


def template_hash(g: GeneratorSpec, operator: OperatorSettings) -> str:
    return stable_hash(pod_template(g, operator))


def inference_pod(g: GeneratorSpec, operator: OperatorSettings, slot: int) -> Manifest:
    """The pod of ``slot`` (0..replicas-1) at the current template."""
    template = pod_template(g, operator)
    digest = stable_hash(template)
    labels = {
        **template["labels"],
        **wire.generator_labels(g.name, wire.COMPONENT_POD),
        wire.LABEL_SLOT: str(slot),
        wire.LABEL_TEMPLATE_HASH: digest,
    }
    meta = _meta(g, pod_name(g, digest, slot), wire.COMPONENT_POD)
    meta["labels"] = labels
    meta["annotations"] = template["annotations"]
    spec = dict(template["spec"])
    spec["hostname"] = meta["name"][:63].rstrip("-")
    spec["subdomain"] = pods_service_name(g)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


# --- everything else ------------------------------------------------------------------------------


def settings_config_map(g: GeneratorSpec) -> Manifest:
    """The settings pods and routers run with, for people and tools (`kubectl get cm g-config`)."""
    data = {
        "pod-settings.json": json.dumps(settings_mod.describe(g.pod), indent=2, sort_keys=True),
        "router-settings.json": json.dumps(
            settings_mod.describe(g.router_settings), indent=2, sort_keys=True
        ),
    }
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(g, config_name(g), wire.COMPONENT_POD),
        "data": data,
    }


def pods_service(g: GeneratorSpec) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(g, pods_service_name(g), wire.COMPONENT_POD),
        "spec": {
            "clusterIP": "None",
            "selector": wire.pod_selector(g.name),
            "ports": [{"name": "http", "port": g.pod.port, "targetPort": "http", "protocol": "TCP"}],
            "publishNotReadyAddresses": False,
        },
    }


def disruption_budget(g: GeneratorSpec) -> Manifest:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(g, pods_service_name(g), wire.COMPONENT_POD),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": wire.pod_selector(g.name)},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
"""Set by the API server on every namespace: a namespaceSelector by name."""


def network_policy(g: GeneratorSpec, operator: OperatorSettings) -> Manifest:
    """Who may reach the inference pods: the generator's routers, the operator, metrics scrapers."""
    peers: list[dict[str, Any]] = [{"podSelector": {"matchLabels": _router_labels(g)}}]
    if operator.operator_namespace:
        peers.append(
            {
                "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: operator.operator_namespace}},
                "podSelector": {
                    "matchLabels": {
                        wire.LABEL_PART_OF: wire.APP_NAME,
                        wire.LABEL_COMPONENT: wire.COMPONENT_OPERATOR,
                    }
                },
            }
        )
    peers += [
        {"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: ns}}}
        for ns in operator.metrics_namespaces
    ]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(g, pods_service_name(g), wire.COMPONENT_POD),
        "spec": {
            "podSelector": {"matchLabels": wire.pod_selector(g.name)},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": peers, "ports": [{"port": g.pod.port, "protocol": "TCP"}]}],
        },
    }


def router_service_account(g: GeneratorSpec) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta(g, router_name(g), wire.COMPONENT_ROUTER),
        "automountServiceAccountToken": True,
    }


def router_role(g: GeneratorSpec) -> Manifest:
    """What a router needs: to find its pods, and to read its own ImageGenerator (the fleet page
    shows its conditions). Nothing else (no Secrets: keys come as a file)."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _meta(g, router_name(g), wire.COMPONENT_ROUTER),
        "rules": [*ROUTER_RULES_PODS, _own_generator_rule(g)],
    }


ROUTER_RULES_PODS: list[dict[str, Any]] = [
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
]


def _own_generator_rule(g: GeneratorSpec) -> dict[str, Any]:
    return {
        "apiGroups": [wire.GROUP],
        "resources": [wire.PLURAL],
        "resourceNames": [g.name],
        "verbs": ["get"],
    }


def router_role_binding(g: GeneratorSpec) -> Manifest:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta(g, router_name(g), wire.COMPONENT_ROUTER),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": router_name(g)},
        "subjects": [{"kind": "ServiceAccount", "name": router_name(g), "namespace": g.namespace}],
    }


def _router_labels(g: GeneratorSpec) -> dict[str, str]:
    return {wire.LABEL_GENERATOR: g.name, wire.LABEL_COMPONENT: wire.COMPONENT_ROUTER}


def router_deployment(g: GeneratorSpec, operator: OperatorSettings) -> Manifest:
    rs = g.router_settings
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]
    if g.router.api_keys is not None:
        ref = g.router.api_keys
        volumes.append(
            {
                "name": "api-keys",
                "secret": {
                    "secretName": ref.name,
                    "items": [{"key": ref.key, "path": ref.key}],
                    "defaultMode": 0o440,
                },
            }
        )
        mounts.append({"name": "api-keys", "mountPath": API_KEYS_DIR, "readOnly": True})
    container: dict[str, Any] = {
        "name": ROUTER_CONTAINER,
        "image": operator.router_image,
        "command": router_command(rs),
        "ports": [{"name": "http", "containerPort": rs.port, "protocol": "TCP"}],
        "env": [{"name": "HOME", "value": "/tmp"}, {"name": "PYTHONUNBUFFERED", "value": "1"}],
        "readinessProbe": _probe(wire.READY_PATH, 2, 2, timeout_s=2),
        "livenessProbe": _probe(wire.HEALTH_PATH, 10, 6, timeout_s=5),
        "securityContext": _security_context(),
        "volumeMounts": mounts,
    }
    if g.router.resources:
        container["resources"] = g.router.resources
    if operator.image_pull_policy:
        container["imagePullPolicy"] = operator.image_pull_policy
    labels = {**wire.generator_labels(g.name, wire.COMPONENT_ROUTER)}
    pod_spec: dict[str, Any] = {
        "serviceAccountName": router_name(g),
        "automountServiceAccountToken": True,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": int(rs.stop_timeout_s + 0.999),
        "securityContext": _pod_security_context(),
        "containers": [container],
        "volumes": volumes,
    }
    if g.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in g.image_pull_secrets]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(g, router_name(g), wire.COMPONENT_ROUTER),
        "spec": {
            "replicas": g.router.replicas,
            "selector": {"matchLabels": _router_labels(g)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        wire.ANNOTATION_CONFIG_HASH: stable_hash(settings_mod.describe(rs)),
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(rs.port),
                        "prometheus.io/path": wire.METRICS_PATH,
                    },
                },
                "spec": pod_spec,
            },
        },
    }


def router_service(g: GeneratorSpec) -> Manifest:
    spec: dict[str, Any] = {
        "type": g.router.service_type,
        "selector": _router_labels(g),
        "ports": [{"name": "http", "port": g.router.service_port, "targetPort": "http", "protocol": "TCP"}],
    }
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(g, router_name(g), wire.COMPONENT_ROUTER),
        "spec": spec,
    }


def shared_objects(g: GeneratorSpec, operator: OperatorSettings) -> list[Manifest]:
    """Every object of the generator except the inference pods, in an order that applies cleanly."""
    policy = [network_policy(g, operator)] if operator.network_policy else []
    return [
        settings_config_map(g),
        *policy,
        pods_service(g),
        disruption_budget(g),
        router_service_account(g),
        router_role(g),
        router_role_binding(g),
        router_deployment(g, operator),
        router_service(g),
    ]
