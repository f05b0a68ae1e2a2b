"""Errors typed by what the caller should do next, and OpenAI's error envelope.

Every error a client can see is an :class:`APIError`. Its subclasses fix the HTTP status and
the envelope's ``type``; handlers raise them and one middleware turns them into responses::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "size", "code": null}}

Anything else that escapes a handler is a bug: the middleware answers 500 with a generic
message (never a stack trace) and logs the traceback.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar


class APIError(Exception):
    """Base class: an error with an HTTP status, shown to the client in OpenAI's envelope."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def envelope(self) -> dict[str, Any]:
        return error_envelope(self.message, self.type, param=self.param, code=self.code)


class InvalidRequest(APIError):
    """The request itself is wrong; retrying it unchanged will fail again."""

    status = 400
    type = "invalid_request_error"


class Unauthorized(APIError):
    status = 401
    type = "authentication_error"


class Forbidden(APIError):
    """The request names something it may not have (an expired or altered signed URL)."""

    status = 403
    type = "permission_error"


class NotFound(APIError):
    status = 404
    type = "invalid_request_error"


class MethodNotAllowed(APIError):
    status = 405
    type = "invalid_request_error"


class RequestTimeout(APIError):
    """The client took too long to send its request."""

    status = 408
    type = "invalid_request_error"


class PayloadTooLarge(APIError):
    status = 413
    type = "invalid_request_error"


class UnsupportedMediaType(APIError):
    status = 415
    type = "invalid_request_error"


class HeadersTooLarge(APIError):
    status = 431
    type = "invalid_request_error"


class Overloaded(APIError):
    """The queue is full: retry after ``retry_after`` seconds, here or elsewhere."""

    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: float, code: str | None = "queue_full") -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(max(1, round(retry_after)))})
        self.retry_after = retry_after


class ClientClosed(APIError):
    """The client went away; nobody will read the response (nginx's 499)."""

    status = 499
    type = "invalid_request_error"


class GenerationFailed(APIError):
    """The pipeline raised while producing this request's images."""

    status = 500
    type = "server_error"


class BadGateway(APIError):
    status = 502
    type = "server_error"


class Unavailable(APIError):
    """Not ready, draining or quarantined: send the request somewhere else."""

    status = 503
    type = "server_error"

    def __init__(self, message: str, *, retry_after: float | None = None, code: str | None = None) -> None:
        headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
        super().__init__(message, code=code, headers=headers)


class Timeout(APIError):
    status = 504
    type = "timeout_error"


def error_envelope(
    message: str, type_: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error body."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_body(error: APIError) -> bytes:
    return json.dumps(error.envelope()).encode()


# aiohttp answers some failures itself (unknown route, wrong method, oversize body) with an
# HTTPException; these map its status to ours so those answers wear the envelope too.
_BY_STATUS: dict[int, type[APIError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    405: MethodNotAllowed,
    408: RequestTimeout,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    431: HeadersTooLarge,
    503: Unavailable,
    504: Timeout,
}


def from_status(status: int, message: str) -> APIError:
    """An APIError for an HTTP status raised outside our handlers."""
    cls = _BY_STATUS.get(status)
    if cls is None:
        cls = InvalidRequest if 400 <= status < 500 else GenerationFailed
    return cls(message)
