"""What the sync and the async client share, with no I/O: the requests of each call (model, input
arrays, outputs), the parsing of answers, the retry policy, and how `search_many` settles its requests.

A call is a `Call`: the transport (tritonclient's sync or asyncio client, gRPC or HTTP) only sends it.
`search_many`'s bookkeeping is a generator (`settle`) that says which images to send next and is told
how that went, so that one algorithm serves both clients.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Mapping, Sequence, TypeVar, Union, cast

import numpy as np
import numpy.typing as npt

from . import contract as c
from .errors import InvalidImageError, InvalidRequestError, LookalikeError, ServerError
from .files import FileRefusedError
from .images import ImageLike, read_image_bytes

T = TypeVar("T")

# The models `health()` reports, in the order a request passes them.
SERVED_MODELS = (c.VISUAL_SEARCH_MODEL, c.SIMILAR_PRODUCTS_MODEL, c.EMBED_IMAGE_MODEL, c.PREPROCESS_MODEL,
                 c.PREPROCESS_QUERY_MODEL, c.EMBEDDER_MODEL, c.SEARCH_MODEL)


@dataclass(frozen=True)
class Match:
    rank: int
    product_id: str
    score: float


@dataclass(frozen=True)
class SearchResult:
    """One image's outcome in `search_many`: its matches, or its own error (then `matches` is empty)."""

    matches: list[Match] = field(default_factory=lambda: cast("list[Match]", []))
    error: LookalikeError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def unwrap(self) -> list[Match]:
        """The matches, or the error raised."""
        if self.error is not None:
            raise self.error
        return self.matches


@dataclass(frozen=True)
class Health:
    """What the server says of itself: `live` (the process answers), `ready` (Triton's server
    readiness) and each model's readiness. Never raises: an unreachable server is not live."""

    live: bool
    ready: bool
    models: dict[str, bool]
    error: str | None = None  # why the server could not be asked, when it could not

    @property
    def ok(self) -> bool:
        """Live and every model ready: the server can answer every call of this SDK. Not `ready`:
        Triton's server readiness also counts models on their way out, so it dips for a second or two
        while the old index version unloads after each `reload_index`, while every call still works."""
        return self.live and all(self.models.values())


