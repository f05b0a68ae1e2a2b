"""Quality tiers on a real pod: every response names its tier; the fast one is opt-in."""

from __future__ import annotations

import base64

from openai import OpenAI

from imagefleet import metrics as m
from imagefleet import wire
from imagefleet.metrics import parse
from tests.conftest import PodFactory

MODEL = "synthetic:sd3-tiny"
FIELDS = {"size": "64x64", "num_inference_steps": 12, "seed": 5}


def test_the_fast_tier_is_opt_in_and_every_response_says_which_tier_made_it(make_pod: PodFactory) -> None:
    pod = make_pod(model=MODEL, tiers="lossless,fast", warmup=False)
    status, headers, lossless = pod.request("POST", "/v1/images/generations", {"prompt": "a fox", **FIELDS})
    assert status == 200 and lossless["tier"] == "lossless" and headers[wire.TIER_HEADER] == "lossless"
    status, headers, fast = pod.request(
        "POST", "/v1/images/generations", {"prompt": "a fox", "tier": "fast", **FIELDS}
    )
    assert status == 200 and fast["tier"] == "fast" and headers[wire.TIER_HEADER] == "fast"
    # 12 steps: 0-2, 5, 8 and 11 ran every block, the other six reused the cache (random weights at
    # their initial scale change too little between steps for the images to differ in 8 bits)
    assert parse(pod.metrics()).value(m.POD_CACHED_STEPS + "_total") == 6
    status, _, again = pod.request("POST", "/v1/images/generations", {"prompt": "a fox", **FIELDS})
    assert again["data"][0]["b64_json"] == lossless["data"][0]["b64_json"]  # the cache left no trace
    assert parse(pod.metrics()).value(m.POD_CACHED_STEPS + "_total") == 6

    (entry,) = pod.request("GET", "/v1/models")[2]["data"]
    assert entry["tiers"] == ["lossless", "fast"]
    assert entry["acceleration"]["fused_attentions"] == 5 and entry["acceleration"]["compiled_blocks"] == 0
    assert entry["acceleration"]["attention"] == "sdpa"  # FlashAttention-4 runs on Hopper and Blackwell only
    (info,) = parse(pod.metrics()).select(m.POD_MODEL_INFO + "_info")
    assert info.labels["tiers"] == "lossless,fast" and info.labels["compiled"] == "false"

    client = OpenAI(base_url=pod.url + "/v1", api_key="unused")
    response = client.images.generate(prompt="a fox", size="64x64", extra_body={"tier": "fast", "seed": 5})  # type: ignore[arg-type]
    assert response.model_extra is not None and response.model_extra["tier"] == "fast"
    assert base64.b64decode(response.data[0].b64_json or "")[:4] == b"\x89PNG"


def test_a_tier_the_pod_does_not_serve_is_a_400_naming_it(make_pod: PodFactory) -> None:
    pod = make_pod(warmup=False)
    status, body = pod.generate(tier="fast", size="64x64")
    assert status == 400
    assert body["error"]["param"] == "tier" and body["error"]["code"] == "tier_not_served"
    assert "lossless" in body["error"]["message"]
    status, body = pod.generate(tier="turbo", size="64x64")
    assert status == 400 and body["error"]["param"] == "tier"
