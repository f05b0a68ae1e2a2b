"""Schemathesis against a live pod and a live router in front of it: every operation of the
description each serves at ``/openapi.json`` is called with generated requests, and every answer
must be no 5xx, of a documented status and content type, and of the documented schema.

The pod is started with the smallest limits (64x64 images, 2 steps, 2 images), which its
description carries, so the valid requests schemathesis makes stay quick on a CPU. Operations are
driven with schemathesis' Python API under hypothesis (``operation.as_strategy``), not its pytest
plugin, whose lazy loader (``schemathesis.pytest.from_fixture``) fails under pytest 9
(``Function._nodeid``).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from imagefleet import openapi
from imagefleet import settings as settings_mod
from imagefleet.inference_pod.app import create_app
from imagefleet.settings import PodSettings
from imagefleet.testing.routers import RouterThread, router_settings
from imagefleet.testing.servers import ServerThread, get_json, wait_ready

pytestmark = pytest.mark.slow

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = int(os.environ.get("IMAGEFLEET_FUZZ_EXAMPLES", "25"))
"""Generated requests per operation (``IMAGEFLEET_FUZZ_EXAMPLES`` for a deeper run than CI's)."""
LIMITS = {
    "max_pixels": 64 * 64,
    "max_side": 64,
    "max_steps": 2,
    "default_steps": 1,
    "max_images_per_request": 2,
    "max_prompt_chars": 300,
}
KEY = {"Authorization": "Bearer sk-test"}
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def pod_url() -> Iterator[str]:
    pod_settings = settings_mod.load(PodSettings, env={}, model="tiny", **LIMITS)
    server = ServerThread(lambda: create_app(pod_settings)).start()
    wait_ready(server.url, timeout=120)
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def router_url(pod_url: str) -> Iterator[str]:
    with RouterThread(router_settings([pod_url])) as router:
        router.wait_ready(1)
        yield router.url


@pytest.fixture(scope="module")
def keyed_router_url(pod_url: str) -> Iterator[str]:
    with RouterThread(router_settings([pod_url], api_keys=(KEY["Authorization"].split()[1],))) as router:
        router.wait_ready(1)
        yield router.url


def test_the_pod_describes_its_own_limits(pod_url: str) -> None:
    status, doc = get_json(pod_url + openapi.PATH)
    assert status == 200
    body = doc["paths"]["/v1/images/generations"]["post"]["requestBody"]["content"]["application/json"]
    fields = body["schema"]["properties"]
    assert fields["n"]["maximum"] == LIMITS["max_images_per_request"]
    assert fields["num_inference_steps"]["maximum"] == LIMITS["max_steps"]
    assert fields["prompt"]["maxLength"] == LIMITS["max_prompt_chars"]


def fuzz(url: str, mode: GenerationMode, headers: dict[str, str] | None = None) -> list[str]:
    """Run the checks on ``EXAMPLES`` generated requests to every operation ``url`` describes:
    valid ones (``POSITIVE``) or ones that break the description (``NEGATIVE``, which must get a
    documented 4xx in the error envelope). ``headers`` load the description, never the requests."""
    schema = schemathesis.openapi.from_url(url + openapi.PATH, headers=headers or {})
    called = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if mode is GenerationMode.NEGATIVE and not operation.body:
            continue  # every path parameter is any text: only a body can break the description

        @FUZZ
        @given(case=operation.as_strategy(mode))
        def run(case: schemathesis.Case) -> None:
            case.call_and_validate(checks=CHECKS, timeout=60)

        run()
        called.append(operation.label)
    return called


def png(size: tuple[int, int] = (64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", size, (200, 30, 30, 0)).save(buf, "PNG")
    return buf.getvalue()


def answered(url: str) -> dict[str, str]:
    """The answers random data rarely reaches, each checked like a generated one: a stream, an
    edit of a real image with a mask, a url answer and the file it names. Status -> content type."""
    schema = schemathesis.openapi.from_url(url + openapi.PATH)
    generations, edits = schema["/v1/images/generations"]["POST"], schema["/v1/images/edits"]["POST"]
    cases = [
        generations.Case(body={"prompt": "a red fox", "stream": True, "partial_images": 1}),
        edits.Case(
            body={"prompt": "a red fox", "image": png(), "mask": png()}, media_type="multipart/form-data"
        ),
    ]
    seen = {}
    for case in cases:
        response = case.call_and_validate(checks=CHECKS, timeout=60)
        seen[case.operation.label] = f"{response.status_code} {response.headers['content-type'][0]}"
    kept = generations.Case(body={"prompt": "a red fox", "response_format": "url", "output_format": "webp"})
    link = kept.call_and_validate(checks=CHECKS, timeout=60).json()["data"][0]["url"]
    file_id = link.rsplit("/", 1)[1]
    files = schema["/v1/images/files/{file_id}"]["GET"]
    response = files.Case(path_parameters={"file_id": file_id}).call_and_validate(checks=CHECKS, timeout=60)
    seen[files.label] = f"{response.status_code} {response.headers['content-type'][0]}"
    return seen


@pytest.mark.parametrize("server", ["pod_url", "router_url"])
def test_streams_edits_and_files_answer_as_described(server: str, request: pytest.FixtureRequest) -> None:
    seen = answered(request.getfixturevalue(server))
    assert seen == {
        "POST /v1/images/generations": "200 text/event-stream",
        "POST /v1/images/edits": "200 application/json",
        "GET /v1/images/files/{file_id}": "200 image/webp",
    }


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_the_pod_answers_as_it_describes(pod_url: str, mode: GenerationMode) -> None:
    assert "POST /v1/images/edits" in fuzz(pod_url, mode)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_the_router_answers_as_it_describes(router_url: str, mode: GenerationMode) -> None:
    assert "POST /v1/images/edits" in fuzz(router_url, mode)


def test_a_router_with_api_keys_answers_as_it_describes(keyed_router_url: str) -> None:
    """Requests without the key get a 401 in the envelope, which the description lists (the
    probes, metrics and stats stay open); the description itself needs the key like the API."""
    assert get_json(keyed_router_url + openapi.PATH)[0] == 401
    assert get_json(keyed_router_url + "/v1/models")[0] == 401
    assert "POST /v1/images/edits" in fuzz(keyed_router_url, GenerationMode.POSITIVE, KEY)
