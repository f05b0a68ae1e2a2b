"""Reading the text fields of a multipart body that the router keeps as raw bytes.

An edit's body is read once and kept as it arrived, so that a retry can send exactly the same
bytes to another pod; the router never re-encodes it. To price the edit it needs the small text
fields (``n``, ``size``, ``num_inference_steps``, ``strength``), which aiohttp's own multipart
parser reads from the kept bytes. Skipping file parts costs a scan of their bytes, so at most
``SCAN_LIMIT`` bytes of files are skipped: clients (the openai client, httpx, requests, curl as
usually written) put text fields before files, and a field found past the limit is simply priced
at the pod's default.
"""

from __future__ import annotations

import asyncio

from aiohttp import BodyPartReader, MultipartReader, StreamReader
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import HttpProcessingError

SCAN_LIMIT = 2 * 1024 * 1024
MAX_FIELD_CHARS = 4096
_CHUNK = 256 * 1024


async def text_fields(body: bytes, content_type: str) -> dict[str, str]:
    """The text fields of a ``multipart/form-data`` body; {} if it cannot be parsed (the pod
    then answers the malformed body with a 400; aiohttp raises a malformed part header as an
    ``HttpProcessingError``, its other complaints as ValueError or AssertionError)."""
    loop = asyncio.get_running_loop()
    # A limit above the body size: the whole body is fed at once, and nothing is paused.
    stream = StreamReader(BaseProtocol(loop), max(len(body), 2**16) + 1, loop=loop)
    stream.feed_data(body)
    stream.feed_eof()
    fields: dict[str, str] = {}
    skipped = 0
    try:
        reader = MultipartReader({"Content-Type": content_type}, stream)
        while skipped <= SCAN_LIMIT:
            part = await reader.next()
            if part is None or not isinstance(part, BodyPartReader):
                break
            if part.filename is not None:
                while chunk := await part.read_chunk(_CHUNK):
                    skipped += len(chunk)
                    if skipped > SCAN_LIMIT:
                        break
                continue
            text = await part.read_chunk(MAX_FIELD_CHARS)
            if part.name and part.name not in fields:
                fields[part.name] = text.decode("utf-8", "replace")
    except (ValueError, AssertionError, RuntimeError, KeyError, HttpProcessingError):
        pass
    return fields
