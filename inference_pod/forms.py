"""Reading the multipart body of ``POST /v1/images/edits``: text fields and file parts.

Streamed part by part within the body size limit, the inactivity timeout and the server's shared
body budget (:func:`imagefleet.httpkit.arriving`, :func:`~imagefleet.httpkit.hold`); only the
fields the request table declares for edits (:data:`imagefleet.schema.EDIT_FIELDS`,
:data:`~imagefleet.schema.EDIT_FILE_FIELDS`) are accepted, and a malformed body is a 400, never
a 500.
"""

from __future__ import annotations

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from imagefleet import httpkit
from imagefleet.errors import InvalidRequest, PayloadTooLarge, RequestTimeout, Unavailable
from imagefleet.schema import EDIT_FIELDS, EDIT_FILE_FIELDS

CHUNK = 256 * 1024


async def read_form(request: web.Request) -> tuple[dict[str, str], dict[str, list[bytes]]]:
    """The text fields and the files (by field name) of a multipart body."""
    fields: dict[str, str] = {}
    files: dict[str, list[bytes]] = {}
    total = 0
    httpkit.hold(request, request.content_length or 0)
    try:
        reader = await request.multipart()
        while True:
            async with httpkit.arriving(request):
                part = await reader.next()
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise InvalidRequest("Nested multipart bodies are not supported.")
            name = part.name or ""
            if name not in EDIT_FIELDS and name not in EDIT_FILE_FIELDS:
                raise InvalidRequest(
                    f"Unknown parameter: '{name[:64]}'.", param=name[:64], code="unknown_parameter"
                )
            data = bytearray()
            while True:
                async with httpkit.arriving(request):
                    chunk = await part.read_chunk(CHUNK)
                if not chunk:
                    break
                total += len(chunk)
                httpkit.hold(request, total)
                data.extend(chunk)
            if name in EDIT_FILE_FIELDS:
                files.setdefault(name, []).append(bytes(data))
                continue
            if name in fields:
                raise InvalidRequest(f"{name} is given twice.", param=name)
            try:
                fields[name] = data.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidRequest(f"{name} is not valid UTF-8 text.", param=name) from None
    except (InvalidRequest, PayloadTooLarge, RequestTimeout, Unavailable):
        raise
    except (ValueError, AssertionError, RuntimeError, HttpProcessingError) as exc:
        raise InvalidRequest(f"The multipart body is malformed: {str(exc)[:200]}") from None
    return fields, files
