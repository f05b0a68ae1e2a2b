"""Images kept for ``response_format=url``: in memory, for a TTL, within a byte budget.

File ids follow :func:`imagefleet.wire.compose_file_id`: a random token, optionally preceded by
the prefix the router passes in ``X-Imagefleet-File-Prefix``, so that the router can tell from an
id which pod holds it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from imagefleet import wire
from imagefleet.inference_pod.encoding import Encoded


@dataclass(frozen=True)
class StoredFile:
    image: Encoded
    expires_at: float


class FileStore:
    def __init__(self, ttl_s: float, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._clock = clock
        self._files: OrderedDict[str, StoredFile] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._files)

    def put(self, image: Encoded, prefix: str = "") -> str:
        self._expire()
        file_id = wire.compose_file_id(prefix if wire.valid_file_prefix(prefix) else "", image.format)
        while self._files and self._bytes + len(image.data) > self.max_bytes:
            self._drop(next(iter(self._files)))
        self._files[file_id] = StoredFile(image, self._clock() + self.ttl_s)
        self._bytes += len(image.data)
        return file_id

    def get(self, file_id: str) -> Encoded | None:
        if wire.parse_file_id(file_id) is None:
            return None
        self._expire()
        stored = self._files.get(file_id)
        return stored.image if stored else None

    def _expire(self) -> None:
        now = self._clock()
        while self._files:
            first_id, first = next(iter(self._files.items()))
            if first.expires_at > now:
                break
            self._drop(first_id)

    def _drop(self, file_id: str) -> None:
        stored = self._files.pop(file_id)
        self._bytes -= len(stored.image.data)