@dataclass(frozen=True)
class ServerInfo:
    """What the server serves, each field from the server itself: Triton's metadata, and the
    INDEX_INFO of the index version that answered `product_search`."""

    url: str
    protocol: str
    server_version: str  # tritonserver's
    index_version: int  # the product_search version that answered
    products: int  # products in that index
    index_kind: str  # "flat", "hnsw", "ivf-pq", ...
    embedder_model: str  # the backbone, e.g. "efficientnet_lite0"
    dim: int  # embedding width (the embedder's EMBEDDING output)
    embedder_fingerprint: str
    models: dict[str, bool]  # each served model's readiness
    index_id: str = ""  # the served index's own id, given when it was built ("" for older indexes)
    server_id: str = ""  # tritonserver's id (`lookalike serve` names it lookalike:<host>:<pid>)
    backend: str = "faiss"  # product_search's search backend (contract.SEARCH_BACKENDS)
    device: str = ""  # where the search runs: "cpu" or "gpu" (FAISS), "milvus" (the Milvus servers)


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of retryable failures only (`errors.retryable`: unreachable, reset, a model reloading;
    never a refused input), with exponential backoff and jitter, within the call's deadline.

    Attempt n (from 1) that fails waits min(max_backoff_s, initial_backoff_s * multiplier ** (n - 1)),
    scaled by a random factor in [1 - jitter, 1], before attempt n + 1; no attempt starts after the
    deadline, and no wait outlasts it. The defaults suit a web request: four retries within ~0.8 s,
    then the error (a restarting tritonserver takes far longer; failing fast lets the app degrade)."""

    max_attempts: int = 5
    initial_backoff_s: float = 0.05
    multiplier: float = 2.0
    max_backoff_s: float = 1.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter must be in 0..1, got {self.jitter}")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and multiplier >= 1")

    def backoff_s(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        return base * (1.0 - self.jitter * rng())


NO_RETRIES = RetryPolicy(max_attempts=1)


# -- requests ------------------------------------------------------------------------------------
Arrays = dict[str, "npt.NDArray[Any]"]


@dataclass(frozen=True)
class Call:
    """One request: the model, its input arrays by name, the outputs wanted, and what to make of them."""

    model: str
    inputs: Arrays
    outputs: tuple[str, ...]
    parse: Callable[[Mapping[str, "npt.NDArray[Any]"]], Any]


def check_top_k(top_k: object) -> int:
    """`top_k` as an int, if it is an integer (not a bool) in MIN_TOP_K..MAX_TOP_K; else InvalidRequestError."""
    value = int(cast(int, top_k)) if isinstance(top_k, (int, np.integer)) and not isinstance(top_k, bool) else None
    if value is None or not c.MIN_TOP_K <= value <= c.MAX_TOP_K:
        raise InvalidRequestError(f"top_k must be an integer in {c.MIN_TOP_K}..{c.MAX_TOP_K}, got {top_k!r}")
    return value


def check_text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidRequestError(f"{what} must be a str, got {type(value).__name__}")
    return value


def image_batch(images: Sequence[bytes]) -> npt.NDArray[np.object_]:
    """The [N, 1] object array that carries N encoded images in one request."""
    batch = np.empty((len(images), 1), dtype=np.object_)
    for i, data in enumerate(images):
        batch[i, 0] = data
    return batch


def string_batch(rows: Sequence[Sequence[str]]) -> npt.NDArray[np.object_]:
    """[N, W] object array of utf-8 bytes (rows padded with "", which the server ignores)."""
    width = max((len(row) for row in rows), default=0)
    batch = np.full((len(rows), max(width, 1)), b"", dtype=np.object_)
    for i, row in enumerate(rows):
        for j, value in enumerate(row):
            batch[i, j] = value.encode("utf-8")
    return batch


def filter_inputs(rows: int, category: str | None, exclude_ids: Sequence[str]) -> Arrays:
    """The optional CATEGORY / EXCLUDE_IDS tensors of a request of `rows` queries (none when unset)."""
    inputs: Arrays = {}
    if category:
        inputs[c.CATEGORY] = string_batch([[check_text(category, "category")]] * rows)
    if isinstance(exclude_ids, str):
        raise InvalidRequestError("exclude_ids must be a sequence of product ids, not one str")
    excluded = [check_text(pid, "exclude_ids entry") for pid in exclude_ids if pid]
    if len(excluded) > c.MAX_EXCLUDE_IDS:
        raise InvalidRequestError(f"exclude_ids holds at most {c.MAX_EXCLUDE_IDS} ids, got {len(excluded)}")
    if excluded:
        inputs[c.EXCLUDE_IDS] = string_batch([excluded] * rows)
    return inputs


def decode_ids(raw: npt.NDArray[Any]) -> list[str]:
    values: list[object] = raw.reshape(-1).tolist()
    return [v.decode("utf-8") if isinstance(v, (bytes, bytearray)) else str(v) for v in values]


def matches(ids: npt.NDArray[Any], scores: npt.NDArray[Any]) -> list[Match]:
    """One result row -> Matches, best first, without the padding (`contract.NO_PRODUCT_ID`)."""
    row_scores: list[float] = [float(v) for v in scores.reshape(-1).tolist()]
    found = [(pid, score) for pid, score in zip(decode_ids(ids), row_scores) if pid != c.NO_PRODUCT_ID]
    return [Match(rank + 1, pid, float(score)) for rank, (pid, score) in enumerate(found)]


def _match_rows(rows: int) -> Callable[[Mapping[str, "npt.NDArray[Any]"]], list[list[Match]]]:
    def parse(out: Mapping[str, "npt.NDArray[Any]"]) -> list[list[Match]]:
        ids = out[c.PRODUCT_IDS].reshape(rows, -1)
        scores = out[c.SCORES].reshape(rows, -1)
        return [matches(row_ids, row_scores) for row_ids, row_scores in zip(ids, scores)]

    return parse


def search_call(data: Sequence[bytes], top_k: int, category: str | None, exclude_ids: Sequence[str]) -> Call:
    """visual_search of N encoded images (one request; the same top_k and filters for all)."""
    top_k = check_top_k(top_k)
    inputs: Arrays = {c.IMAGE: image_batch(data), c.TOP_K: np.full((len(data), 1), top_k, dtype=np.int32),
                      **filter_inputs(len(data), category, exclude_ids)}
    return Call(c.VISUAL_SEARCH_MODEL, inputs, (c.PRODUCT_IDS, c.SCORES), _match_rows(len(data)))


def similar_call(product_ids: Sequence[str], top_k: int, category: str | None, exclude_ids: Sequence[str]) -> Call:
    """similar_products of N catalog product ids (one request)."""
    top_k = check_top_k(top_k)
    ids = [check_text(pid, "product_id") for pid in product_ids]
    if any(not pid for pid in ids):
        raise InvalidRequestError("product_id must not be empty")
    inputs: Arrays = {c.PRODUCT_ID: string_batch([[pid] for pid in ids]),
                      c.TOP_K: np.full((len(ids), 1), top_k, dtype=np.int32), **filter_inputs(len(ids), category, exclude_ids)}
    return Call(c.SIMILAR_PRODUCTS_MODEL, inputs, (c.PRODUCT_IDS, c.SCORES), _match_rows(len(ids)))


def embed_call(data: Sequence[bytes]) -> Call:
    """embed_image of N encoded images -> [N, D] float32."""
    if not data:
        raise ValueError("embed needs at least one image")
    rows = len(data)
    return Call(c.EMBED_IMAGE_MODEL, {c.IMAGE: image_batch(data)}, (c.EMBEDDING,),
                lambda out: np.asarray(out[c.EMBEDDING], dtype=np.float32).reshape(rows, -1))


def index_info_call(dim: int) -> Call:
    """product_search asked for its INDEX_INFO, with a valid query (a unit vector, TOP_K 1)."""
    probe = np.zeros((1, dim), dtype=np.float32)
    probe[0, 0] = 1.0
    return Call(c.SEARCH_MODEL, {c.EMBEDDING: probe, c.TOP_K: np.ones((1, 1), dtype=np.int32)}, (c.INDEX_INFO,),
                lambda out: parse_index_info(out[c.INDEX_INFO]))


def parse_index_info(raw: npt.NDArray[Any]) -> dict[str, Any]:
    values: list[object] = raw.reshape(-1).tolist()
    if not values:
        raise ServerError(f"{c.SEARCH_MODEL} sent an empty {c.INDEX_INFO}")
    first = values[0]
    info = json.loads(first.decode("utf-8") if isinstance(first, (bytes, bytearray)) else str(first))
    missing = [name for name in c.INDEX_INFO_FIELDS if name not in info and name not in c.INDEX_INFO_OPTIONAL]
    if missing:
        raise ServerError(f"{c.SEARCH_MODEL}'s {c.INDEX_INFO} lacks {missing}: a server older than this client?")
    return cast("dict[str, Any]", info)


def _field(message: Any, name: str) -> Any:
    """A field of a tritonclient answer: a dict over HTTP, a protobuf message over gRPC."""
    if isinstance(message, dict):
        return cast("dict[str, Any]", message)[name]
    return getattr(message, name)


def embedding_dim(metadata: Any) -> int:
    """The embedder's EMBEDDING width from its model metadata."""
    outputs: list[Any] = list(_field(metadata, "outputs"))
    for output in outputs:
        if str(_field(output, "name")) == c.EMBEDDING:
            shape: list[Any] = list(_field(output, "shape"))
            return int(shape[-1])
    raise ServerError(f"{c.EMBEDDER_MODEL} has no {c.EMBEDDING} output")


