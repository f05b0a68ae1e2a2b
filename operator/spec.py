"""An ImageGenerator's spec, read once into typed values, and the pod settings it stands for.

The apiserver has already applied the CRD's defaults and checks, so a spec that reaches the
operator is well formed; whatever the schema cannot express (a default size that is not a
multiple of the model's step, budgets that do not nest) is caught by building the real
:class:`~imagefleet.settings.PodSettings` and :class:`~imagefleet.settings.RouterSettings` from
it, and reported as an :class:`InvalidSpec` (a condition on the resource), never a crash.

:data:`POD_FIELDS` is the one mapping between CRD paths and pod settings: the operator renders
pod command lines through it and a test checks that the CRD's defaults and bounds for each path
are the settings' own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from imagefleet import settings as settings_mod
from imagefleet import wire
from imagefleet.settings import OperatorSettings, PodSettings, RouterSettings, SettingsError

POD_FIELDS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("model", "id"), "model"),
    (("model", "revision"), "revision"),
    (("model", "dtype"), "dtype"),
    (("model", "variant"), "variant"),
    (("batching", "maxBatchSize"), "max_batch_size"),
    (("batching", "maxWaitMs"), "max_wait_ms"),
    (("batching", "maxQueuedImages"), "max_queued_images"),
    (("batching", "maxQueuedGpuSeconds"), "max_queued_gpu_seconds"),
    (("batching", "policy"), "batch_policy"),
    (("batching", "mode"), "batch_mode"),
    (("acceleration", "compile"), "compile"),
    (("acceleration", "tiers"), "tiers"),
    (("acceleration", "fastInterval"), "fast_interval"),
    (("acceleration", "attention"), "attention"),
    (("acceleration", "warmupSizes"), "warmup_sizes"),
    (("defaults", "steps"), "default_steps"),
    (("defaults", "guidance"), "default_guidance"),
    (("defaults", "size"), "default_size"),
    (("limits", "maxImagesPerRequest"), "max_images_per_request"),
    (("limits", "maxPixels"), "max_pixels"),
    (("limits", "maxSteps"), "max_steps"),
    (("limits", "maxRequestGpuSeconds"), "max_request_gpu_seconds"),
)
"""(path in spec, PodSettings field): every pod setting an ImageGenerator controls."""

API_KEYS_DIR = "/etc/imagefleet/api-keys"
"""Where a router pod mounts the referenced Secret; the router reads ``<dir>/<key>``."""


class InvalidSpec(ValueError):
    """The spec cannot be served; the message names the field. Reported in the Ready condition."""


@dataclass(frozen=True)
class SecretRef:
    name: str
    key: str = "api-keys"


@dataclass(frozen=True)
class ModelCache:
    pvc: str | None = None
    host_path: str | None = None
    mount_path: str = "/models"
    read_only: bool = False
    size_limit: str | None = None


@dataclass(frozen=True)
class Autoscaling:
    min_replicas: int
    max_replicas: int
    target_queued_seconds: float
    scale_down_delay_s: float


@dataclass(frozen=True)
class Health:
    startup_timeout_s: int = 1800
    unready_timeout_s: int = 300
    max_error_rate: float = 0.5


@dataclass(frozen=True)
class RouterSpec:
    replicas: int = 1
    service_type: str = "ClusterIP"
    service_port: int = 80
    api_keys: SecretRef | None = None
    resources: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GeneratorSpec:
    """What one ImageGenerator asks for, typed; ``pod`` and ``router`` are the processes' own settings."""

    name: str
    namespace: str
    uid: str
    generation: int
    replicas: int
    image: str
    image_pull_policy: str | None
    image_pull_secrets: tuple[str, ...]
    gpu_resource: str
    resources: dict[str, Any]
    node_selector: dict[str, str]
    tolerations: list[dict[str, Any]]
    affinity: dict[str, Any] | None
    priority_class: str | None
    pod_labels: dict[str, str]
    pod_annotations: dict[str, str]
    env: list[dict[str, Any]]
    model_cache: ModelCache
    health: Health
    router: RouterSpec
    autoscaling: Autoscaling | None
    pod: PodSettings
    router_settings: RouterSettings


