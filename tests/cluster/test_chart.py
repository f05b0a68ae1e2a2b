"""The Helm chart against the real tools: helm lint and template, the apiserver, RBAC, the operator.

* ``helm lint --strict`` is clean with the default values and with every feature on
  (``ci/all-on-values.yaml``), and values.schema.json refuses what the operator would refuse;
* what ``helm template`` renders is what the operator needs (flags only for values that are
  set, leader election, probes on its health port, least-privilege RBAC) and the real apiserver
  accepts it (``kubectl apply --dry-run=server``), as it accepts every ``examples/*.yaml``;
* ``helm install`` / ``helm uninstall`` make and remove the release, and ``kubectl auth can-i``
  as the operator's ServiceAccount shows what it may and may not do;
* installed with one replica, the operator really runs in a pod of the process kubelet with the
  chart's ServiceAccount token and brings ``examples/tiny.yaml`` to Ready: the RBAC suffices.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from imagefleet import metrics
from imagefleet.testing import dashboards
from imagefleet.testing.wait import until

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "imagefleet"
ALL_ON = CHART / "ci" / "all-on-values.yaml"
CRD = REPO / "crds" / "imagegenerator.yaml"
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
CHART_YAML = yaml.safe_load((CHART / "Chart.yaml").read_text())
RECOMMENDED = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
)
METRIC_NAMES = {value for name, value in vars(metrics).items() if name.isupper() and name != "PREFIX"}

# The Prometheus Operator's CRDs are not part of the test cluster. These stand-ins only make the
# apiserver serve monitoring.coreos.com/v1 ServiceMonitor, PodMonitor and PrometheusRule (any
# content: x-kubernetes-preserve-unknown-fields), so that a server-side dry run of the all-on
# render can check every other object; their own schemas are not checked here.
MONITORING_KINDS: tuple[tuple[str, str], ...] = (
    ("ServiceMonitor", "servicemonitors"),
    ("PodMonitor", "podmonitors"),
    ("PrometheusRule", "prometheusrules"),
)


def _stand_in_crd(kind: str, plural: str) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.monitoring.coreos.com"},
        "spec": {
            "group": "monitoring.coreos.com",
            "scope": "Namespaced",
            "names": {"kind": kind, "plural": plural, "singular": kind.lower(), "listKind": f"{kind}List"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                    },
                }
            ],
        },
    }


# --- helpers -------------------------------------------------------------------------------------


class Helm:
    """helm alone (lint, template): the built binary, with its own cache and config folders."""

    def __init__(self, binary: Path, home: Path) -> None:
        self.binary = binary
        self.env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(home),
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.binary), *args], env=self.env, capture_output=True, text=True, timeout=120
        )
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
        return result

    def template(self, *args: str, namespace: str = "imagefleet") -> list[dict[str, Any]]:
        out = self("template", "rel", str(CHART), "--namespace", namespace, *args).stdout
        return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module")
def helm(bin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm(bin_dir / "helm", tmp_path_factory.mktemp("helm-home"))


@pytest.fixture(scope="module")
def crds(tools: Any) -> Iterator[None]:
    """The ImageGenerator CRD, and stand-ins for the Prometheus Operator's (see above)."""
    tools.kubectl("apply", "-f", str(CRD))
    stand_ins = [_stand_in_crd(kind, plural) for kind, plural in MONITORING_KINDS]
    tools.kubectl(
        "apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": stand_ins})
    )
    names = ["crd/imagegenerators.imagefleet.dev"] + [f"crd/{c['metadata']['name']}" for c in stand_ins]
    tools.kubectl("wait", "--for=condition=Established", *names, "--timeout=60s")
    yield
    tools.kubectl("delete", "--wait=false", *names[1:])


@pytest.fixture
def other_namespace(core_v1: Any) -> Iterator[str]:
    name = f"chart-other-{uuid.uuid4().hex[:6]}"
    core_v1.create_namespace({"metadata": {"name": name}})
    yield name
    core_v1.delete_namespace(name)


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name or ''}: {len(found)} rendered"
    return found[0]


def _container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    assert len(pod["containers"]) == 1
    return dict(pod["containers"][0])