def metadata_versions(metadata: Any) -> list[int]:
    versions: list[Any] = list(_field(metadata, "versions"))
    return sorted(int(v) for v in versions)


def server_version(metadata: Any) -> str:
    return str(_field(metadata, "version"))


def server_info(url: str, protocol: str, metadata: Any, dim: int, index: Mapping[str, Any],
                models: dict[str, bool]) -> ServerInfo:
    """A ServerInfo from the server's metadata, the embedder's dim and product_search's INDEX_INFO."""
    if int(index["dim"]) != dim:
        raise ServerError(f"the index serves {index['dim']}-d embeddings but the embedder makes {dim}-d ones")
    return ServerInfo(url=url, protocol=protocol, server_version=server_version(metadata),
                      server_id=str(_field(metadata, "name")), index_version=int(index["version"]),
                      products=int(index["products"]), index_kind=str(index["kind"]),
                      embedder_model=str(index["embedder_model"]), dim=dim,
                      embedder_fingerprint=str(index["embedder_fingerprint"]), models=models,
                      index_id=str(index["index_id"]), backend=str(index.get("backend", "faiss")),
                      device=str(index.get("device", "")))


# -- search_many ---------------------------------------------------------------------------------
DEFAULT_MANY_BATCH = 8  # images per request of search_many
DEFAULT_MANY_CONCURRENCY = 4  # its requests in flight at once

