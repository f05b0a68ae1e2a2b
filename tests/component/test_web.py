"""The playground and the fleet page in a real headless Chromium, on ``imagefleet serve`` with two pods.

Local mode runs as a user starts it (two tiny CPU pods); the pages are driven with the keyboard
as a user would. The same run's router and pods are scraped to check that every metric the
chart's Grafana dashboard queries exists. Screenshots go to ``$IMAGEFLEET_TEST_OUTPUT`` (else
the test's temporary directory); with ``IMAGEFLEET_DOCS_SCREENSHOTS=1`` they also replace
docs/img/playground.png and docs/img/fleet.png.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from selenium.webdriver import Chrome
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.wait import WebDriverWait

from imagefleet.testing import browser, dashboards
from imagefleet.testing.routers import Held, RouterThread, router_settings
from imagefleet.testing.servers import free_port, get_json, get_text, terminate, wait_until
from tests.conftest import PodFactory

REPO = Path(__file__).resolve().parents[2]
PODS = 2
WAIT_S = 60


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    url: str
    pod_urls: list[str]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def fleet(self) -> dict[str, Any]:
        status, body = get_json(self.url + "/v1/fleet")
        assert status == 200, body
        return dict(body)


def pod_pid(parent: int, port: int) -> int:
    """The pod process of local mode that listens on ``port``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and b"pod" in args and str(port).encode() in args:
            return int(entry.name)
    raise LookupError(f"no pod process on port {port}")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    browser.binaries()  # skip (or fail) before starting anything
    port, base = free_port(), free_port()
    log = tmp_path_factory.mktemp("web") / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "imagefleet", "serve",
                "--model", "tiny", "--gpus", "none", "--cpu-pods", str(PODS),
                "--port", str(port), "--pod-base-port", str(base),
                "--restart-backoff-s", "600",  # a stopped pod stays down (local mode caps it at 60 s)
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    s = Served(proc, f"http://127.0.0.1:{port}", [f"http://127.0.0.1:{base + i}" for i in range(PODS)], log)
    try:
        wait_until(lambda: "imagefleet is ready" in s.output() or proc.poll() is not None, 180, "the banner")
        assert proc.poll() is None, s.output()
        wait_until(lambda: s.fleet()["totals"]["ready"] == PODS, 180, "both pods ready")
        yield s
    finally:
        terminate(proc)


@pytest.fixture(scope="module")
def chrome() -> Iterator[Chrome]:
    with browser.chromium() as c:
        yield c


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return browser.output_dir(tmp_path_factory.mktemp("screenshots"))


def screenshot(chrome: Chrome, shots: Path, name: str) -> None:
    chrome.save_screenshot(str(shots / f"{name}.png"))
    if os.environ.get("IMAGEFLEET_DOCS_SCREENSHOTS"):
        image = Image.open(io.BytesIO(chrome.get_screenshot_as_png())).convert("RGB")
        image = image.quantize(colors=96)  # a small PNG for the README
        (REPO / "docs" / "img").mkdir(exist_ok=True)
        image.save(REPO / "docs" / "img" / f"{name}.png", optimize=True)


def wait(chrome: Chrome, check: Callable[[Chrome], Any], what: str, timeout: float = WAIT_S) -> Any:
    return WebDriverWait(chrome, timeout, poll_frequency=0.1).until(check, message=what)


