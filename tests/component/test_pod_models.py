"""Model sources: a local diffusers directory through from_pretrained, and a model that fails to load."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from PIL import Image

from imagefleet import settings as settings_mod
from imagefleet.inference_pod import models, tiny
from imagefleet.inference_pod.app import create_app
from imagefleet.settings import PodSettings
from imagefleet.testing.servers import ServerThread, get_json, wait_until
from tests.conftest import Pod, PodFactory


def test_a_local_directory_loads_through_from_pretrained(make_pod: PodFactory, tmp_path: Path) -> None:
    tiny.build().save_pretrained(tmp_path / "model")
    pod = make_pod(model=str(tmp_path / "model"), dtype="float32")
    (entry,) = pod.request("GET", "/v1/models")[2]["data"]
    assert entry["id"] == str(tmp_path / "model")
    assert entry["source"] == "local" and entry["random_weights"] is False and entry["family"] == "sd"
    status, body = pod.generate(model=str(tmp_path / "model"), size="64x64", num_inference_steps=2)
    assert status == 200
    assert Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"]))).size == (64, 64)


def failed_load(server: ServerThread) -> tuple[Pod, str]:
    """Wait for the pod to report its load failed; check it stays alive and refuses work with 503
    ``load_failed``; returns the pod and that error's message."""
    wait_until(lambda: get_json(server.url + "/readyz")[1].get("reason") == "load_failed", 60, "load failure")
    pod = Pod(server)
    assert pod.request("GET", "/healthz")[0] == 200  # alive, just not ready
    status, body = pod.generate()
    assert status == 503 and body["error"]["code"] == "load_failed"
    return pod, str(body["error"]["message"])


def test_a_model_that_fails_to_load_says_why() -> None:
    s = settings_mod.load(PodSettings, env={}, model="/nonexistent/model/dir")
    with ServerThread(lambda: create_app(s)) as server:
        pod, message = failed_load(server)
        assert pod.load()["ready"] is False
        assert "/nonexistent/model/dir" in message


def test_a_pod_told_to_use_flashattention_4_where_it_cannot_says_why_and_stays_alive() -> None:
    s = settings_mod.load(PodSettings, env={}, model="tiny", attention="fa4")
    with ServerThread(lambda: create_app(s)) as server:
        _, message = failed_load(server)
        assert "attention fa4 was asked for, but it needs a CUDA device" in message


def test_a_pipeline_that_fails_its_warm_up_is_a_failed_load_not_a_ready_pod() -> None:
    s = settings_mod.load(PodSettings, env={}, model="tiny", max_batch_size=2)
    model = models.load(s)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the denoiser cannot run here")

    model.text2img.unet.forward = broken
    with ServerThread(lambda: create_app(s, model=model)) as server:
        _, message = failed_load(server)
        assert (
            "the warm-up made no image at 64x64, batch 1 (RuntimeError: the denoiser cannot run here)"
            in message
        )


def test_compiled_blocks_as_cuda_graphs_are_what_the_model_reports() -> None:
    # nothing is compiled until the first call (the warm-up's, on a GPU); the load says what it did
    s = settings_mod.load(
        PodSettings, env={}, model="synthetic:sd3-tiny", dtype="float32", compile="blocks-graphs"
    )
    model = models.load(s)
    transformer = model.text2img.transformer
    assert model.acceleration.compiled_blocks == len(transformer.transformer_blocks)
    assert model.acceleration.to_json()["compile_mode"] == "reduce-overhead"
    # the graph-step marker is a forward pre-hook on the denoiser
    assert len(transformer._forward_pre_hooks) == 1
    plain = models.load(settings_mod.load(PodSettings, env={}, model="synthetic:sd3-tiny", compile="blocks"))
    assert plain.acceleration.compile_mode == "default" and not plain.text2img.transformer._forward_pre_hooks
