"""Server-sent events as the streamed Images API uses them: writing (the pod) and reading (the
``imagefleet generate`` command, tests).

An event is ``event: <name>`` and ``data: <JSON>`` lines ending in a blank line, as OpenAI sends
them. imagefleet adds one thing, in a form every SSE client skips (comment lines, which the
``openai`` client and browsers' ``EventSource`` ignore): after each denoising step of the
streamed image, ``: imagefleet.progress {"steps_done": 5, "steps_total": 20}``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

PROGRESS = "imagefleet.progress"
CONTENT_TYPE = "text/event-stream"
EVENT_PREFIX = {"generate": "image_generation", "edit": "image_edit"}
"""The names of a task's events: ``<prefix>.partial_image`` (previews), then ``<prefix>.completed``."""
EVENT_KINDS = ("partial_image", "completed")
ERROR = "error"


def event_names(task: str) -> list[str]:
    """Every event a stream of ``task`` may carry (besides ``PROGRESS`` comments)."""
    return [*(f"{EVENT_PREFIX[task]}.{kind}" for kind in EVENT_KINDS), ERROR]


def event(name: str, fields: dict[str, Any], b64: bytes | None = None) -> bytes:
    """One event whose data is ``{"type": name, **fields}``; ``b64`` (ASCII base64) is spliced in
    as ``b64_json`` without passing megabytes through the JSON encoder."""
    data = json.dumps({"type": name, **fields}, separators=(",", ":")).encode()
    if b64 is not None:
        data = data[:-1] + b',"b64_json":"' + b64 + b'"}'
    return b"event: " + name.encode() + b"\ndata: " + data + b"\n\n"


def error(envelope: dict[str, Any]) -> bytes:
    """An ``error`` event carrying OpenAI's error envelope (the ``openai`` client raises it)."""
    return (
        b"event: "
        + ERROR.encode()
        + b"\ndata: "
        + json.dumps(envelope, separators=(",", ":")).encode()
        + b"\n\n"
    )


def progress(steps_done: int, steps_total: int) -> bytes:
    body = json.dumps({"steps_done": steps_done, "steps_total": steps_total}, separators=(",", ":"))
    return f": {PROGRESS} {body}\n\n".encode()


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
        """(steps done, steps total) of an ``imagefleet.progress`` comment; else None."""
        if self.comment is None or not self.comment.startswith(PROGRESS + " "):
            return None
        try:
            body = json.loads(self.comment[len(PROGRESS) + 1 :])
            return int(body["steps_done"]), int(body["steps_total"])
        except (ValueError, KeyError, TypeError):
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
