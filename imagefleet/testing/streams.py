"""A blocking reader of a streamed (``stream: true``) Images API answer, event by event.

Unlike the ``openai`` client it also shows the comment lines (imagefleet's progress) and can hang
up in the middle of a stream, which the server must take as a cancellation.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import urllib.parse
from collections.abc import Iterator
from typing import Any

from imagefleet.sse import Event, Parser


class EventStream:
    """``POST path`` with a JSON body (sent at once); iterate the events (and comments) as they
    arrive."""

    def __init__(
        self,
        base_url: str,
        body: dict[str, Any],
        *,
        path: str = "/v1/images/generations",
        headers: dict[str, str] | None = None,
        timeout: float = 120.0,
    ) -> None:
        parts = urllib.parse.urlsplit(base_url)
        assert parts.hostname is not None and parts.port is not None
        self._conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        self._conn.request(
            "POST",
            path,
            body=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        self._response: http.client.HTTPResponse | None = None

    @property
    def response(self) -> http.client.HTTPResponse:
        """The response, waited for on first use (a pod answers as soon as it has queued the request)."""
        if self._response is None:
            self._response = self._conn.getresponse()
        return self._response

    @property
    def status(self) -> int:
        return self.response.status

    @property
    def headers(self) -> dict[str, str]:
        return dict(self.response.headers)

    def __iter__(self) -> Iterator[Event]:
        parser = Parser()
        while True:
            raw = self.response.readline()
            if not raw:
                return
            yield from parser.feed(raw.decode().rstrip("\r\n"))

    def events(self) -> Iterator[Event]:
        """The dispatched events only (no comments)."""
        return (e for e in self if e.name is not None)

    def hang_up(self) -> None:
        sock = self._conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._conn.close()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self._conn.close()
