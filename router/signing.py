"""Signed, expiring image URLs: a file link that works without the API key, for a while.

Images of ``response_format=url`` are fetched through the router, which otherwise asks for the
API key, so a link could not be opened in a browser or shared. The router signs every URL it
relays: ``<url>?expires=<unix seconds>&signature=<base64url HMAC-SHA256>``, the HMAC taken over
``<file id>\\n<expires>`` with the signing key. ``GET /v1/images/files/{id}`` with both query
parameters is served without a key when the signature matches and ``expires`` has not passed
(403 in OpenAI's envelope otherwise); without them the API key is needed as before.

The key is ``url_signing_key`` or the contents of ``url_signing_key_file`` (e.g. a mounted
Secret). With neither, it is derived from the API keys (:func:`derived_key`): router replicas
reading the same key Secret sign alike, so a link made by one opens on every other, and rotating
the API keys also expires every link. A router without API keys needs no signature at all.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imagefleet import wire
from imagefleet.errors import Forbidden
from imagefleet.settings import RouterSettings, SettingsError

log = logging.getLogger(__name__)

EXPIRES = "expires"
SIGNATURE = "signature"
MIN_KEY_BYTES = 16


class UrlSigner:
    def __init__(self, key: bytes, ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"a URL signing key has at least {MIN_KEY_BYTES} bytes")
        self._key = key
        self.ttl_s = ttl_s
        self._clock = clock

    @classmethod
    def from_settings(cls, settings: RouterSettings) -> UrlSigner:
        if settings.url_signing_key:
            key = settings.url_signing_key.encode()
        elif settings.url_signing_key_file:
            try:
                key = Path(settings.url_signing_key_file).read_bytes().strip()
            except OSError as exc:
                raise SettingsError(
                    f"--url-signing-key-file {settings.url_signing_key_file}: {exc.strerror}"
                ) from None
            if len(key) < MIN_KEY_BYTES:
                raise SettingsError(
                    f"--url-signing-key-file {settings.url_signing_key_file}: "
                    f"the key must have at least {MIN_KEY_BYTES} bytes"
                )
        elif settings.api_keys or settings.api_keys_file:
            key = derived_key(settings)
        else:  # no API keys: file links open without any, the signature is never needed
            key = secrets.token_bytes(32)
        return cls(key, settings.signed_url_ttl_s)

    def _mac(self, file_id: str, expires: int) -> str:
        digest = hmac.new(self._key, f"{file_id}\n{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def query(self, file_id: str) -> str:
        """The query string that signs ``file_id`` until ``ttl_s`` from now."""
        expires = int(self._clock() + self.ttl_s)
        return urllib.parse.urlencode({EXPIRES: expires, SIGNATURE: self._mac(file_id, expires)})

    def verify(self, file_id: str, expires: str | None, signature: str | None) -> None:
        """Raise :class:`Forbidden` unless the signature is ``file_id``'s and has not expired."""
        if (
            not expires
            or not signature
            or not expires.isascii()
            or not expires.isdigit()
            or len(expires) > 12
        ):
            raise Forbidden("The signed URL is malformed.", code="invalid_signature")
        expected = self._mac(file_id, int(expires))
        if not hmac.compare_digest(expected.encode(), signature.encode("utf-8", "surrogateescape")):
            raise Forbidden("The URL signature is not valid.", code="invalid_signature")
        if int(expires) < self._clock():
            raise Forbidden("The signed URL has expired.", code="url_expired")

    def sign_url(self, url: str) -> str:
        """``url`` (a file URL a pod returned) with its signature; other URLs unchanged."""
        parts = urllib.parse.urlsplit(url)
        _, sep, file_id = parts.path.rpartition(wire.FILES_PATH)
        if not sep or wire.parse_file_id(file_id) is None or parts.query:
            return url
        return urllib.parse.urlunsplit(parts._replace(query=self.query(file_id)))

    def sign_images_body(self, body: bytes) -> bytes:
        """An Images API answer with every ``data[].url`` signed; anything else unchanged."""
        try:
            answer: Any = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            return body
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, list):
            return body
        changed = False
        for item in data:
            if isinstance(item, dict) and isinstance(item.get("url"), str):
                item["url"] = self.sign_url(item["url"])
                changed = True
        return json.dumps(answer, separators=(",", ":")).encode() if changed else body


def derived_key(settings: RouterSettings) -> bytes:
    """A signing key derived from the API keys (the same Secret on every replica, so every replica
    derives the same key and honours the others' links; rotating the keys rotates it too)."""
    material = "\n".join(settings.api_keys).encode()
    if settings.api_keys_file:
        try:
            material += b"\n" + Path(settings.api_keys_file).read_bytes()
        except OSError as exc:
            raise SettingsError(f"--api-keys-file {settings.api_keys_file}: {exc.strerror}") from None
    return hmac.new(b"imagefleet signed image URLs v1", material, hashlib.sha256).digest()


def signed_request(query: Any) -> bool:
    """Whether a request's query carries a URL signature (then the signature decides, not a key)."""
    return EXPIRES in query or SIGNATURE in query
