"""Typed errors of the lookalike client.

Every failure a caller can act on has its own class; all derive from `LookalikeError`, and each keeps
the underlying tritonclient exception as `__cause__`.
"""

from __future__ import annotations

import re
from typing import Any

from .contract import INVALID_IMAGE, UNKNOWN_PRODUCT

# Triton prefixes the error of an ensemble's step with the ensemble's name.
_ENSEMBLE_PREFIX = re.compile(r"^in ensemble '[^']*', ")
# The server's image errors (contract.INVALID_IMAGE): "invalid image (REASON): [image I of N: ]TEXT".
_IMAGE_ERROR = re.compile(re.escape(INVALID_IMAGE) + r" \((\w+)\): (?:image (\d+) of (\d+): )?")
# Triton's answer for a model that is not loaded (yet, or any more: unloaded, reloading, failed).
_MODEL_NOT_READY = ("Request for unknown model", "is not ready", "has no available versions")


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


class InvalidImageError(InvalidRequestError):
    """The server could not use an image: `reason` is one of contract.IMAGE_ERROR_REASONS ("empty",
    "not_an_image", "truncated", "too_large", "unsupported"). In `search_many`'s results it may also be
    the client's own refusal before sending: "too_large" for a path or file over the client's
    `max_image_bytes`, "unreadable" for an input it could not read (a missing file, a FIFO, a device or
    a directory, which it never reads). `image_index` is the bad image's place in a request of several
    (None in a request of one)."""

    def __init__(self, message: str = "", *, status: str | None = None, reason: str = "",
                 image_index: int | None = None) -> None:
        super().__init__(message, status=status)
        found = _IMAGE_ERROR.match(self.detail)
        self.reason = reason or (found.group(1) if found else "")
        self.image_index = image_index if image_index is not None else (
            int(found.group(2)) if found and found.group(2) is not None else None)

    def for_item(self) -> "InvalidImageError":
        """The same error as one image's own, without the "image I of N: " of the request it was in."""
        found = _IMAGE_ERROR.match(self.detail)
        text = self.detail if found is None or found.group(2) is None else (
            f"{INVALID_IMAGE} ({found.group(1)}): {self.detail[found.end():]}")
        err = InvalidImageError(text, status=self.status, reason=self.reason)
        err.__cause__ = self.__cause__
        return err


class NotFoundError(InvalidRequestError):
    """similar_products was asked for a product id that the served index does not hold."""


class ServerUnavailableError(LookalikeError):
    """The server could not be reached (connection refused or reset), is not ready, or refused for
    lack of capacity. Retryable: the client retries it within the call's deadline."""


class ModelNotReadyError(ServerUnavailableError):
    """The server is up but the model is not loaded: starting, unloaded, being replaced, or failed to
    load (Triton's "Request for unknown model"). Retryable."""


class RequestTimeoutError(LookalikeError):
    """The request did not complete within the client's timeout."""


class PermissionDeniedError(LookalikeError):
    """A restricted API (model control) was called without the right admin key."""


class ServerError(LookalikeError):
    """The server failed while handling a valid request (HTTP 5xx / gRPC INTERNAL and the rest)."""


_GRPC_STATUS = {
    "StatusCode.INVALID_ARGUMENT": InvalidRequestError,
    "StatusCode.UNAVAILABLE": ServerUnavailableError,
    "StatusCode.RESOURCE_EXHAUSTED": ServerUnavailableError,
    "StatusCode.DEADLINE_EXCEEDED": RequestTimeoutError,
    "StatusCode.CANCELLED": RequestTimeoutError,
    "StatusCode.PERMISSION_DENIED": PermissionDeniedError,
    "StatusCode.UNAUTHENTICATED": PermissionDeniedError,
    "StatusCode.NOT_FOUND": ServerUnavailableError,
}
_HTTP_STATUS = {
    "400": InvalidRequestError,
    "403": PermissionDeniedError,
    "401": PermissionDeniedError,
    "404": ServerUnavailableError,
    "429": ServerUnavailableError,
    "502": ServerUnavailableError,
    "503": ServerUnavailableError,
    "504": RequestTimeoutError,
}


def error_class_for_status(status: str | None) -> type[LookalikeError]:
    """Maps a tritonclient status string ("StatusCode.X" for gRPC, "400" for HTTP) to an error class."""
    if status is None:
        return ServerUnavailableError
    return _GRPC_STATUS.get(status) or _HTTP_STATUS.get(status) or ServerError


def retryable(err: LookalikeError) -> bool:
    """Whether trying the same call again may succeed: the server unreachable or reset, a model
    reloading. Never a refused input, a denied key, a server error or a timeout (the deadline is spent)."""
    return isinstance(err, ServerUnavailableError)


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
    detail = _ENSEMBLE_PREFIX.sub("", str(message))
    if cls is InvalidRequestError and detail.startswith(UNKNOWN_PRODUCT):
        cls = NotFoundError
    elif cls is InvalidRequestError and _IMAGE_ERROR.match(detail):
        cls = InvalidImageError
    elif any(text in detail for text in _MODEL_NOT_READY) and cls in (ServerUnavailableError, InvalidRequestError):
        cls = ModelNotReadyError
    if "is restricted, expecting header" in str(message):
        cls = PermissionDeniedError  # Triton answers a restricted gRPC protocol with UNAVAILABLE
    err = cls(str(message) if message else type(exc).__name__, status=None if status is None else str(status))
    err.__cause__ = exc
    return err