Outcome = Union[list[list[Match]], LookalikeError]  # what the transport says of one request
Settle = Generator[list[int], Outcome, None]


def many_chunks(count: int, batch_size: int) -> list[list[int]]:
    if batch_size < 1 or batch_size > c.MAX_BATCH_SIZE:
        raise ValueError(f"batch_size must be in 1..{c.MAX_BATCH_SIZE}, got {batch_size}")
    return [list(range(start, min(start + batch_size, count))) for start in range(0, count, batch_size)]


def read_many(images: Sequence[ImageLike], results: list[SearchResult | None],
              max_bytes: int = c.MAX_IMAGE_BYTES) -> list[bytes | None]:
    """Each image's bytes (a path or file of at most `max_bytes`); one that cannot be read gets its
    error result here (and None): InvalidImageError with reason "too_large" for a file over
    `max_bytes`, "unreadable" for any other (missing, not a regular file, not an image input)."""
    data: list[bytes | None] = []
    for i, image in enumerate(images):
        try:
            data.append(read_image_bytes(image, max_bytes))
        except (OSError, TypeError, ValueError) as exc:
            reason = "too_large" if isinstance(exc, FileRefusedError) and exc.kind == "too_large" else "unreadable"
            results[i] = SearchResult(error=InvalidImageError(f"cannot read image {i}: {exc}", reason=reason))
            data.append(None)
    return data


def settle(chunk: Sequence[int], results: list[SearchResult | None]) -> Settle:
    """Settles one request's images of `search_many`: yields the indexes to send, is sent the outcome.

    All good: each gets its matches. The server refused one image (it names the first bad one): that
    image gets the error, the rest are sent again. Refused without naming one: each is sent alone.
    Any other failure (after the client's retries): each image of the request gets that error."""
    pending = list(chunk)
    while pending:
        outcome = yield pending
        if not isinstance(outcome, LookalikeError):
            for i, rows in zip(pending, outcome):
                results[i] = SearchResult(matches=rows)
            return
        if isinstance(outcome, InvalidImageError) and outcome.image_index is not None and \
                0 <= outcome.image_index < len(pending) and len(pending) > 1:
            results[pending.pop(outcome.image_index)] = SearchResult(error=outcome.for_item())
            continue
        if isinstance(outcome, InvalidRequestError) and len(pending) > 1:
            for i in pending:
                single = yield [i]
                results[i] = (SearchResult(error=single.for_item() if isinstance(single, InvalidImageError) else single)
                              if isinstance(single, LookalikeError) else SearchResult(matches=single[0]))
            return
        error = outcome.for_item() if isinstance(outcome, InvalidImageError) else outcome
        for i in pending:
            results[i] = SearchResult(error=error)
        return