def _get(spec: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = spec
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def pod_settings(spec: Mapping[str, Any], operator: OperatorSettings) -> PodSettings:
    """The settings every inference pod of ``spec`` runs with (flags rendered from these)."""
    values = {name: _get(spec, path) for path, name in POD_FIELDS}
    values = {k: v for k, v in values.items() if v is not None}
    try:
        return settings_mod.load(
            PodSettings,
            {},
            env={},
            host="0.0.0.0",
            port=operator.pod_port,
            fault_injection=operator.pod_fault_injection,
            **values,
        )
    except SettingsError as exc:
        raise InvalidSpec(_spec_words(str(exc))) from None


def _spec_words(message: str) -> str:
    """A settings error in the resource's own field names (``--max-steps`` -> ``limits.maxSteps``)."""
    for path, name in POD_FIELDS:
        message = message.replace(settings_mod.flag_name(name), "spec." + ".".join(path))
        message = message.replace(" / " + settings_mod.env_name(name), "")
    return message


def parse(body: Mapping[str, Any], operator: OperatorSettings) -> GeneratorSpec:
    """Read a whole ImageGenerator (as the API returns it); :class:`InvalidSpec` if it cannot run."""
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    name, namespace = str(meta.get("name", "")), str(meta.get("namespace", ""))
    pod = pod_settings(spec, operator)
    router = spec.get("router") or {}
    keys = router.get("apiKeySecretRef")
    key_ref = SecretRef(keys["name"], keys.get("key") or "api-keys") if keys else None
    auto = spec.get("autoscaling")
    autoscaling = None
    if auto:
        autoscaling = Autoscaling(
            min_replicas=int(auto.get("minReplicas", 1)),
            max_replicas=int(auto["maxReplicas"]),
            target_queued_seconds=float(auto.get("targetQueuedSecondsPerReplica", 30)),
            scale_down_delay_s=float(auto.get("scaleDownDelaySeconds", 300)),
        )
        if autoscaling.min_replicas > autoscaling.max_replicas:
            raise InvalidSpec("spec.autoscaling.minReplicas must not exceed spec.autoscaling.maxReplicas")
    cache = spec.get("modelCache") or {}
    if cache.get("pvc") and cache.get("hostPath"):
        raise InvalidSpec("set at most one of spec.modelCache.pvc and spec.modelCache.hostPath")
    health = spec.get("health") or {}
    router_settings = _router_settings(name, namespace, key_ref, operator)
    return GeneratorSpec(
        name=name,
        namespace=namespace,
        uid=str(meta.get("uid", "")),
        generation=int(meta.get("generation") or 0),
        replicas=int(spec.get("replicas", 1)),
        image=str(spec.get("image") or operator.default_image),
        image_pull_policy=spec.get("imagePullPolicy") or operator.image_pull_policy,
        image_pull_secrets=tuple(s["name"] for s in spec.get("imagePullSecrets") or ()),
        gpu_resource=str(spec.get("gpuResourceName") or "nvidia.com/gpu"),
        resources=dict(spec.get("resources") or {}),
        node_selector=dict(spec.get("nodeSelector") or {}),
        tolerations=list(spec.get("tolerations") or []),
        affinity=spec.get("affinity") or None,
        priority_class=spec.get("priorityClassName") or None,
        pod_labels=dict(spec.get("podLabels") or {}),
        pod_annotations=dict(spec.get("podAnnotations") or {}),
        env=list(spec.get("env") or []),
        model_cache=ModelCache(
            pvc=(cache.get("pvc") or {}).get("claimName"),
            host_path=(cache.get("hostPath") or {}).get("path"),
            mount_path=str(cache.get("mountPath") or "/models"),
            read_only=bool(cache.get("readOnly", False)),
            size_limit=str(cache["sizeLimit"]) if cache.get("sizeLimit") is not None else None,
        ),
        health=Health(
            startup_timeout_s=int(health.get("startupTimeoutSeconds", Health.startup_timeout_s)),
            unready_timeout_s=int(health.get("unreadyTimeoutSeconds", Health.unready_timeout_s)),
            max_error_rate=float(health.get("maxErrorRate", Health.max_error_rate)),
        ),
        router=RouterSpec(
            replicas=int(router.get("replicas", 1)),
            service_type=str(router.get("serviceType") or "ClusterIP"),
            service_port=int(router.get("servicePort") or 80),
            api_keys=key_ref,
            resources=dict(router.get("resources") or {}),
        ),
        autoscaling=autoscaling,
        pod=pod,
        router_settings=router_settings,
    )


def _router_settings(
    name: str, namespace: str, keys: SecretRef | None, operator: OperatorSettings
) -> RouterSettings:
    return settings_mod.load(
        RouterSettings,
        {},
        env={},
        host="0.0.0.0",
        port=operator.router_port,
        discovery="kubernetes",
        namespace=namespace,
        selector=wire.selector_string(wire.pod_selector(name)),
        backend_port=operator.pod_port,
        api_keys_file=f"{API_KEYS_DIR}/{keys.key}" if keys else None,
        # Prometheus scrapes routers inside the cluster without a key (the pods' NetworkPolicy
        # and Service decide who reaches them); the Images API itself still needs one.
        protect_metrics=False,
        web=operator.router_web,
    )


def pod_command(pod: PodSettings) -> list[str]:
    """The inference pod's container command: the real ``imagefleet pod`` with every setting."""
    return ["imagefleet", "pod", *settings_mod.to_arguments(pod)]


def router_command(router: RouterSettings) -> list[str]:
    return ["imagefleet", "router", *settings_mod.to_arguments(router)]
