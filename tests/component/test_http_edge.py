"""The HTTP edge of the router and the pod, driven by raw sockets that misbehave as clients do.

Both servers run the same serving code (:mod:`imagefleet.edge`, :mod:`imagefleet.httpkit`); each
test runs against a real server on loopback: a router app (no backends needed for what is tested
here) or an in-process pod serving the ``tiny`` model.
"""

from __future__ import annotations

import gzip
import json
import logging
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from imagefleet import settings as settings_mod
from imagefleet.inference_pod.app import create_app
from imagefleet.settings import PodSettings
from imagefleet.testing.routers import RouterThread, call, router_settings
from imagefleet.testing.servers import ServerThread, wait_ready
from tests.conftest import Pod

KEY = "sk-edge-test-key-0123"
KEY_BYTES = b"s3cr3t-bytes-of-a-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def recv_all(sock: socket.socket, timeout: float = 20.0) -> bytes:
    """Everything until the server closes the connection (or ``timeout`` passes)."""
    sock.settimeout(timeout)
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except TimeoutError:
        out += b"<still open>"
    except ConnectionResetError:
        out += b"<reset>"
    return out


def exchange(url: str, data: bytes, timeout: float = 20.0) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        return recv_all(sock, timeout)


def response_of(raw: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", len(body)))
    return status, headers, json.loads(body[:length])


def assert_envelope(body: Any, type_: str = "invalid_request_error") -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == type_


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=20)


@pytest.fixture
def make_router() -> Iterator[Callable[..., RouterThread]]:
    started: list[RouterThread] = []

    def start(**overrides: Any) -> RouterThread:
        router = RouterThread(router_settings([], **overrides)).start()
        started.append(router)
        return router

    yield start
    for router in started:
        router.stop()


@pytest.fixture
def router(make_router: Callable[..., RouterThread]) -> RouterThread:
    return make_router(api_keys=(KEY,))


def serve_pod(**overrides: Any) -> ServerThread:
    pod_settings = settings_mod.load(PodSettings, env={}, model="tiny", warmup=False, **overrides)
    server = ServerThread(lambda: create_app(pod_settings)).start()
    wait_ready(server.url, timeout=120)
    return server


@pytest.fixture(scope="module")
def pod_server() -> Iterator[Pod]:
    server = serve_pod()
    yield Pod(server)
    server.stop()


@pytest.fixture(scope="module")
def impatient_pod() -> Iterator[Pod]:
    """A pod with half-second header, keep-alive and body timeouts."""
    server = serve_pod(header_timeout_s=0.5, keepalive_timeout_s=0.5, body_timeout_s=0.5)
    yield Pod(server)
    server.stop()


# --- 1. the Authorization header -------------------------------------------------------------


