"""The router's own answers in front of a real ``tiny`` pod: returned URLs, signed file URLs,
``GET /v1/models/{id}``, and the metrics that count what the router answered itself."""

from __future__ import annotations

import socket
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

from imagefleet import metrics
from imagefleet.router.signing import UrlSigner
from imagefleet.testing.routers import RouterThread, call, generate, router_settings, scrape
from tests.conftest import Pod

KEY = "sk-router-edge-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
SIGNING_KEY = "a-shared-signing-key-for-all-replicas"
RESPONSES = metrics.ROUTER_RESPONSES + "_total"


@pytest.fixture(scope="module")
def pod() -> Iterator[Pod]:
    from imagefleet import settings as settings_mod
    from imagefleet.inference_pod.app import create_app
    from imagefleet.settings import PodSettings
    from imagefleet.testing.servers import ServerThread, wait_ready

    pod_settings = settings_mod.load(PodSettings, env={}, model="tiny", warmup=False)
    server = ServerThread(lambda: create_app(pod_settings)).start()
    wait_ready(server.url, timeout=120)
    yield Pod(server)
    server.stop()


def start_router(pod: Pod, **overrides: Any) -> RouterThread:
    overrides.setdefault("api_keys", (KEY,))
    overrides.setdefault("url_signing_key", SIGNING_KEY)
    return RouterThread(router_settings([pod.url], **overrides)).start().wait_ready(1)


@pytest.fixture(scope="module")
def router(pod: Pod) -> Iterator[RouterThread]:
    r = start_router(pod)
    yield r
    r.stop()


def image_url(router: RouterThread, headers: dict[str, str] | None = None) -> str:
    reply = generate(router.url, headers={**AUTH, **(headers or {})}, response_format="url", size="64x64")
    assert reply.status == 200, reply.body
    return str(reply.body["data"][0]["url"])


# --- 6. where returned URLs point -------------------------------------------------------------


def test_urls_point_at_the_router_whatever_forwarding_headers_a_client_sends(router: RouterThread) -> None:
    url = image_url(
        router,
        {
            "X-Forwarded-Host": "evil.example.com",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Prefix": "/phish",
            "X-Imagefleet-Public-Base": "https://evil.example.com",
        },
    )
    assert url.startswith(router.url + "/v1/images/files/"), url


def test_a_malformed_forwarded_host_never_leaks_the_pods_address(pod: Pod) -> None:
    r = start_router(pod, trusted_proxies=("127.0.0.0/8",))
    try:
        url = image_url(r, {"X-Forwarded-Host": "bad host/<x>", "X-Forwarded-Prefix": "/a/../b"})
        assert url.startswith(r.url + "/v1/images/files/"), url
        assert pod.url not in url
        url = image_url(r, {"X-Forwarded-Host": "images.example.com", "X-Forwarded-Proto": "https"})
        assert url.startswith("https://images.example.com/v1/images/files/")  # trusted proxy
    finally:
        r.stop()


def test_the_configured_public_base_is_used(pod: Pod) -> None:
    r = start_router(pod, public_base_url="https://img.example.org/fleet")
    try:
        assert image_url(r, {"X-Forwarded-Host": "evil.example.com"}).startswith(
            "https://img.example.org/fleet/v1/images/files/"
        )
    finally:
        r.stop()


# --- 7. signed file URLs ----------------------------------------------------------------------


def test_a_signed_url_opens_without_the_api_key(router: RouterThread) -> None:
    url = image_url(router)
    assert "expires=" in url and "signature=" in url
    reply = call("GET", url)
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "image/png"
    unsigned = url.split("?")[0]
    assert call("GET", unsigned).status == 401  # without the signature, the key is needed
    assert call("GET", unsigned, headers=AUTH).status == 200


def test_a_tampered_or_expired_signature_is_refused(router: RouterThread, pod: Pod) -> None:
    url = image_url(router)
    path, query = url.split("?")
    q = dict(urllib.parse.parse_qsl(query))
    tampered = f"{path}?expires={int(q['expires']) + 3600}&signature={q['signature']}"
    reply = call("GET", tampered)
    assert reply.status == 403
    assert reply.body["error"]["type"] == "permission_error"
    assert reply.body["error"]["code"] == "invalid_signature"
    assert call("GET", tampered, headers=AUTH).status == 200  # a good key still opens it
    file_id = path.rsplit("/", 1)[1]
    past = UrlSigner(SIGNING_KEY.encode(), ttl_s=1, clock=lambda: 1_000_000.0)
    reply = call("GET", f"{path}?{past.query(file_id)}")
    assert reply.status == 403
    assert reply.body["error"]["code"] == "url_expired"
    other_replica = start_router(pod)  # same key: it honours the first router's links
    try:
        assert call("GET", other_replica.url + "/v1/images/files/" + file_id + "?" + query).status == 200
    finally:
        other_replica.stop()


# --- 9. GET /v1/models/{id} -------------------------------------------------------------------


def test_a_model_by_id(router: RouterThread) -> None:
    reply = call("GET", router.url + "/v1/models/tiny", headers=AUTH)
    assert reply.status == 200
    assert reply.body["id"] == "tiny" and reply.body["object"] == "model"
    reply = call("GET", router.url + "/v1/models/no-such-model", headers=AUTH)
    assert reply.status == 404
    assert reply.body["error"]["code"] == "model_not_found"
    assert reply.body["error"]["param"] == "model"


# --- 8. the router's own answers in its metrics -----------------------------------------------


def test_the_routers_own_answers_are_counted(router: RouterThread) -> None:
    def count(**labels: str) -> float:
        return scrape(router.url, headers=AUTH).value(RESPONSES, **labels)

    before_401 = count(endpoint="generations", status="401", origin="router")
    before_404 = count(endpoint="files", status="404", origin="router")
    before_413 = count(endpoint="generations", status="413", origin="router")
    before_ok = count(endpoint="generations", status="200", origin="backend")
    assert generate(router.url).status == 401
    assert call("GET", router.url + "/v1/images/files/unknown~x.png", headers=AUTH).status == 404
    big = call("POST", router.url + "/v1/images/generations", raw=b"x" * (33 * 1024 * 1024), headers=AUTH)
    assert big.status == 413
    assert generate(router.url, headers=AUTH, size="64x64").status == 200
    assert count(endpoint="generations", status="401", origin="router") == before_401 + 1
    assert count(endpoint="files", status="404", origin="router") == before_404 + 1
    assert count(endpoint="generations", status="413", origin="router") == before_413 + 1
    assert count(endpoint="generations", status="200", origin="backend") == before_ok + 1


def test_connection_level_answers_are_counted(router: RouterThread) -> None:
    host, port = router.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GE\x01T / HTTP/1.1\r\n\r\n")
        sock.recv(4096)
    value = scrape(router.url, headers=AUTH).value(
        metrics.ROUTER_CONNECTION_ERRORS + "_total", kind="bad_method"
    )
    assert value >= 1