def _rules(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [rule for d in docs if d["kind"] in ("ClusterRole", "Role") for rule in d["rules"]]


def _sa(release: str) -> str:
    return f"{release}-imagefleet-operator"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _release(tools: Any, namespace: str, *sets: str) -> Iterator[str]:
    """A release of the chart in ``namespace``, uninstalled afterwards (cluster-scoped RBAC too)."""
    release = "if" + uuid.uuid4().hex[:6]
    args = [arg for value in sets for arg in ("--set", value)]
    tools.helm("install", release, str(CHART), "--namespace", namespace, *args, "--wait", "--timeout=180s")
    try:
        yield release
    finally:
        tools.helm("uninstall", release, "--namespace", namespace, "--wait", check=False)


# --- lint and schema -----------------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, ALL_ON], ids=["default-values", "all-on-values"])
def test_helm_lint_strict_is_clean(helm: Helm, values: Path | None) -> None:
    result = helm("lint", "--strict", str(CHART), *(["--values", str(values)] if values else []))
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("operator.settings.namespaces=a", "additional properties 'namespaces' not allowed"),
        ("operator.settings.statusIntervalS=5", "additional properties 'statusIntervalS' not allowed"),
        ("operator.settings.status_interval_s=0", "minimum"),
        ("operator.settings.log_level=loud", "value must be one of"),
        ("operator.image.pullPolicy=Sometimes", "value must be one of"),
        ("generatorDefaults.imagePullPolicy=Sometimes", "value must be one of"),
        ("operator.replicas=-1", "minimum"),
        ("unknownTopLevel=1", "additional properties 'unknownTopLevel' not allowed"),
    ],
)
def test_the_schema_refuses_what_the_operator_would(helm: Helm, value: str, message: str) -> None:
    result = helm("template", "rel", str(CHART), "--set", value, check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_the_example_generator_must_be_in_a_watched_namespace(helm: Helm) -> None:
    sets = ["--set", "exampleGenerator.enabled=true", "--set", "watchNamespaces={elsewhere}"]
    result = helm("template", "rel", str(CHART), "--namespace", "here", *sets, check=False)
    assert result.returncode != 0
    assert "watchNamespaces leaves out" in result.stderr


# --- what is rendered ----------------------------------------------------------------------------


def test_default_render_passes_only_leader_election(helm: Helm) -> None:
    docs = helm.template()
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == [
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Role",
        "RoleBinding",
        "ServiceAccount",
    ]
    container = _container(docs)
    assert container["command"] == ["imagefleet", "operator"]
    assert container["args"] == ["--leader-election"]  # every other setting: the operator's default
    assert container["image"] == f"ghcr.io/imagefleet/imagefleet-control:{CHART_YAML['appVersion']}"
    env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in container["env"]}
    assert env["POD_NAME"] == "metadata.name" and env["POD_NAMESPACE"] == "metadata.namespace"
    assert container["ports"] == [{"name": "http-metrics", "containerPort": 8080, "protocol": "TCP"}]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}
    assert "resources" not in container
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}

    deployment = _one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is True
    assert pod["terminationGracePeriodSeconds"] == 30  # OperatorSettings.stop_timeout_s
    assert pod["serviceAccountName"] == _sa("rel")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    assert deployment["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "imagefleet",
        "app.kubernetes.io/instance": "rel",
        "app.kubernetes.io/component": "operator",
    }
    lease_role = _one(docs, "Role")
    assert lease_role["metadata"]["namespace"] == "imagefleet"
    assert {r["apiGroups"][0] for r in lease_role["rules"]} == {"coordination.k8s.io"}


def test_every_object_has_the_recommended_labels(helm: Helm) -> None:
    for docs in (helm.template(), helm.template("--values", str(ALL_ON))):
        for doc in docs:
            labels = doc["metadata"]["labels"]
            missing = [key for key in RECOMMENDED if key not in labels]
            assert missing == [], f"{doc['kind']} {doc['metadata']['name']} lacks {missing}"
            assert labels["app.kubernetes.io/managed-by"] == "Helm"
            assert labels["app.kubernetes.io/part-of"] == "imagefleet"


