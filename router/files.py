"""Image file ids that say which pod holds the image.

For ``response_format=url`` the pod stores the image and builds the URL itself. The router asks
it to start the file id with ``<backend key>~`` (header ``X-Imagefleet-File-Prefix``); the key is
a hash of the backend's URL (:func:`.discovery.backend_key`), identical in every router replica.
``GET /v1/images/files/{id}`` then goes to the backend with that key, looked up among the backends
the router knows. An address is never taken from the id itself, so a forged id can reach nothing
but a known pod, which answers 404 for a file it does not hold.
"""

from __future__ import annotations

import re

SEPARATOR = "~"
_ISSUED = re.compile(r"^([A-Za-z0-9_-]{1,64})~[A-Za-z0-9_~-]{1,128}\.(png|jpeg|webp)$")


def prefix_for(key: str) -> str:
    return key + SEPARATOR


def key_of(file_id: str) -> str | None:
    """The backend key a file id starts with, or None if the id is not one the router issued."""
    match = _ISSUED.match(file_id)
    return match.group(1) if match else None
