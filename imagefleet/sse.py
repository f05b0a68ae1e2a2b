"""Server-sent events as the streamed Images API uses them: writing (the pod) and reading (the
``imagefleet generate`` command, tests).

An event is ``event: <name>`` and ``data: <JSON>`` lines ending in a blank line, as OpenAI sends
them. imagefleet adds one thing, in a form every SSE client skips (comment lines, which the
``openai`` client and browsers' ``EventSource`` ignore): progress comments. While the request
waits in the pod's queue, ``: imagefleet.progress {"queued_ahead": 3}`` (the queued samples that
will start before it, as the pod's scheduler plans now); after each denoising step,
``: imagefleet.progress {"steps_done": 5, "steps_total": 20}``; and right before an ``error``
event, ``: imagefleet.error {"status": 503}``, the HTTP status the error has in a plain answer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

PROGRESS = "imagefleet.progress"
ERROR = "imagefleet.error"
CONTENT_TYPE = "text/event-stream"
EVENT_PREFIX = {"generate": "image_generation", "edit": "image_edit"}
"""The names of a task's events: ``<prefix>.partial_image`` (previews), then ``<prefix>.completed``."""
EVENT_KINDS = ("partial_image", "completed")
ERROR_EVENT = "error"


def event_names(task: str) -> list[str]:
    """Every event a stream of ``task`` may carry (besides ``PROGRESS`` comments)."""
    return [*(f"{EVENT_PREFIX[task]}.{kind}" for kind in EVENT_KINDS), ERROR_EVENT]


def event(name: str, fields: dict[str, Any], b64: bytes | None = None) -> bytes:
    """One event whose data is ``{"type": name, **fields}``; ``b64`` (ASCII base64) is spliced in
    as ``b64_json`` without passing megabytes through the JSON encoder."""
    data = json.dumps({"type": name, **fields}, separators=(",", ":")).encode()
    if b64 is not None:
        data = data[:-1] + b',"b64_json":"' + b64 + b'"}'
    return b"event: " + name.encode() + b"\ndata: " + data + b"\n\n"


def error(envelope: dict[str, Any], status: int | None = None) -> bytes:
    """An ``error`` event carrying OpenAI's error envelope (the ``openai`` client raises it),
    after an ``imagefleet.error`` comment with the HTTP ``status`` the error has in a plain answer
    (a router retries a stream that fails with 503 before its first event elsewhere)."""
    data = b"event: error\ndata: " + json.dumps(envelope, separators=(",", ":")).encode() + b"\n\n"
    if status is None:
        return data
    return f": {ERROR} {json.dumps({'status': status})}\n".encode() + data


def progress(steps_done: int, steps_total: int) -> bytes:
    body = json.dumps({"steps_done": steps_done, "steps_total": steps_total}, separators=(",", ":"))
    return f": {PROGRESS} {body}\n\n".encode()


def queued(ahead: int) -> bytes:
    """The queue-position comment: ``ahead`` queued samples will start before this one."""
    return f": {PROGRESS} {json.dumps({'queued_ahead': ahead})}\n\n".encode()


@dataclass
class Event:
    """One dispatched event, or one comment line (``comment`` set, no ``name``)."""

    name: str | None = None
    data: str = ""
    comment: str | None = None
    _lines: list[str] = field(default_factory=list, repr=False)

    def json(self) -> Any:
        return json.loads(self.data)

    def progress(self) -> tuple[int, int] | None:
        """(steps done, steps total) of an ``imagefleet.progress`` step comment; else None."""
        body = self._progress_body()
        try:
            return int(body["steps_done"]), int(body["steps_total"])
        except (KeyError, TypeError, ValueError):
            return None

    def queued_ahead(self) -> int | None:
        """The samples ahead of this request, from an ``imagefleet.progress`` queue comment; else None."""
        try:
            return int(self._progress_body()["queued_ahead"])
        except (KeyError, TypeError, ValueError):
            return None

    def error_status(self) -> int | None:
        """The HTTP status of the error that follows, from an ``imagefleet.error`` comment; else None."""
        try:
            return int(self._body(ERROR)["status"])
        except (KeyError, TypeError, ValueError):
            return None

    def _progress_body(self) -> Any:
        return self._body(PROGRESS)

    def _body(self, kind: str) -> Any:
        if self.comment is None or not self.comment.startswith(kind + " "):
            return None
        try:
            return json.loads(self.comment[len(kind) + 1 :])
        except ValueError:
            return None


class Parser:
    """Incremental SSE parsing: feed decoded lines (without their line ending), get events."""

    def __init__(self) -> None:
        self._name: str | None = None
        self._data: list[str] = []

    def feed(self, line: str) -> Iterator[Event]:
        if not line:
            if self._data or self._name is not None:
                yield Event(name=self._name or "message", data="\n".join(self._data))
            self._name, self._data = None, []
            return
        if line.startswith(":"):
            yield Event(comment=line[1:].lstrip(" "))
            return
        key, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if key == "event":
            self._name = value
        elif key == "data":
            self._data.append(value)
