"""Signed image URLs: what a signature covers, and when it stops working."""

from __future__ import annotations

import json
import urllib.parse

import pytest

from imagefleet.errors import Forbidden
from imagefleet.router.signing import UrlSigner
from imagefleet.settings import RouterSettings, SettingsError, load

KEY = b"k" * 32
FILE = "abcdef0123456789~tok_en-1.png"
URL = f"https://img.example.com/gen/v1/images/files/{FILE}"


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def params(url: str) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))


def test_a_signed_url_verifies_until_it_expires() -> None:
    clock = Clock(1_000_000.0)
    signer = UrlSigner(KEY, ttl_s=60, clock=clock)
    p = params(signer.sign_url(URL))
    assert p["expires"] == "1000060"
    signer.verify(FILE, p["expires"], p["signature"])
    clock.now += 61
    with pytest.raises(Forbidden, match="expired"):
        signer.verify(FILE, p["expires"], p["signature"])


@pytest.mark.parametrize("tamper", ["file", "expires", "signature", "key"])
def test_a_tampered_signature_is_refused(tamper: str) -> None:
    signer = UrlSigner(KEY, ttl_s=60, clock=Clock(1_000_000.0))
    p = params(signer.sign_url(URL))
    file_id, expires, signature = FILE, p["expires"], p["signature"]
    if tamper == "file":
        file_id = FILE.replace("tok", "tak")
    elif tamper == "expires":
        expires = str(int(expires) + 3600)
    elif tamper == "signature":
        signature = signature[:-2] + ("AA" if not signature.endswith("AA") else "BB")
    else:
        signer = UrlSigner(b"x" * 32, ttl_s=60, clock=Clock(1_000_000.0))
    with pytest.raises(Forbidden) as caught:
        signer.verify(file_id, expires, signature)
    assert caught.value.status == 403


@pytest.mark.parametrize(
    ("expires", "signature"), [(None, "x"), ("12", None), ("-5", "x"), ("1e9", "x"), ("9" * 40, "x")]
)
def test_a_malformed_signature_is_refused(expires: str | None, signature: str | None) -> None:
    with pytest.raises(Forbidden):
        UrlSigner(KEY, ttl_s=60).verify(FILE, expires, signature)


def test_every_url_of_an_images_answer_is_signed_and_nothing_else_changes() -> None:
    signer = UrlSigner(KEY, ttl_s=60)
    body = {"created": 1, "data": [{"url": URL, "revised_prompt": None}, {"url": URL.replace("tok", "two")}]}
    signed = json.loads(signer.sign_images_body(json.dumps(body).encode()))
    assert signed["created"] == 1
    for before, after in zip(body["data"], signed["data"], strict=True):
        assert after["url"].startswith(str(before["url"]) + "?expires=")
    b64 = json.dumps({"data": [{"b64_json": "AAAA"}]}).encode()
    assert signer.sign_images_body(b64) == b64
    assert signer.sign_images_body(b"not json") == b"not json"
    assert signer.sign_url("https://elsewhere.example.com/x") == "https://elsewhere.example.com/x"


def test_the_key_comes_from_the_settings_or_a_file(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "key"
    path.write_text("from-a-mounted-secret-0123456789\n")
    a = UrlSigner.from_settings(load(RouterSettings, {}, env={}, url_signing_key_file=str(path)))
    b = UrlSigner(b"from-a-mounted-secret-0123456789", ttl_s=3600)
    p = params(a.sign_url(URL))
    b.verify(FILE, p["expires"], p["signature"])  # two replicas with one key agree
    path.write_text("short")
    with pytest.raises(SettingsError):
        UrlSigner.from_settings(load(RouterSettings, {}, env={}, url_signing_key_file=str(path)))


def test_without_a_key_each_process_makes_its_own() -> None:
    settings = load(RouterSettings, {}, env={})
    a, b = UrlSigner.from_settings(settings), UrlSigner.from_settings(settings)
    p = params(a.sign_url(URL))
    a.verify(FILE, p["expires"], p["signature"])
    with pytest.raises(Forbidden):
        b.verify(FILE, p["expires"], p["signature"])


def test_replicas_reading_one_api_key_secret_sign_alike_and_a_key_rotation_expires_links(
    tmp_path: object,
) -> None:
    from pathlib import Path

    keys = Path(str(tmp_path)) / "api-keys"
    keys.write_text("sk-one\nsk-two\n")
    settings = load(RouterSettings, {}, env={}, api_keys_file=str(keys))
    a, b = UrlSigner.from_settings(settings), UrlSigner.from_settings(settings)
    p = params(a.sign_url(URL))
    b.verify(FILE, p["expires"], p["signature"])  # another replica honours the link
    keys.write_text("sk-three\n")
    with pytest.raises(Forbidden):
        UrlSigner.from_settings(settings).verify(FILE, p["expires"], p["signature"])