def server_streams(url: str) -> bool:
    """Whether the server answers ``stream: true`` with an event stream (else it refuses it)."""
    body = json.dumps({"prompt": "probe", "size": "64x64", "stream": True, "partial_images": 1}).encode()
    request = urllib.request.Request(
        url + "/v1/images/generations", body, {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            response.read()
            return str(response.headers.get("Content-Type", "")).startswith("text/event-stream")
    except urllib.error.HTTPError as e:
        error = json.loads(e.read())["error"]
        assert e.code == 400 and error["param"] in ("stream", "partial_images"), error
        return False


def gallery_images(chrome: Chrome) -> list[dict[str, Any]]:
    return list(
        chrome.execute_script(
            "return [...document.querySelectorAll('#gallery li')].map(li => {"
            " const img = li.querySelector('img');"
            " return {text: li.innerText, width: img.naturalWidth, height: img.naturalHeight,"
            " complete: img.complete}; })"
        )
    )


def unexpected_errors(entries: list[dict[str, Any]], streams: bool) -> list[dict[str, Any]]:
    """SEVERE console entries, less the one 400 with which a server that cannot stream says so."""
    refused = "/v1/images/generations - Failed to load resource: the server responded with a status of 400"
    return [e for e in browser.errors(entries) if streams or refused not in e["message"]]


# --- the playground -------------------------------------------------------------------------------


def test_the_playground_loads_without_console_errors(served: Served, chrome: Chrome) -> None:
    browser.console(chrome)
    chrome.get(served.url + "/")
    wait(chrome, lambda c: "tiny" in c.find_element(By.ID, "model").text, "the model's name")
    assert chrome.switch_to.active_element == chrome.find_element(By.ID, "prompt")
    assert chrome.find_element(By.ID, "size").get_attribute("placeholder") == "64x64"  # tiny's default
    assert browser.errors(browser.console(chrome)) == []


def test_a_generation_from_the_form_shows_its_images_and_parameters(
    served: Served, chrome: Chrome, shots: Path
) -> None:
    streams = server_streams(served.url)
    browser.console(chrome)  # only this test's entries below
    chrome.get(served.url + "/")
    wait(chrome, lambda c: c.find_element(By.ID, "model").text, "the model's name")
    prompt = chrome.switch_to.active_element
    prompt.send_keys("a lighthouse at dusk")
    # Tab order: prompt, negative prompt, size, steps, guidance, seed, images
    for value in ("blurry", "64x64", "3", "", "7", "2"):
        chrome.switch_to.active_element.send_keys(Keys.TAB)
        if value:
            chrome.switch_to.active_element.send_keys(value)
    assert chrome.switch_to.active_element.get_attribute("id") == "n"
    chrome.switch_to.active_element.send_keys(Keys.ENTER)  # Enter submits

    wait(
        chrome,
        lambda c: len(gallery_images(c)) == 2 and all(i["width"] for i in gallery_images(c)),
        "2 images",
    )
    images = gallery_images(chrome)
    assert [(i["width"], i["height"]) for i in images] == [(64, 64), (64, 64)]
    assert "seed 7" in images[0]["text"] and "seed 8" in images[1]["text"]  # image i uses seed + i
    assert all("a lighthouse at dusk" in i["text"] and "3 steps" in i["text"] for i in images)
    assert "not: blurry" in images[0]["text"]
    status = chrome.find_element(By.ID, "status").text
    assert status.startswith("2 images in"), status
    previews = chrome.find_elements(By.CSS_SELECTOR, "#preview-images img")
    if streams:
        assert "previews" in status and previews and previews[0].get_attribute("src").startswith("blob:")
    else:
        assert not chrome.find_element(By.ID, "previews").is_displayed() and "previews" not in status
    screenshot(chrome, shots, "playground")
    assert unexpected_errors(browser.console(chrome), streams) == []

    # the gallery is this tab's: it survives a reload (once IndexedDB has the results)
    wait(chrome, lambda c: c.find_element(By.ID, "status").get_attribute("data-saved"), "the results saved")
    chrome.refresh()
    wait(
        chrome, lambda c: len(gallery_images(c)) == 2 and all(i["width"] for i in gallery_images(c)), "reload"
    )
    assert "seed 7" in gallery_images(chrome)[0]["text"]


PARSE_EVENTS = """
const done = arguments[arguments.length - 1];
const text = arguments[0];
const bytes = new TextEncoder().encode(text);
const cuts = arguments[1];  // byte offsets: chunks end mid-line, mid-separator, mid-character
const body = new ReadableStream({
  start(controller) {
    let at = 0;
    for (const cut of [...cuts, bytes.length]) { controller.enqueue(bytes.slice(at, cut)); at = cut; }
    controller.close();
  },
});
(async () => {
  const out = [];
  for await (const e of imagefleet.events(new Response(body))) out.push(e);
  done(out);
})().catch((e) => done("error: " + e));
"""


def test_the_event_stream_reader_follows_the_sse_rules(served: Served, chrome: Chrome) -> None:
    """The playground's reader of OpenAI's image events, fed a stream cut at awkward places."""
    chrome.get(served.url + "/")
    partial = {"type": "image_generation.partial_image", "b64_json": "AAAA", "partial_image_index": 0}
    completed = {"type": "image_generation.completed", "b64_json": "BBBB", "revised_prompt": "phare é"}
    text = (
        f"event: image_generation.partial_image\r\ndata: {json.dumps(partial)}\r\n\r\n"
        ": keep-alive\n\n"
        ': imagefleet.progress {"queued_ahead": 2}\n\n'
        f"event: image_generation.completed\ndata: {json.dumps(completed, ensure_ascii=False)}\n\n"
        'data: {"type": "error",\ndata: "error": {"message": "two data lines"}}\n\n'
        "data: [DONE]\n\n"
    )
    raw = text.encode()
    accent = raw.index("é".encode())
    cuts = [10, raw.index(b"\r\n\r\n") + 3, accent + 1, len(raw) - 3]
    events = chrome.execute_async_script(PARSE_EVENTS, text, cuts)
    assert events == [
        {"event": "image_generation.partial_image", "data": partial},
        {"event": "imagefleet.progress", "data": {"queued_ahead": 2}},
        {"event": "image_generation.completed", "data": completed},
        {"event": "message", "data": {"type": "error", "error": {"message": "two data lines"}}},
    ]


def test_a_queued_generation_shows_its_place_in_the_queue(make_pod: PodFactory, chrome: Chrome) -> None:
    """While the request waits, the status line says how many images start before it."""
    pod = make_pod(max_batch_size=1)
    pod.arm("stall", seconds=120)  # the first request holds the GPU
    with RouterThread(router_settings([pod.url])) as router:
        holder = Held(pod.url, num_inference_steps=2).start()
        wait_until(lambda: pod.load()["running_samples"] == 1, 30, "the first batch to start")
        ahead = Held(pod.url, num_inference_steps=2).start()
        wait_until(lambda: pod.load()["queued_samples"] == 1, 30, "one sample to queue")
        try:
            chrome.get(router.url + "/")
            wait(chrome, lambda c: c.find_element(By.ID, "model").text, "the model's name")
            chrome.find_element(By.ID, "prompt").send_keys("behind two", Keys.ENTER)
            status = lambda c: c.find_element(By.ID, "status").text  # noqa: E731
            wait(chrome, lambda c: status(c) == "Queued: 1 ahead…", "the queue position")
            ahead.hang_up()
            wait(chrome, lambda c: status(c) == "Queued: 0 ahead…", "the position falling")
            holder.hang_up()
            wait(chrome, lambda c: status(c).startswith("1 image"), "the image")
        finally:
            ahead.hang_up()
            holder.hang_up()


def test_a_bad_request_shows_the_servers_message(served: Served, chrome: Chrome) -> None:
    chrome.get(served.url + "/")
    wait(chrome, lambda c: c.find_element(By.ID, "model").text, "the model's name")
    chrome.find_element(By.ID, "size").send_keys("65x64")  # not a multiple of the model's 8
    prompt = chrome.find_element(By.ID, "prompt")
    prompt.send_keys("odd size", Keys.ENTER)
    wait(chrome, lambda c: c.find_element(By.ID, "status").text.startswith("Failed"), "the error")
    assert "size" in chrome.find_element(By.ID, "status").text
    assert chrome.find_element(By.ID, "generate").is_enabled()


def test_the_key_is_asked_for_on_401_and_sent_as_bearer(served: Served, chrome: Chrome) -> None:
    with RouterThread(router_settings(served.pod_urls, api_keys=("right-key",))) as keyed:
        chrome.get(keyed.url + "/")
        form = wait(chrome, lambda c: c.find_element(By.ID, "key-form"), "the key form")
        wait(chrome, lambda c: form.is_displayed(), "the key form shown")
        assert chrome.switch_to.active_element.get_attribute("id") == "api-key"
        chrome.switch_to.active_element.send_keys("wrong-key", Keys.ENTER)
        wait(chrome, lambda c: "refused" in c.find_element(By.ID, "key-help").text, "the refusal")
        chrome.switch_to.active_element.send_keys("right-key", Keys.ENTER)
        wait(chrome, lambda c: "tiny" in c.find_element(By.ID, "model").text, "the model with the key")
        assert not form.is_displayed()
        assert chrome.execute_script("return sessionStorage.getItem('imagefleet.apiKey')") == "right-key"
        chrome.find_element(By.ID, "prompt").send_keys("with a key", Keys.ENTER)
        wait(chrome, lambda c: c.find_element(By.ID, "status").text.startswith("1 image"), "an image")
        chrome.execute_script("sessionStorage.clear()")


def test_the_pages_fit_a_phone(served: Served, chrome: Chrome) -> None:
    size = chrome.get_window_size()
    chrome.set_window_size(390, 844)
    try:
        for path, ready in (("/", "#gallery li img"), ("/fleet", "#pods tbody tr")):
            chrome.get(served.url + path)
            wait(chrome, lambda c, r=ready: c.find_elements(By.CSS_SELECTOR, r), f"{path} filled")
            width, viewport = chrome.execute_script(
                "return [document.documentElement.scrollWidth, document.documentElement.clientWidth]"
            )
            assert viewport < 500 and width <= viewport, f"{path} scrolls sideways: {width} > {viewport}"
    finally:
        chrome.set_window_size(size["width"], size["height"])


# --- the dashboard's metrics ----------------------------------------------------------------------


def test_every_metric_the_dashboard_queries_is_exposed(served: Served) -> None:
    exposed: set[str] = set()
    for url in (served.url, *served.pod_urls):
        exposed |= dashboards.exposed_names(text_string_to_metric_families(get_text(url + "/metrics")))
    queried = {
        (title, name)
        for title, expr in dashboards.expressions(dashboards.load())
        for name in dashboards.metric_names(expr)
    }
    assert len(queried) > 20
    missing = sorted((title, name) for title, name in queried if name not in exposed)
    assert missing == [], f"queried but not exposed: {missing}"


# --- the fleet page -------------------------------------------------------------------------------


def rows(chrome: Chrome) -> dict[str, dict[str, str]]:
    return {
        r["pod"]: r
        for r in chrome.execute_script(
            "return [...document.querySelectorAll('#pods tbody tr')].map(tr => ({pod: tr.dataset.pod,"
            " state: tr.dataset.state, picks: tr.querySelector('.picks').textContent,"
            " perMinute: tr.querySelector('.per-minute').textContent}))"
        )
    }


def test_the_fleet_page_lists_the_pods_and_follows_a_stopped_one(
    served: Served, chrome: Chrome, shots: Path
) -> None:
    browser.console(chrome)  # only this test's entries below
    chrome.get(served.url + "/fleet")
    wait(
        chrome,
        lambda c: {p: r["state"] for p, r in rows(c).items()} == dict.fromkeys(served.pod_urls, "ready"),
        "2 ready pods",
    )
    picks = sum(int(r["picks"]) for r in rows(chrome).values())
    assert picks > 0  # the generations above went through this router

    status, _ = get_json(served.url + "/readyz")
    assert status == 200
    for _ in range(3):  # images while the page watches: its per-minute rate rises
        body = json.dumps({"prompt": "rate", "size": "64x64", "n": 2}).encode()
        urllib.request.urlopen(
            urllib.request.Request(
                served.url + "/v1/images/generations", body, {"Content-Type": "application/json"}
            ),
            timeout=120,
        ).read()
    wait(chrome, lambda c: sum(int(r["picks"]) for r in rows(c).values()) >= picks + 3, "3 more picks")
    wait(chrome, lambda c: any(float(r["perMinute"]) > 0 for r in rows(c).values()), "images per minute")
    screenshot(chrome, shots, "fleet")

    stopped = served.pod_urls[1]
    os.kill(pod_pid(served.proc.pid, int(stopped.rsplit(":", 1)[1])), signal.SIGTERM)
    wait(
        chrome, lambda c: rows(c)[stopped]["state"] in ("draining", "unreachable"), "the stopped pod's state"
    )
    assert rows(chrome)[served.pod_urls[0]]["state"] == "ready"
    wait(chrome, lambda c: rows(c)[stopped]["state"] == "unreachable", "the stopped pod gone")
    summary = chrome.find_element(By.ID, "summary").text
    assert "Unreachable\n1" in summary and "Ready\n1" in summary
    assert browser.errors(browser.console(chrome)) == []
