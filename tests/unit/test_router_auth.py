"""API keys: several sources, constant-time comparison, a key file re-read when it changes."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from imagefleet.errors import Unauthorized
from imagefleet.router.auth import KeyStore, bearer, key_matches, needs_key, parse_keys


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_key_file_format() -> None:
    assert parse_keys("k1\n\n  k2  \n# a comment\nk3\r\n") == ("k1", "k2", "k3")


def test_bearer_header() -> None:
    assert bearer("Bearer abc") == "abc"
    assert bearer("bearer   abc ") == "abc"
    assert bearer("Basic abc") is None
    assert bearer("Bearer ") is None
    assert bearer(None) is None


def test_every_accepted_key_is_compared() -> None:
    assert key_matches("b", ["a", "b", "c"])
    assert not key_matches("b", ["a", "bb", "c"])
    assert not key_matches("", ["a"])
    assert key_matches("ключ", ["ключ"])


def test_no_keys_means_open() -> None:
    store = KeyStore()
    assert not store.enabled
    store.check(None)


def test_keys_from_settings() -> None:
    store = KeyStore(["k1", "k2"])
    store.check("Bearer k2")
    with pytest.raises(Unauthorized) as missing:
        store.check(None)
    assert missing.value.code == "missing_api_key" and missing.value.status == 401
    with pytest.raises(Unauthorized) as wrong:
        store.check("Bearer k3")
    assert wrong.value.code == "invalid_api_key"


def test_key_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("old\n")
    clock = Clock()
    store = KeyStore(["env-key"], str(path), clock=clock)
    store.check("Bearer old")
    store.check("Bearer env-key")
    path.write_text("new-key-longer\n")
    os.utime(path, (1, 1))
    clock.now += 0.5
    store.check("Bearer old")  # not re-checked within a second
    clock.now += 1.0
    store.check("Bearer new-key-longer")
    with pytest.raises(Unauthorized):
        store.check("Bearer old")


def test_an_empty_or_missing_key_file_accepts_nothing(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    store = KeyStore(path=str(path))
    assert store.enabled
    with pytest.raises(Unauthorized):
        store.check("Bearer anything")
    path.write_text("\n# nothing yet\n")
    store = KeyStore(path=str(path))
    with pytest.raises(Unauthorized):
        store.check("Bearer anything")


def test_keys_are_never_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "keys"
    path.write_text("sk-very-secret\n")
    with caplog.at_level(logging.DEBUG):
        store = KeyStore(["sk-env-secret"], str(path))
        with pytest.raises(Unauthorized):
            store.check("Bearer sk-guess-secret")
    assert "secret" not in caplog.text


def test_which_paths_need_a_key() -> None:
    assert not needs_key("/healthz", True) and not needs_key("/readyz", True)
    assert needs_key("/v1/images/generations", False)
    assert needs_key("/metrics", True) and needs_key("/stats", True)
    assert not needs_key("/metrics", False) and not needs_key("/stats", False)
