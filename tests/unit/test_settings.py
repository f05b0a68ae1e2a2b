"""Settings: one typed object, flags over environment over defaults, clear errors."""

from __future__ import annotations

import argparse
import dataclasses
import re

import pytest

from imagefleet import cli, settings
from imagefleet.settings import PodSettings, RouterSettings, SettingsError


def parse(argv: list[str], env: dict[str, str]) -> PodSettings:
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser, PodSettings)
    return settings.load(PodSettings, parser.parse_args(argv), env)


def test_defaults() -> None:
    s = parse([], {})
    assert s == PodSettings()
    assert s.model == "tiny" and s.max_batch_size == 4 and s.batch_mode == "request"


def test_flag_beats_environment_beats_default() -> None:
    env = {"IMAGEFLEET_MAX_BATCH_SIZE": "8", "IMAGEFLEET_MAX_WAIT_MS": "20"}
    s = parse(["--max-batch-size", "2"], env)
    assert (s.max_batch_size, s.max_wait_ms) == (2, 20)


def test_types_are_parsed() -> None:
    s = parse(
        ["--no-warmup", "--default-guidance", "3.5", "--revision", "none"],
        {"IMAGEFLEET_COMPILE": "blocks", "IMAGEFLEET_FUSE_PROJECTIONS": "no"},
    )
    assert (
        s.warmup is False
        and s.compile == "blocks"
        and s.fuse_projections is False
        and s.default_guidance == 3.5
        and s.revision is None
    )
    r = settings.load(RouterSettings, {}, {"IMAGEFLEET_BACKENDS": "http://a:1, http://b:2"})
    assert r.backends == ("http://a:1", "http://b:2")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"IMAGEFLEET_MAX_BATCH_SIZE": "many"}, "IMAGEFLEET_MAX_BATCH_SIZE"),
        ({"IMAGEFLEET_MAX_BATCH_SIZE": "0"}, "--max-batch-size"),
        ({"IMAGEFLEET_WARMUP": "perhaps"}, "true or false"),
        ({"IMAGEFLEET_DTYPE": "int8"}, "choose one of"),
        ({"IMAGEFLEET_BATCH_MODE": "token"}, "choose one of"),
        ({"IMAGEFLEET_MAX_QUEUED_IMAGES": "2"}, "max-images-per-request"),
    ],
)
def test_bad_values_name_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        settings.load(PodSettings, {}, env)


def test_secrets_are_masked_in_descriptions() -> None:
    r = settings.load(RouterSettings, {}, {"IMAGEFLEET_API_KEYS": "sk-1,sk-2"})
    assert r.api_keys == ("sk-1", "sk-2")
    assert settings.describe(r)["api_keys"] == "***"


def test_arguments_reproduce_the_settings_exactly() -> None:
    pod = settings.load(
        PodSettings,
        {},
        env={},
        model="synthetic:sd3.5-medium",
        max_batch_size=8,
        warmup=False,
        default_steps=20,
        default_size="512x768",
        revision=None,
        fault_injection=True,
    )
    args = settings.to_arguments(pod, exclude=("host", "port"))
    parsed = cli.build_parser().parse_args(["pod", *args])
    # the environment must not leak in: every setting the parent resolved is an explicit flag
    again = settings.load(
        PodSettings, parsed, env={"IMAGEFLEET_MAX_BATCH_SIZE": "1", "IMAGEFLEET_WARMUP": "true"}
    )
    assert dataclasses.replace(again, host=pod.host, port=pod.port) == pod
    assert "--no-warmup" in args and "--fault-injection" in args and "--host" not in args


def test_secrets_are_never_rendered_as_arguments() -> None:
    router = settings.load(RouterSettings, {}, env={}, api_keys=("sk-secret",))
    args = settings.to_arguments(router)
    assert "sk-secret" not in " ".join(args) and "--api-keys" not in args
    assert (
        settings.load(RouterSettings, cli.build_parser().parse_args(["router", *args]), env={}).api_keys == ()
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"shutdown_timeout_s": 30.0}, "--shutdown-timeout-s (30.0) must be below --drain-timeout-s"),
        ({"drain_timeout_s": 36.0}, "--stop-timeout-s (40.0) must exceed"),
        ({"stop_timeout_s": 30.0}, "--stop-timeout-s (30.0) must exceed"),
    ],
)
def test_pod_stop_budgets_must_nest(overrides: dict[str, float], message: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(message)):
        settings.load(PodSettings, {}, env={}, **overrides)


def test_router_shutdown_must_end_before_it_is_killed() -> None:
    with pytest.raises(SettingsError, match="must be below --stop-timeout-s"):
        settings.load(RouterSettings, {}, env={}, shutdown_timeout_s=30.0, stop_timeout_s=30.0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_batch_size": 65}, "--max-batch-size / IMAGEFLEET_MAX_BATCH_SIZE must be between 1 and 64"),
        ({"max_wait_ms": -1}, "between 0 and 60000"),
        ({"default_steps": 200}, "--default-steps (200) must not exceed --max-steps (150)"),
        ({"default_size": "1024"}, "expected WIDTHxHEIGHT"),
        ({"default_size": "8192x8192"}, "exceeds --max-pixels"),
        ({"max_batch_size": 16, "max_queued_images": 10}, "must not exceed --max-queued-images"),
        (
            {"max_request_gpu_seconds": 600.0, "max_queued_gpu_seconds": 500.0},
            "--max-request-gpu-seconds (600.0) must not exceed --max-queued-gpu-seconds (500.0)",
        ),
        ({"max_queued_gpu_seconds": 0.5}, "--max-queued-gpu-seconds"),
    ],
)
def test_bounds_and_relations_are_checked(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(message)):
        settings.load(PodSettings, {}, env={}, **overrides)