def test_all_on_render_passes_every_value_that_is_set(helm: Helm) -> None:
    docs = helm.template("--values", str(ALL_ON))
    kinds = {d["kind"] for d in docs}
    assert {"ServiceMonitor", "PodMonitor", "PrometheusRule", "Service", "ImageGenerator"} <= kinds
    assert _container(docs)["args"] == [
        "--namespaces=team-a,team-b",
        "--default-image=registry.example.com/imagefleet:ci",
        "--router-image=registry.example.com/imagefleet-control:ci",
        "--image-pull-policy=Always",
        "--leader-election",  # leaderElection is false, but there are two replicas
        "--health-port=9090",
        "--lease-duration-s=20",
        "--lease-name=imagefleet-ci",
        "--log-level=debug",
        "--no-pod-fault-injection",
        "--resync-s=1000000",  # not 1e+06
        "--scrape-concurrency=512",
        "--scrape-timeout-s=2.5",
        "--status-interval-s=5",
        "--stop-timeout-s=45.5",
    ]
    container = _container(docs)
    assert container["ports"][0]["containerPort"] == 9090
    assert container["image"] == "ghcr.io/imagefleet/imagefleet-control:ci"
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 46
    assert _one(docs, "Service")["spec"]["ports"][0]["port"] == 9090

    # Namespaced rules in a Role per watched namespace; the ClusterRole keeps what kopf reads.
    watched = [d for d in docs if d["kind"] == "Role" and "leader-election" not in d["metadata"]["name"]]
    assert sorted(d["metadata"]["namespace"] for d in watched) == ["team-a", "team-b"]
    cluster_role = _one(docs, "ClusterRole")
    assert sorted(r["resources"][0] for r in cluster_role["rules"]) == [
        "customresourcedefinitions",
        "namespaces",
    ]
    lease = [d for d in docs if d["kind"] == "Role" and "leader-election" in d["metadata"]["name"]]
    assert [r.get("resourceNames") for r in lease[0]["rules"]] == [None, ["imagefleet-ci"]]

    generator = _one(docs, "ImageGenerator")
    assert generator["spec"] == {
        "model": {"id": "tiny"},
        "replicas": 2,
        "batching": {"maxBatchSize": 8},
        "router": {"replicas": 2},
    }
    pod_monitor = _one(docs, "PodMonitor")["spec"]
    assert pod_monitor["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}
    assert pod_monitor["podMetricsEndpoints"][0]["port"] == "http"
    assert pod_monitor["selector"]["matchExpressions"][0]["values"] == ["inference-pod", "router"]


def test_alerts_use_only_metrics_that_exist(helm: Helm) -> None:
    rule = _one(helm.template("--values", str(ALL_ON)), "PrometheusRule")
    alerts = rule["spec"]["groups"][0]["rules"]
    assert [a["alert"] for a in alerts] == [
        "ImagefleetPodQuarantined",
        "ImagefleetQueueWaitHigh",
        "ImagefleetNoReadyPods",
        "ImagefleetImageFailuresHigh",
        "ImagefleetOperatorReconcileErrors",
    ]
    for alert in alerts:
        assert alert["labels"]["severity"] in ("warning", "critical")
        assert {"summary", "description", "runbook", "runbook_url"} <= set(alert["annotations"])
        text = alert["expr"] + " ".join(alert["annotations"].values())
        for series in re.findall(r"imagefleet_[a-z_]+", text):
            base = re.sub(r"_(bucket|sum|count|total)$", "", series)
            assert base in METRIC_NAMES, f"{alert['alert']}: {series} is not in imagefleet/metrics.py"
    assert "> 120" in alerts[1]["expr"] and "> 0.1" in alerts[3]["expr"]  # thresholds from values


def test_the_chart_makes_no_secret_and_no_api_key(helm: Helm) -> None:
    """Keys are the user's own Secret (spec.router.apiKeySecretRef); the chart never invents one."""
    for docs in (helm.template(), helm.template("--values", str(ALL_ON))):
        assert [d["kind"] for d in docs if d["kind"] == "Secret"] == []
        for d in docs:
            if d["kind"] == "ImageGenerator":
                assert "apiKeySecretRef" not in (d["spec"].get("router") or {}), d
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert not re.search(r"api.?key", json.dumps(values), re.I)


def test_the_operator_container_is_locked_down(helm: Helm) -> None:
    (deployment,) = [d for d in helm.template() if d["kind"] == "Deployment"]
    spec = deployment["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 10001
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (c,) = spec["containers"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    # POD_NAMESPACE is where the operator's NetworkPolicies let its scrape in from.
    assert {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}} in c[
        "env"
    ]


def test_rbac_grants_no_secrets_and_no_wildcards(helm: Helm) -> None:
    for docs in (helm.template(), helm.template("--values", str(ALL_ON))):
        for rule in _rules(docs):
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], rule
            assert "secrets" not in rule["resources"], rule
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule


# --- against the apiserver -------------------------------------------------------------------------


def test_default_render_is_accepted_by_the_apiserver(
    helm: Helm, tools: Any, namespace: str, crds: None
) -> None:
    docs = helm.template(namespace=namespace)
    out = tools.kubectl("apply", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump_all(docs)).stdout
    assert out.count("(server dry run)") == len(docs), out


def test_all_on_render_is_accepted_by_the_apiserver(
    helm: Helm, tools: Any, namespace: str, other_namespace: str, crds: None
) -> None:
    docs = helm.template(
        "--values",
        str(ALL_ON),
        "--set",
        f"namespaceOverride={namespace}",
        "--set",
        f"watchNamespaces={{{namespace},{other_namespace}}}",
        namespace=namespace,
    )
    out = tools.kubectl("apply", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump_all(docs)).stdout
    assert out.count("(server dry run)") == len(docs), out


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_are_accepted_by_the_apiserver(
    tools: Any, namespace: str, crds: None, example: Path
) -> None:
    out = tools.kubectl("apply", "--dry-run=server", "--namespace", namespace, "-f", str(example)).stdout
    assert "imagegenerator.imagefleet.dev/" in out and "(server dry run)" in out


def test_install_and_uninstall(tools: Any, core_v1: Any, api_client: Any, namespace: str, crds: None) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    rbac = client.RbacAuthorizationV1Api(api_client)
    apps = client.AppsV1Api(api_client)
    with _release(tools, namespace, "operator.replicas=0") as release:
        name = _sa(release)
        assert apps.read_namespaced_deployment(name, namespace).spec.replicas == 0
        assert (
            core_v1.read_namespaced_service_account(name, namespace).metadata.labels[
                "app.kubernetes.io/instance"
            ]
            == release
        )
        cluster_name = f"{namespace}-{name}"
        assert rbac.read_cluster_role(cluster_name).rules
        assert rbac.read_cluster_role_binding(cluster_name).subjects[0].name == name
        assert rbac.read_namespaced_role(f"{name}-leader-election", namespace).rules
        notes = tools.helm("get", "notes", release, "--namespace", namespace).stdout
        assert "kubectl" in notes and "get imggen -w" in notes and "port-forward svc/" in notes
        assert "/v1/images/generations" in notes and "OpenAI(" in notes

        tools.helm("uninstall", release, "--namespace", namespace, "--wait")
        gone: list[Callable[[], Any]] = [
            lambda: apps.read_namespaced_deployment(name, namespace),
            lambda: core_v1.read_namespaced_service_account(name, namespace),
            lambda: rbac.read_cluster_role(cluster_name),
            lambda: rbac.read_cluster_role_binding(cluster_name),
            lambda: rbac.read_namespaced_role(f"{name}-leader-election", namespace),
        ]
        for read in gone:
            with pytest.raises(ApiException) as missing:
                read()
            assert missing.value.status == 404
    # The CRD is Helm's to install, never to delete.
    assert tools.kubectl("get", "crd", "imagegenerators.imagefleet.dev", "-o", "name").stdout.strip()


def _can_i(tools: Any, who: str, *args: str) -> bool:
    result = tools.kubectl("auth", "can-i", f"--as={who}", *args, check=False)
    answer = str(result.stdout).strip()
    assert answer.startswith(("yes", "no")), result.stderr
    return answer.startswith("yes")


def test_cluster_wide_rbac_is_least_privilege(tools: Any, namespace: str, crds: None) -> None:
    with _release(tools, namespace, "operator.replicas=0") as release:
        who = f"system:serviceaccount:{namespace}:{_sa(release)}"
        for elsewhere in ("default", "kube-public"):
            assert _can_i(tools, who, "create", "pods", "-n", elsewhere)
            assert _can_i(tools, who, "delete", "pods", "-n", elsewhere)
            assert _can_i(
                tools, who, "patch", "imagegenerators.imagefleet.dev", "--subresource=status", "-n", elsewhere
            )
            assert _can_i(
                tools, who, "patch", "imagegenerators.imagefleet.dev", "--subresource=scale", "-n", elsewhere
            )
            assert _can_i(tools, who, "create", "deployments.apps", "-n", elsewhere)
            assert _can_i(tools, who, "create", "roles.rbac.authorization.k8s.io", "-n", elsewhere)
            assert _can_i(tools, who, "create", "events.events.k8s.io", "-n", elsewhere)
            assert not _can_i(tools, who, "get", "secrets", "-n", elsewhere)
            assert not _can_i(tools, who, "list", "secrets", "-n", elsewhere)
            assert not _can_i(tools, who, "delete", "deployments.apps", "-n", elsewhere)
            assert not _can_i(tools, who, "create", "leases.coordination.k8s.io", "-n", elsewhere)
            assert not _can_i(tools, who, "create", "imagegenerators.imagefleet.dev", "-n", elsewhere)
            assert _can_i(tools, who, "create", "networkpolicies.networking.k8s.io", "-n", elsewhere)
            assert not _can_i(tools, who, "delete", "networkpolicies.networking.k8s.io", "-n", elsewhere)
            assert not _can_i(tools, who, "create", "pods", "--subresource=exec", "-n", elsewhere)
            assert not _can_i(tools, who, "delete", "imagegenerators.imagefleet.dev", "-n", elsewhere)
        assert not _can_i(tools, who, "list", "secrets", "--all-namespaces")
        assert not _can_i(tools, who, "get", "secrets", "-n", namespace)
        assert not _can_i(tools, who, "delete", "namespaces")
        assert not _can_i(tools, who, "create", "clusterroles.rbac.authorization.k8s.io")
        assert not _can_i(tools, who, "create", "clusterrolebindings.rbac.authorization.k8s.io")
        assert not _can_i(tools, who, "create", "nodes")
        assert not _can_i(tools, who, "delete", "customresourcedefinitions.apiextensions.k8s.io")
        assert not _can_i(tools, who, "create", "customresourcedefinitions.apiextensions.k8s.io")
        assert _can_i(tools, who, "watch", "customresourcedefinitions.apiextensions.k8s.io")
        assert _can_i(tools, who, "create", "leases.coordination.k8s.io", "-n", namespace)
        assert _can_i(tools, who, "update", "leases.coordination.k8s.io/imagefleet-operator", "-n", namespace)
        assert not _can_i(tools, who, "update", "leases.coordination.k8s.io/someone-else", "-n", namespace)


def test_namespaced_rbac_stays_in_the_watched_namespaces(
    tools: Any, namespace: str, other_namespace: str, crds: None
) -> None:
    with _release(
        tools, namespace, "operator.replicas=0", f"watchNamespaces={{{other_namespace}}}"
    ) as release:
        who = f"system:serviceaccount:{namespace}:{_sa(release)}"
        assert _can_i(tools, who, "create", "pods", "-n", other_namespace)
        assert _can_i(
            tools,
            who,
            "patch",
            "imagegenerators.imagefleet.dev",
            "--subresource=status",
            "-n",
            other_namespace,
        )
        assert not _can_i(tools, who, "create", "pods", "-n", "default")
        assert not _can_i(tools, who, "list", "imagegenerators.imagefleet.dev", "--all-namespaces")
        assert not _can_i(tools, who, "get", "secrets", "-n", other_namespace)
        assert _can_i(tools, who, "list", "customresourcedefinitions.apiextensions.k8s.io")
        assert _can_i(tools, who, "create", "leases.coordination.k8s.io", "-n", namespace)


# --- the operator, really running with the chart's ServiceAccount ----------------------------------


def test_the_operator_runs_from_the_chart(
    tools: Any, control_plane: Any, api_client: Any, namespace: str, crds: None
) -> None:
    """The process kubelet runs ``imagefleet operator`` from the chart's pod spec with the chart's
    ServiceAccount token: examples/tiny.yaml (one replica) turning Ready proves the RBAC suffices.

    Scoped with watchNamespaces to this test's namespace (other tests run operators of their own),
    and on a free health port (the operator binds 0.0.0.0, shared by every pod on this machine).
    """
    from kubernetes import client

    sets = [
        "operator.replicas=1",
        f"watchNamespaces={{{namespace}}}",
        f"operator.settings.health_port={_free_port()}",
        "operator.settings.status_interval_s=3",
    ]
    pods_dir = control_plane.state_dir / "kubelet" / "pods"
    core = client.CoreV1Api(api_client)

    def operator_log() -> str:
        logs = sorted(pods_dir.glob(f"{namespace}_*-operator-*/operator.log"))
        return "\n".join(path.read_text(errors="replace") for path in logs)

    with _release(tools, namespace, *sets):  # --wait: the operator pod is Ready (its /healthz)
        tiny = yaml.safe_load((REPO / "examples" / "tiny.yaml").read_text())
        tiny["spec"]["replicas"] = 1
        tools.kubectl("apply", "--namespace", namespace, "-f", "-", stdin=yaml.safe_dump(tiny))

        def ready() -> bool:
            log = operator_log()
            assert "Forbidden" not in log, f"the chart's RBAC lacks a permission:\n{log[-3000:]}"
            out = tools.kubectl("get", "imggen", "tiny", "--namespace", namespace, "-o", "json").stdout
            status = json.loads(out).get("status") or {}
            conditions = {c["type"]: c["status"] for c in status.get("conditions", [])}
            return status.get("readyReplicas") == 1 and conditions.get("Ready") == "True"

        def describe() -> str:
            pods = core.list_namespaced_pod(namespace).items
            phases = ", ".join(f"{p.metadata.name}={p.status.phase}" for p in pods)
            status = tools.kubectl(
                "get", "imggen", "-n", namespace, "-o", "jsonpath={.items[*].status}"
            ).stdout
            return f"pods {phases}; status {status}; operator log tail:\n{operator_log()[-3000:]}"

        until(ready, timeout=300, interval=1.0, what="examples/tiny.yaml Ready", describe=describe)
        columns = tools.kubectl("get", "imggen", "tiny", "--namespace", namespace).stdout.split("\n")
        assert columns[0].split()[:3] == ["NAME", "REPLICAS", "READY"]
        assert columns[1].split()[:3] == ["tiny", "1", "1"]
        lease = tools.kubectl("get", "lease", "imagefleet-operator", "-n", namespace, "-o", "json").stdout
        assert "-operator-" in json.loads(lease)["spec"]["holderIdentity"]
        log = operator_log()
        assert "Forbidden" not in log and " 403" not in log, log[-3000:]


def test_helm_package_ships_the_crd(helm: Helm, tmp_path: Path) -> None:
    """helm package puts the CRD's contents (not a link) into the packaged chart."""
    helm("package", str(CHART), "--destination", str(tmp_path))
    packaged = tmp_path / f"imagefleet-{CHART_YAML['version']}.tgz"
    listing = subprocess.run(
        ["tar", "-xzOf", str(packaged), "imagefleet/crds/imagegenerator.yaml"], capture_output=True
    )
    assert listing.returncode == 0
    assert listing.stdout == CRD.read_bytes()


def test_the_dashboard_configmap_carries_the_dashboard_for_the_sidecar(helm: Helm) -> None:
    assert not [d for d in helm.template() if d["kind"] == "ConfigMap"]  # off by default
    cm = _one(helm.template("--values", str(ALL_ON)), "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "imagefleet"}
    assert json.loads(cm["data"]["imagefleet.json"]) == dashboards.load()  # copied verbatim
    other = _one(
        helm.template(
            "--set", "grafanaDashboard.enabled=true", "--set", "grafanaDashboard.namespace=monitoring"
        ),
        "ConfigMap",
    )
    assert other["metadata"]["namespace"] == "monitoring" and "annotations" not in other["metadata"]
