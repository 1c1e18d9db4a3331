"""lookalike-client: the thin SDK of lookalike's similar-product image search (tritonclient underneath)."""

from . import contract
from .client import LookalikeClient, Match, read_image_bytes
from .errors import (
    InvalidRequestError,
    LookalikeError,
    NotFoundError,
    PermissionDeniedError,
    RequestTimeoutError,
    ServerError,
    ServerUnavailableError,
)
from .waiting import wait_for

__all__ = [
    "LookalikeClient",
    "Match",
    "read_image_bytes",
    "contract",
    "LookalikeError",
    "NotFoundError",
    "InvalidRequestError",
    "PermissionDeniedError",
    "RequestTimeoutError",
    "ServerError",
    "ServerUnavailableError",
    "wait_for",
]
__version__ = "0.1.0"
