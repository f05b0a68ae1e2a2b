"""The router's web pages and ``GET /v1/fleet``: what is served, with which headers, and the fleet rules."""

from __future__ import annotations

import asyncio
import random
import re
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from imagefleet import cli, settings, wire
from imagefleet.loadreport import LoadReport
from imagefleet.operator import manifests
from imagefleet.operator.spec import parse
from imagefleet.router import fleet as f
from imagefleet.router import generator as gen
from imagefleet.router import telemetry as t
from imagefleet.router.auth import KeyStore
from imagefleet.router.discovery import Backend, StaticDiscovery
from imagefleet.router.loadview import LoadView
from imagefleet.router.pick import PICKERS
from imagefleet.router.signing import UrlSigner
from imagefleet.router.state import RouterRuntime
from imagefleet.router.telemetry import RouterMetrics
from imagefleet.router.web import CSP, STATIC_DIR, is_page, load_assets
from imagefleet.settings import OperatorSettings, RouterSettings
from imagefleet.testing.routers import RouterThread, router_settings
from imagefleet.testing.servers import get_json


def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture(scope="module")
def router() -> Iterator[RouterThread]:
    with RouterThread(router_settings(["http://127.0.0.1:9"])) as r:
        yield r  # type: ignore[misc]


@pytest.fixture(scope="module")
def keyed() -> Iterator[RouterThread]:
    with RouterThread(router_settings(api_keys=("k1",))) as r:
        yield r  # type: ignore[misc]


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/", "text/html; charset=utf-8"),
        ("/fleet", "text/html; charset=utf-8"),
        ("/web/style.css", "text/css; charset=utf-8"),
        ("/web/playground.js", "text/javascript; charset=utf-8"),
        ("/web/icon.svg", "image/svg+xml"),
    ],
)
def test_pages_and_assets_have_their_content_type_and_a_csp(
    router: RouterThread, path: str, content_type: str
) -> None:
    status, headers, body = fetch(router.url + path)
    assert status == 200 and headers["Content-Type"] == content_type
    assert headers["Content-Security-Policy"] == CSP
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert body


def test_the_csp_allows_this_origin_only_and_no_inline_code() -> None:
    directives = dict(d.split(" ", 1) for d in CSP.split("; "))
    assert directives["default-src"] == "'none'"
    for name in ("script-src", "style-src", "connect-src"):
        assert directives[name] == "'self'"
    assert "'unsafe-inline'" not in CSP and "http" not in CSP
    assert directives["frame-ancestors"] == "'none'"


@pytest.mark.parametrize("path", ["/web/playground.html", "/web/nothing.js", "/web/..%2Fweb.py", "/web/"])
def test_only_known_assets_are_served(router: RouterThread, path: str) -> None:
    status, _, body = fetch(router.url + path)
    assert status == 404
    assert b'"error"' in body


def test_every_file_a_page_refers_to_is_served() -> None:
    assets = load_assets()
    for page in ("playground.html", "fleet.html"):
        html = (STATIC_DIR / page).read_text()
        refs = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert refs
        for ref in refs:
            assert not ref.startswith(("http:", "https:", "//")), f"{page} loads {ref} from elsewhere"
            if ref.startswith("/web/"):
                assert ref.removeprefix("/web/") in assets, f"{page} refers to missing {ref}"
        # the CSP allows no inline code: no <script> body, style attribute or on* handler
        assert not re.search(r"<script>|<style|\sstyle=|\son[a-z]+=", html), page


def test_pages_are_open_but_the_api_they_call_needs_the_key(keyed: RouterThread) -> None:
    assert fetch(keyed.url + "/")[0] == 200
    assert fetch(keyed.url + "/web/common.js")[0] == 200
    status, _, body = fetch(keyed.url + "/v1/fleet")
    assert status == 401 and b"missing_api_key" in body
    status, _, _ = fetch(keyed.url + "/v1/fleet", {"Authorization": "Bearer k1"})
    assert status == 200
    assert is_page("/fleet") and not is_page("/v1/fleet") and not is_page("/stats")


def test_without_web_the_pages_are_gone_and_the_fleet_api_stays() -> None:
    with RouterThread(router_settings(web=False)) as r:
        assert fetch(r.url + "/")[0] == 404
        assert fetch(r.url + "/web/style.css")[0] == 404
        status, body = get_json(r.url + "/v1/fleet")
        assert status == 200 and body["pods"] == []


def test_the_fleet_api_lists_every_backend(router: RouterThread) -> None:
    status, body = get_json(router.url + "/v1/fleet")
    assert status == 200 and body["object"] == "fleet"
    assert [p["name"] for p in body["pods"]] == ["http://127.0.0.1:9"]
    assert body["pods"][0]["state"] == f.UNREACHABLE  # nothing listens there
    assert body["totals"]["pods"] == 1 and body["totals"]["unreachable"] == 1
    assert body["generator"] is None


# --- the fleet rules, on plain objects -----------------------------------------------------------


def runtime(**settings: object) -> RouterRuntime:
    view = LoadView(eject_after=2, backoff_s=1.0, backoff_max_s=30.0)
    view.sync({n: Backend(n, f"http://{n}:8001") for n in ("a", "b")})
    return RouterRuntime(
        settings=router_settings(**settings),
        view=view,
        metrics=RouterMetrics(),
        keys=KeyStore(),
        picker=PICKERS["least-wait"],
        rng=random.Random(0),
        signer=UrlSigner(b"k" * 32, ttl_s=3600),
    )


