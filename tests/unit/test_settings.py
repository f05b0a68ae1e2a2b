"""Settings: one typed object, flags over environment over defaults, clear errors."""

from __future__ import annotations

import argparse

import pytest

from imagefleet import settings
from imagefleet.settings import PodSettings, RouterSettings, SettingsError


def parse(argv: list[str], env: dict[str, str]) -> PodSettings:
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser, PodSettings)
    return settings.load(PodSettings, parser.parse_args(argv), env)


def test_defaults() -> None:
    s = parse([], {})
    assert s == PodSettings()
    assert s.model == "tiny" and s.max_batch_size == 4


def test_flag_beats_environment_beats_default() -> None:
    env = {"IMAGEFLEET_MAX_BATCH_SIZE": "8", "IMAGEFLEET_MAX_WAIT_MS": "20"}
    s = parse(["--max-batch-size", "2"], env)
    assert (s.max_batch_size, s.max_wait_ms) == (2, 20)


def test_types_are_parsed() -> None:
    s = parse(
        ["--no-warmup", "--default-guidance", "3.5", "--revision", "none"], {"IMAGEFLEET_COMPILE": "yes"}
    )
    assert s.warmup is False and s.compile is True and s.default_guidance == 3.5 and s.revision is None
    r = settings.load(RouterSettings, {}, {"IMAGEFLEET_BACKENDS": "http://a:1, http://b:2"})
    assert r.backends == ("http://a:1", "http://b:2")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"IMAGEFLEET_MAX_BATCH_SIZE": "many"}, "IMAGEFLEET_MAX_BATCH_SIZE"),
        ({"IMAGEFLEET_MAX_BATCH_SIZE": "0"}, "--max-batch-size"),
        ({"IMAGEFLEET_WARMUP": "perhaps"}, "true or false"),
        ({"IMAGEFLEET_DTYPE": "int8"}, "choose one of"),
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
