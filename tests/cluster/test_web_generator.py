"""The fleet page's ImageGenerator conditions, read with the router's own credentials.

A real apiserver: the router's ServiceAccount with a Role for its pods only is refused the
ImageGenerator, and the fleet says so; with the Role the operator gives it (``get`` on its own
ImageGenerator, by name), the router reads the resource's conditions, and no other resource.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from kubernetes import client

from imagefleet import wire
from imagefleet.operator import manifests
from imagefleet.operator.spec import parse
from imagefleet.router import generator as gen
from imagefleet.settings import OperatorSettings
from imagefleet.testing.wait import until

CONDITIONS = [
    {
        "type": "Ready",
        "status": "False",
        "reason": "ReplicasNotReady",
        "message": "0 of 1 pods ready",
        "lastTransitionTime": "2026-12-03T07:00:00Z",
        "observedGeneration": 1,
    },
    {
        "type": "Degraded",
        "status": "False",
        "reason": "AsExpected",
        "lastTransitionTime": "2026-12-03T07:00:00Z",
    },
]


def resource(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": wire.API_VERSION,
        "kind": wire.KIND,
        "metadata": {"name": "g", "namespace": namespace},
        "spec": {"model": {"id": "tiny"}, "replicas": 1},
    }


def client_as(api_client: Any, core_v1: Any, namespace: str, account: str) -> Any:
    """An ApiClient holding a token of ``namespace/account`` (a TokenRequest), as a router pod has."""
    answer = core_v1.create_namespaced_service_account_token(
        account, namespace, {"spec": {"expirationSeconds": 600}}
    )
    config = client.Configuration()
    base = api_client.configuration
    config.host, config.ssl_ca_cert, config.verify_ssl = base.host, base.ssl_ca_cert, base.verify_ssl
    config.api_key = {"authorization": "Bearer " + answer.status.token}
    return client.ApiClient(config)


def test_the_router_reads_its_generator_only_when_its_role_allows(
    api_client: Any, core_v1: Any, namespace: str, imagegenerator_crd: str
) -> None:
    objects = client.CustomObjectsApi(api_client)
    created = objects.create_namespaced_custom_object(
        wire.GROUP, wire.VERSION, namespace, wire.PLURAL, resource(namespace)
    )
    objects.patch_namespaced_custom_object_status(
        wire.GROUP, wire.VERSION, namespace, wire.PLURAL, "g", {"status": {"conditions": CONDITIONS}}
    )
    # the router's ServiceAccount, Role and RoleBinding exactly as the operator renders them
    operator = OperatorSettings()
    g = parse(created, operator)  # owned by the resource, as the operator makes them
    core_v1.create_namespaced_service_account(namespace, manifests.router_service_account(g))
    rbac = client.RbacAuthorizationV1Api(api_client)
    pods_only = {**manifests.router_role(g), "rules": manifests.ROUTER_RULES_PODS}
    rbac.create_namespaced_role(namespace, pods_only)
    rbac.create_namespaced_role_binding(namespace, manifests.router_role_binding(g))
    router = client_as(api_client, core_v1, namespace, manifests.router_name(g))
    selector = wire.selector_string(wire.pod_selector("g"))

    view = gen.GeneratorView(namespace, selector, connect=lambda: router)
    asyncio.run(view.refresh())
    shown = view.current()
    assert shown["error"] == "forbidden" and shown["conditions"] is None
    assert f"kubectl describe imggen g -n {namespace}" in shown["note"]
    client.CoreV1Api(router).list_namespaced_pod(namespace, label_selector=selector)  # its discovery may

    # with the Role the operator renders, the router shows the conditions
    rbac.replace_namespaced_role(manifests.router_name(g), namespace, manifests.router_role(g))

    def readable() -> bool:
        asyncio.run(view.refresh())
        return view.current()["conditions"] is not None

    until(readable, timeout=30, what="the conditions with the new Role")  # RBAC caches take a moment
    expected = [{k: c[k] for k in gen.CONDITION_FIELDS if k in c} for c in CONDITIONS]
    assert view.current()["conditions"] == expected
    assert view.current()["error"] is None and view.current()["note"] is None
    other = {**resource(namespace), "metadata": {"name": "other", "namespace": namespace}}
    objects.create_namespaced_custom_object(wire.GROUP, wire.VERSION, namespace, wire.PLURAL, other)
    with pytest.raises(client.ApiException) as refused:  # its own resource, no other
        client.CustomObjectsApi(router).get_namespaced_custom_object(
            wire.GROUP, wire.VERSION, namespace, wire.PLURAL, "other"
        )
    assert refused.value.status == 403
