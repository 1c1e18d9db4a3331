"""lookalike-client: the thin SDK of lookalike's similar-product image search (tritonclient underneath).

`LookalikeClient` for threads, `AsyncLookalikeClient` for an event loop; the same calls, deadlines,
retries and typed errors (all `LookalikeError`).
"""

from . import contract
from .aio import AsyncLookalikeClient
from .calls import NO_RETRIES, Health, Match, RetryPolicy, SearchResult, ServerInfo
from .client import LookalikeClient
from .errors import (
    InvalidImageError,
    InvalidRequestError,
    LookalikeError,
    ModelNotReadyError,
    NotFoundError,
    PermissionDeniedError,
    RequestTimeoutError,
    ServerError,
    ServerUnavailableError,
)
from .files import FileRefusedError
from .images import ImageLike, read_image_bytes
from .waiting import wait_for

__all__ = [
    "LookalikeClient",
    "AsyncLookalikeClient",
    "Match",
    "SearchResult",
    "Health",
    "ServerInfo",
    "RetryPolicy",
    "NO_RETRIES",
    "ImageLike",
    "read_image_bytes",
    "FileRefusedError",
    "contract",
    "LookalikeError",
    "InvalidRequestError",
    "InvalidImageError",
    "NotFoundError",
    "PermissionDeniedError",
    "RequestTimeoutError",
    "ServerError",
    "ServerUnavailableError",
    "ModelNotReadyError",
    "wait_for",
]
__version__ = "0.2.0"