def test_an_authorization_header_that_is_not_utf8_is_a_401_and_never_logged(
    router: RouterThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    raw = exchange(
        router.url,
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Authorization: Bearer " + KEY_BYTES + b"\xff\xfe\r\n\r\n",
    )
    status, _, body = response_of(raw)
    assert status == 401
    assert_envelope(body, "authentication_error")
    assert body["error"]["code"] == "invalid_api_key"
    assert_never_logged(caplog, KEY_BYTES)


@pytest.mark.parametrize("junk", [b"\x01\x02", b"\r", b"\x00"])
def test_a_malformed_authorization_header_is_a_400_envelope_without_the_key(
    router: RouterThread, caplog: pytest.LogCaptureFixture, junk: bytes
) -> None:
    caplog.set_level(logging.DEBUG)
    raw = exchange(
        router.url,
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY_BYTES + junk + b"x\r\n\r\n",
    )
    status, _, body = response_of(raw)
    assert status == 400
    assert_envelope(body)
    assert KEY_BYTES not in raw
    assert_never_logged(caplog, KEY_BYTES)


def assert_never_logged(caplog: pytest.LogCaptureFixture, secret: bytes) -> None:
    text = secret.decode()
    for record in caplog.records:
        rendered = record.getMessage() + (record.exc_text or "")
        if record.exc_info and record.exc_info[1] is not None:
            rendered += repr(record.exc_info[1]) + str(record.exc_info[1])
        assert text not in rendered, f"{record.name}: {rendered[:300]}"
        assert repr(secret)[2:-1] not in rendered


# --- 2. Content-Encoding that does not match the body ----------------------------------------


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
def test_a_body_that_is_not_what_its_content_encoding_says_is_a_400(
    router: RouterThread, pod_server: Pod, encoding: str
) -> None:
    body = b'{"prompt": "a fox"}'
    for url, headers in ((router.url, AUTH), (pod_server.url, {})):
        reply = call(
            "POST",
            url + "/v1/images/generations",
            raw=body,
            headers={**headers, "Content-Type": "application/json", "Content-Encoding": encoding},
        )
        assert reply.status == 400, (url, reply.body)
        assert_envelope(reply.body)


def test_a_body_that_is_validly_compressed_is_read(router: RouterThread) -> None:
    reply = call(
        "POST",
        router.url + "/v1/images/generations",
        raw=gzip.compress(b'{"prompt": "a fox"}'),
        headers={**AUTH, "Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert reply.status == 503  # read and priced; no backend here to take it
    assert reply.body["error"]["code"] == "no_backends"


# --- 3. requests aiohttp cannot parse ---------------------------------------------------------

MALFORMED = {
    "bad method": b"GE\x01T /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
    "bad request line": b"GET\r\nHost: x\r\n\r\n",
    "bad version": b"GET /v1/models HTTP/9.Z\r\nHost: x\r\n\r\n",
    "header too long": b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Echo-Me: " + b"A" * 9000 + b"\r\n\r\n",
    "request line too long": b"GET /" + b"B" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "too many headers": b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"
    + b"".join(b"X-H%d: echo-me\r\n" % i for i in range(200))
    + b"\r\n",
    "bad header": b"GET /v1/models HTTP/1.1\r\nHost: x\r\nBad Header Name: echo-me\r\n\r\n",
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_request_that_cannot_be_parsed_gets_the_envelope_without_an_echo(
    router: RouterThread, pod_server: Pod, name: str
) -> None:
    for url in (router.url, pod_server.url):
        raw = exchange(url, MALFORMED[name])
        status, headers, body = response_of(raw)
        assert status in (400, 431), raw[:200]
        assert headers["content-type"].startswith("application/json")
        assert_envelope(body)
        for echoed in (b"echo-me", b"AAAA", b"BBBB", b"HTTP/9", b"GE\\x01T"):
            assert echoed not in raw


def test_parse_errors_are_logged_a_few_times_per_interval(
    router: RouterThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for _ in range(40):
        exchange(router.url, MALFORMED["bad header"])
    lines = [r for r in caplog.records if r.name.startswith(("aiohttp", "imagefleet.edge"))]
    assert 1 <= len(lines) <= 10


# --- 4. connections -------------------------------------------------------------------------


def test_a_connection_that_sends_half_a_header_is_closed_after_the_header_timeout(
    make_router: Callable[..., RouterThread], impatient_pod: Pod
) -> None:
    router = make_router(header_timeout_s=0.5)
    for url in (router.url, impatient_pod.url):
        with connect(url) as sock:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Half: ")
            assert recv_all(sock) == b""  # closed, not left open


def test_a_silent_connection_and_an_idle_keep_alive_are_closed(
    make_router: Callable[..., RouterThread], impatient_pod: Pod
) -> None:
    router = make_router(header_timeout_s=0.5, keepalive_timeout_s=0.5)
    for url in (router.url, impatient_pod.url):
        with connect(url) as sock:
            assert recv_all(sock) == b""
        with connect(url) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            raw = recv_all(sock)
            assert raw.startswith(b"HTTP/1.1 200") and b"<still open>" not in raw


def test_a_declared_oversize_body_gets_413_before_it_is_sent(router: RouterThread, pod_server: Pod) -> None:
    for url in (router.url, pod_server.url):
        with connect(url) as sock:
            sock.sendall(
                b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                + KEY.encode()
                + b"\r\nContent-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n"
            )
            sock.settimeout(20)
            raw = sock.recv(65536)  # the answer comes without a byte of the body sent
            status, headers, body = response_of(raw)
            assert status == 413
            assert_envelope(body)
            assert headers.get("connection", "").lower() == "close"


def test_a_stalled_body_gets_408(make_router: Callable[..., RouterThread], impatient_pod: Pod) -> None:
    router = make_router(body_timeout_s=0.5)
    for url in (router.url, impatient_pod.url):
        with connect(url) as sock:
            sock.sendall(
                b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 100\r\n\r\n{"prompt": '
            )
            status, _, body = response_of(recv_all(sock))
        assert status == 408
        assert body["error"]["code"] == "body_timeout"


def test_a_stalled_multipart_edit_gets_408_from_the_pod(impatient_pod: Pod) -> None:
    with connect(impatient_pod.url) as sock:
        sock.sendall(
            b"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 10000\r\n\r\n"
            b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na fox'
        )
        status, _, body = response_of(recv_all(sock))
    assert status == 408
    assert body["error"]["code"] == "body_timeout"
    assert impatient_pod.request("GET", "/healthz")[0] == 200


def test_multipart_edits_held_on_a_pod_count_against_its_body_budget() -> None:
    server = serve_pod(max_body_mb=0.01, max_buffered_mb=0.015, body_timeout_s=30)
    head = b"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
    try:
        with connect(server.url) as stalled:
            stalled.sendall(head + b"Content-Length: 10000\r\n\r\n--b\r\n")  # holds 10,000 bytes
            time.sleep(0.5)
            raw = exchange(server.url, head + b"Content-Length: 8000\r\nConnection: close\r\n\r\n--b\r\n")
            status, headers, body = response_of(raw)
            assert status == 503 and body["error"]["code"] == "server_busy"
            assert "retry-after" in headers
        time.sleep(0.5)  # the stalled upload gave its share back when its connection went
        empty = b"--b--\r\n"
        raw = exchange(server.url, head + b"Content-Length: 7\r\nConnection: close\r\n\r\n" + empty)
        status, _, body = response_of(raw)
        assert status == 400 and body["error"]["code"] != "server_busy"
    finally:
        server.stop()


def test_bodies_held_across_requests_are_capped(make_router: Callable[..., RouterThread]) -> None:
    router = make_router(max_body_mb=0.01, max_buffered_mb=0.015, body_timeout_s=30)
    head = b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    with connect(router.url) as stalled:
        stalled.sendall(head + b"Content-Length: 10000\r\n\r\n{")  # holds 10,000 bytes of the budget
        time.sleep(0.5)
        raw = exchange(router.url, head + b"Content-Length: 8000\r\nConnection: close\r\n\r\n{")
        status, headers, body = response_of(raw)
        assert status == 503
        assert body["error"]["code"] == "server_busy"
        assert "retry-after" in headers
        small = call("POST", router.url + "/v1/images/generations", {"prompt": "fits"})
        assert small.status == 503 and small.body["error"]["code"] == "no_backends"  # read, then no pod
    # the stalled upload gave its share back when its connection went
    again = call("POST", router.url + "/v1/images/generations", {"prompt": "x" * 7000})
    assert again.body["error"]["code"] == "no_backends"


def test_connections_beyond_the_cap_are_refused_while_others_are_served(
    make_router: Callable[..., RouterThread],
) -> None:
    router = make_router(max_connections=3, header_timeout_s=30)
    idle = [connect(router.url) for _ in range(2)]
    try:
        time.sleep(0.3)
        with connect(router.url) as third:  # the cap's last place: served
            third.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            third.settimeout(20)
            assert third.recv(65536).startswith(b"HTTP/1.1 200")
            raw = exchange(router.url, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # the fourth
            status, headers, body = response_of(raw)
            assert status == 503
            assert body["error"]["code"] == "too_many_connections"
            assert "retry-after" in headers
            third.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # still served, kept alive
            assert third.recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.3)
    assert call("GET", router.url + "/healthz").status == 200