def report(**fields: object) -> LoadReport:
    return LoadReport(**{"model": "m", "ready": True, **fields})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "state"),
    [
        ({}, f.READY),
        ({"ready": False}, f.LOADING),
        ({"draining": True, "ready": False}, f.DRAINING),
        ({"quarantined": True}, f.QUARANTINED),
        ({"quarantined": True, "draining": True}, f.QUARANTINED),
    ],
)
def test_a_pods_state_comes_from_its_report(fields: dict[str, object], state: str) -> None:
    rt = runtime()
    a = rt.view.views["a"]
    rt.view.reported(a, report(**fields), started=0.0, now=0.0)
    assert f.state_of(a) == state


def test_a_pod_without_a_report_or_ejected_is_unreachable() -> None:
    rt = runtime()
    a, b = rt.view.views["a"], rt.view.views["b"]
    assert f.state_of(a) == f.UNREACHABLE
    rt.view.reported(b, report(), started=0.0, now=0.0)
    b.health.failed(1.0)
    assert f.state_of(b) == f.READY  # one failure is not an ejection
    b.health.failed(2.0)
    assert f.state_of(b) == f.UNREACHABLE


def test_fleet_counts_picks_errors_and_the_report_fields() -> None:
    rt = runtime()
    a = rt.view.views["a"]
    rt.view.reported(
        a,
        report(
            queued_samples=5, queued_requests=2, queued_seconds=3.25, running_samples=4, completed_images=9
        ),
        started=0.0,
        now=10.0,
    )
    for outcome, times in ((t.OK, 3), (t.SERVER_ERROR, 1), (t.UNREACHABLE, 2), (t.OVERLOADED, 4)):
        for _ in range(times):
            rt.metrics.requests.labels("a", outcome).inc()
    rt.metrics.retries.labels(t.RETRY_UNREACHABLE).inc()
    body = f.fleet(rt, now=12.5, wall=1000.0)
    pod = {p["name"]: p for p in body["pods"]}["a"]
    assert pod["picks"] == 10 and pod["errors"] == 3  # 429s are not the pod's errors
    assert pod["outcomes"] == {"ok": 3, "overloaded": 4, "server_error": 1, "unreachable": 2}
    assert (pod["queued_images"], pod["queued_requests"], pod["queued_seconds"]) == (5, 2, 3.25)
    assert (pod["running_images"], pod["completed_images"], pod["report_age_seconds"]) == (4, 9, 2.5)
    assert body["totals"]["picks"] == 10 and body["totals"]["retries"] == 1
    assert body["totals"]["ready"] == 1 and body["totals"]["unreachable"] == 1
    assert body["created"] == 1000 and body["models"] == ["m"]


def test_the_generator_is_named_by_the_pods_selector() -> None:
    selector = wire.selector_string(wire.pod_selector("sd-35"))
    assert gen.generator_name(selector) == "sd-35"
    assert gen.generator_name("app=x, imagefleet.dev/generator == g2") == "g2"
    assert gen.generator_name("app=x") is None and gen.generator_name("") is None


def test_the_generator_part_says_what_is_known() -> None:
    shown = gen.describe("ns", "sel", "g", gen.Reading(({"type": "Ready", "status": "True"},)))
    assert shown["conditions"] == [{"type": "Ready", "status": "True"}] and shown["note"] is None
    refused = gen.describe("ns", "sel", "g", gen.Reading(None, "forbidden"))
    assert refused["conditions"] is None and refused["error"] == "forbidden"
    assert "grants only pods" in refused["note"] and "kubectl describe imggen g -n ns" in refused["note"]
    assert "Not read yet" in gen.describe("ns", "sel", "g", None)["note"]


def test_the_generator_is_read_at_most_once_per_refresh_period() -> None:
    attempts = []
    clock = [100.0]

    def connect() -> object:
        attempts.append(clock[0])
        raise OSError("no kubeconfig here")

    async def polls() -> dict[str, object]:
        selector = wire.selector_string(wire.pod_selector("g"))
        view = gen.GeneratorView("ns", selector, connect, lambda: clock[0])
        assert str(view.current()["note"]).startswith("Not read yet")
        await asyncio.sleep(0.3)  # the read runs on a thread
        for _ in range(20):
            body = view.current()
        await asyncio.sleep(0.1)
        assert len(attempts) == 1  # twenty polls, one read
        clock[0] += gen.REFRESH_S
        view.current()
        await asyncio.sleep(0.3)
        await view.close()
        return body

    body = asyncio.run(polls())
    assert len(attempts) == 2
    assert body["error"] == "OSError" and "could not be read" in str(body["note"])


def test_with_kubernetes_discovery_the_fleet_reports_on_the_generator() -> None:
    selector = wire.selector_string(wire.pod_selector("g"))
    router = router_settings(discovery="kubernetes", namespace="team", selector=selector)
    with RouterThread(router, discovery=StaticDiscovery(())) as r:
        status, body = get_json(r.url + "/v1/fleet")
    assert status == 200
    assert body["generator"]["name"] == "g" and body["generator"]["namespace"] == "team"
    assert (
        body["generator"]["conditions"] is None
        and "kubectl describe imggen g -n team" in body["generator"]["note"]
    )


@pytest.mark.parametrize("on", [True, False])
def test_the_operator_passes_router_web_to_the_routers_it_creates(on: bool) -> None:
    operator = OperatorSettings(router_web=on)
    resource = {
        "apiVersion": wire.API_VERSION,
        "kind": wire.KIND,
        "metadata": {"name": "g", "namespace": "ns", "uid": "u", "generation": 1},
        "spec": {"model": {"id": "tiny"}, "replicas": 1},
    }
    deployment = manifests.router_deployment(parse(resource, operator), operator)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = cli.build_parser().parse_args(container["command"][1:])
    assert settings.load(RouterSettings, args, env={}).web is on
