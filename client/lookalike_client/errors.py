"""Typed errors of the lookalike client.

Every failure a caller can act on has its own class; all derive from `LookalikeError`, and each keeps
the underlying tritonclient exception as `__cause__`.
"""

from __future__ import annotations

import re
from typing import Any

from .contract import UNKNOWN_PRODUCT

# Triton prefixes the error of an ensemble's step with the ensemble's name.
_ENSEMBLE_PREFIX = re.compile(r"^in ensemble '[^']*', ")


class LookalikeError(Exception):
    """Base class of every error the client raises. `status` is the server's status code as
    tritonclient gives it ("StatusCode.INVALID_ARGUMENT" over gRPC, "400" over HTTP; None when no
    answer came), `detail` the server's reason without Triton's "in ensemble 'X', " prefix."""

    def __init__(self, message: str = "", *, status: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.detail = _ENSEMBLE_PREFIX.sub("", message)


class InvalidRequestError(LookalikeError):
    """The server refused this request's input (HTTP 400 / gRPC INVALID_ARGUMENT): a corrupt, empty,
    too large or unsupported image, or a TOP_K out of range. Retrying the same input will not help."""


class NotFoundError(InvalidRequestError):
    """similar_products was asked for a product id that the served index does not hold."""


class ServerUnavailableError(LookalikeError):
    """The server could not be reached, is not ready, or refused for lack of capacity. Retry later."""


class RequestTimeoutError(LookalikeError):
    """The request did not complete within the client's timeout."""


class PermissionDeniedError(LookalikeError):
    """A restricted API (model control) was called without the right admin key."""


class ServerError(LookalikeError):
    """The server failed while handling a valid request (HTTP 5xx / gRPC INTERNAL and the rest)."""


_GRPC_STATUS = {
    "StatusCode.INVALID_ARGUMENT": InvalidRequestError,
    "StatusCode.UNAVAILABLE": ServerUnavailableError,
    "StatusCode.DEADLINE_EXCEEDED": RequestTimeoutError,
    "StatusCode.PERMISSION_DENIED": PermissionDeniedError,
    "StatusCode.UNAUTHENTICATED": PermissionDeniedError,
    "StatusCode.NOT_FOUND": ServerUnavailableError,
}
_HTTP_STATUS = {
    "400": InvalidRequestError,
    "403": PermissionDeniedError,
    "404": ServerUnavailableError,
    "503": ServerUnavailableError,
    "504": RequestTimeoutError,
}


def error_class_for_status(status: str | None) -> type[LookalikeError]:
    """Maps a tritonclient status string ("StatusCode.X" for gRPC, "400" for HTTP) to an error class."""
    if status is None:
        return ServerUnavailableError
    return _GRPC_STATUS.get(status) or _HTTP_STATUS.get(status) or ServerError


def translate(exc: BaseException) -> LookalikeError:
    """Wraps a tritonclient / transport exception in the matching `LookalikeError`."""
    if isinstance(exc, LookalikeError):
        return exc
    raw: Any = exc  # tritonclient's InferenceServerException has status() and message()
    status = raw.status() if hasattr(raw, "status") else None
    message = raw.message() if hasattr(raw, "message") else str(exc)
    if status is None:
        text = str(message).lower()
        if "timed out" in text or "timeout" in text or "deadline" in text:
            cls: type[LookalikeError] = RequestTimeoutError
        else:
            cls = ServerUnavailableError
    else:
        cls = error_class_for_status(status)
    if cls is InvalidRequestError and _ENSEMBLE_PREFIX.sub("", str(message)).startswith(UNKNOWN_PRODUCT):
        cls = NotFoundError
    if "is restricted, expecting header" in str(message):
        cls = PermissionDeniedError  # Triton answers a restricted gRPC protocol with UNAVAILABLE
    err = cls(str(message) if message else type(exc).__name__, status=None if status is None else str(status))
    err.__cause__ = exc
    return err
