"""Bearer API keys: from the settings, the environment, or a file such as a mounted Secret.

Keys from ``api_keys`` (flag or ``IMAGEFLEET_API_KEYS``) and from ``api_keys_file`` (one key per
line; blank lines and ``#`` comments ignored) are all accepted. The file is re-read when its
modification time, size or inode changes (checked at most once a second), so a rotated Secret
takes effect without a restart; Kubernetes swaps the ``..data`` symlink of a Secret volume, which
``stat`` follows.

Every presented key is compared with every accepted key using :func:`hmac.compare_digest`, with
no early exit, so the time taken says nothing about which key nearly matched. Keys are never
logged. When a key file is configured the router never falls back to being open: an empty or
unreadable file means no key is accepted.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from imagefleet import wire
from imagefleet.errors import Unauthorized

log = logging.getLogger(__name__)

RECHECK_S = 1.0
OPEN_PATHS = frozenset((wire.HEALTH_PATH, wire.READY_PATH))
OBSERVABILITY_PATHS = frozenset((wire.METRICS_PATH, wire.STATS_PATH))


def parse_keys(text: str) -> tuple[str, ...]:
    keys = (line.strip() for line in text.splitlines())
    return tuple(k for k in keys if k and not k.startswith("#"))


def key_matches(presented: str, accepted: Iterable[str]) -> bool:
    # A header's bytes that are not UTF-8 arrive as surrogate escapes: compare those very bytes
    # (they match no key) rather than fail to encode them.
    given = presented.encode("utf-8", "surrogateescape")
    found = False
    for key in accepted:
        found |= hmac.compare_digest(given, key.encode())
    return found


def bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def needs_key(path: str, protect_metrics: bool) -> bool:
    if path in OPEN_PATHS:
        return False
    return protect_metrics or path not in OBSERVABILITY_PATHS


class KeyStore:
    """The accepted keys, with the file re-read on change."""

    def __init__(
        self, keys: Iterable[str] = (), path: str | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._static = tuple(k.strip() for k in keys if k.strip())
        self._path = Path(path) if path else None
        self._clock = clock
        self._from_file: tuple[str, ...] = ()
        self._stamp: tuple[float, int, int] | None = None
        self._checked = float("-inf")
        self._missing = False
        self._reload()

    @property
    def enabled(self) -> bool:
        return bool(self._static) or self._path is not None

    def accepted(self) -> tuple[str, ...]:
        now = self._clock()
        if self._path is not None and now - self._checked >= RECHECK_S:
            self._checked = now
            self._reload()
        return self._static + self._from_file

    def check(self, authorization: str | None) -> None:
        """Raise :class:`Unauthorized` unless the header carries an accepted key."""
        if not self.enabled:
            return
        token = bearer(authorization)
        if token is None:
            raise Unauthorized(
                "Missing API key: send it as 'Authorization: Bearer <key>'.",
                code="missing_api_key",
            )
        if not key_matches(token, self.accepted()):
            raise Unauthorized("Incorrect API key provided.", code="invalid_api_key")

    def _reload(self) -> None:
        if self._path is None:
            return
        try:
            st = os.stat(self._path)
        except OSError as exc:
            if not self._missing:
                log.error(
                    "API key file %s is unreadable (%s); no key from it is accepted", self._path, exc.strerror
                )
            self._from_file, self._stamp, self._missing = (), None, True
            return
        self._missing = False
        stamp = (st.st_mtime, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        try:
            self._from_file = parse_keys(self._path.read_text())
        except (OSError, UnicodeDecodeError) as exc:
            log.error("API key file %s is unreadable (%s); no key from it is accepted", self._path, exc)
            self._from_file = ()
        self._stamp = stamp
        log.info("Loaded %d API key(s) from %s", len(self._from_file), self._path)
