"""The Milvus search tier: product_search's `search_backend milvus`, as plain Python tested against a real
Milvus server (`lookalike.server.milvus` starts one).

One catalog lives in one collection per *generation*, named `<alias>_g<N>`; the alias (product_search's
`milvus_collection`, default `lookalike`) names the one served. A full build (a new embedder, `--full`,
another index type) fills a new generation and moves the alias in one step: every Triton replica serves
it at its next refresh, without a Triton version swap. Incremental changes are upserted into and deleted
from the live generation.

A collection holds one row per vector: its product's id, category, image and that image's sha256 (the
embedding store of incremental indexing), how many vectors the product has, and the vector. Its
properties (`lookalike.*`) say what it is: the generation, the embedder fingerprint and model (one
embedding space a collection), the distinct product count, the most vectors of one product, the id of
the last write and that write's Milvus timestamp.

Consistency: searches run at Milvus's "Customized" level with the guarantee timestamp of the last write
the collection's properties record. A reply that names a state (INDEX_INFO's index_id) therefore holds
every write of that state: read-your-own-writes for `lookalike index`, which changes the state last.
Milvus's "Strong" level gives the same but waits for a time tick on every search (about 200 ms here);
a search after the first one of a state costs what "Bounded" costs (3-4 ms here).

Grouping by product: Milvus 2.3 has no group-by search, so a query fetches k x (most vectors of one
product) rows, keeps each product's best row, and (for approximate index types) scores the leading
candidates whose rows did not all come back exactly, as the FAISS HNSW path does: on HNSW by a search
restricted to them, which Milvus answers by brute force (only ids and scores travel), on IVF-PQ from
their stored vectors.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from lookalike.serving.filtering import NO_FILTER, Filter, Hits
from lookalike.serving.search import UnknownProductError
from lookalike_client import contract as c

log = logging.getLogger(__name__)

TOKEN_ENV = c.MILVUS_TOKEN_ENV  # never in the repository or on a command line
DEFAULT_ALIAS = "lookalike"
DEFAULT_TIMEOUT_S = 2.0
REFRESH_S = 0.5  # how often product_search looks up what the alias names
MAX_RECONNECT_S = 5.0  # Milvus unreachable: the longest wait between two connection attempts
CONNECT_TIMEOUT_S = 1.0
MAX_LIMIT = 16384  # Milvus's top-k cap
RESCORE_SLACK = 2  # approximate indexes: candidates rescored exactly, as a multiple of k
RESCORE_BUDGET = 8192  # hits of one rescoring search (query rows x candidate rows)

# Fields of a collection's rows.
PK, PRODUCT_ID, CATEGORY, IMAGE, SHA256, VECTORS, VECTOR = "pk", "product_id", "category", "image", "sha256", "vectors", "vector"
MAX_ID_BYTES = 4096  # catalog ids are at most 1,024 characters (lookalike.indexing.catalog), 4 bytes each in utf-8
MAX_CATEGORY_BYTES = 4096
MAX_IMAGE_BYTES = 4096

# Collection properties.
P_GENERATION, P_FINGERPRINT, P_MODEL, P_DIM = "lookalike.generation", "lookalike.fingerprint", "lookalike.embedder_model", "lookalike.dim"
P_PRODUCTS, P_MAX_VECTORS, P_STATE, P_WRITE_TS = "lookalike.products", "lookalike.max_vectors", "lookalike.state_id", "lookalike.write_ts"
P_KIND, P_SEARCH, P_REJECTED = "lookalike.kind", "lookalike.serving.search", "lookalike.rejected"

# Milvus index type and search parameters of each index kind `lookalike index --index` names.
INDEX_TYPES = {"flat": "FLAT", "hnsw": "HNSW", "ivf-pq": "IVF_PQ"}
EXACT_KINDS = ("flat",)


class BackendUnavailableError(RuntimeError):
    """The search tier cannot be reached (or has nothing loaded): the request gets UNAVAILABLE, which
    the SDK retries; product_search reconnects by itself."""


class MilvusRequestError(RuntimeError):
    """Milvus refused one call (not an outage): that request fails with an internal error."""


class CollectionMismatchError(RuntimeError):
    """A collection of another embedding space than the embedder's."""


@dataclass(frozen=True)
class MilvusSettings:
    uri: str
    alias: str = DEFAULT_ALIAS
    timeout_s: float = DEFAULT_TIMEOUT_S
    token: str = field(default="", repr=False)

    @property
    def deadline(self) -> int:
        """The per-call timeout as pymilvus honours it: its retry loop ignores a float timeout (and then
        retries an unreachable server 75 times, about 3.5 minutes), so whole seconds, at least 1."""
        return max(1, math.ceil(self.timeout_s))

    @classmethod
    def from_params(cls, params: dict[str, str] | Any) -> "MilvusSettings":
        uri = str(params.get("milvus_uri", "")).strip()
        if not uri:
            raise ValueError("search_backend milvus needs the parameter milvus_uri (lookalike serve --milvus-uri URI)")
        timeout = str(params.get("milvus_timeout_s", "")).strip()
        return cls(uri, str(params.get("milvus_collection", "")).strip() or DEFAULT_ALIAS,
                   float(timeout) if timeout else DEFAULT_TIMEOUT_S, os.environ.get(TOKEN_ENV, ""))


def connect(settings: MilvusSettings) -> Any:
    """A pymilvus MilvusClient (imported here: pymilvus is only needed with this backend)."""
    try:
        from pymilvus import MilvusClient
    except ImportError as exc:  # e.g. the stub's libpython lacks ssl (lookalike.server.launcher, docs/operations.md)
        raise BackendUnavailableError(f"pymilvus cannot be imported here ({type(exc).__name__}: {exc})") from exc
    try:
        # A connection of its own: pymilvus otherwise shares one per (uri, token) in a process, and closing
        # any client that uses it (a reconnect, `lookalike index`'s writer) would close it under the others.
        return MilvusClient(uri=settings.uri, token=settings.token, timeout=min(settings.timeout_s, CONNECT_TIMEOUT_S),
                            alias=connection_alias())
    except Exception as exc:  # noqa: BLE001 - pymilvus raises its own and grpc's
        raise unavailable(settings, exc) from exc


def connection_alias() -> str:
    return f"lookalike-{uuid.uuid4().hex}"


def failure_kind(exc: BaseException) -> str:
    """What a failed Milvus call means: "outage" (unreachable, timed out, overloaded, not ready: retried
    by the client, the connection is made again), "stale" (the collection went away or was released
    under a search, e.g. pruned after an alias switch: retried after looking the alias up again, on the
    same connection) or "request" (Milvus refused this call, e.g. a parameter: an internal error of that
    request, no retry, the connection kept). Milvus's error codes: 1-99 service, 100-199 collection,
    1100-1199 parameter."""
    try:
        import grpc
        from pymilvus.exceptions import (
            ConnectError,
            ConnectionNotExistException,
            MilvusException,
            MilvusUnavailableException,
            ParamError,
        )
    except ImportError:
        return "outage"
    if isinstance(exc, (grpc.RpcError, OSError, TimeoutError, MilvusUnavailableException, ConnectError,
                        ConnectionNotExistException)):
        return "outage"
    if isinstance(exc, ParamError):
        return "request"
    if isinstance(exc, MilvusException):
        code = exc.code
        if not isinstance(code, int) or isinstance(code, bool):  # a grpc status: the transport's retries ran out
            return "outage"
        if 100 <= code < 200:
            return "stale"
        if 1100 <= code < 1200:
            return "request"
        return "outage"
    return "request"


def unavailable(settings: MilvusSettings, exc: BaseException) -> BackendUnavailableError:
    return BackendUnavailableError(f"milvus at {settings.uri} is unavailable: {type(exc).__name__}: {_short(exc)}")


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:300] + "..."


def generation_name(alias: str, generation: int) -> str:
    return f"{alias}_g{generation}"


def generation_of(alias: str, name: str) -> int | None:
    prefix = f"{alias}_g"
    return int(name[len(prefix):]) if name.startswith(prefix) and name[len(prefix):].isdigit() else None


def quote(value: str) -> str:
    """A string literal of Milvus's expression language: double quotes, backslash escapes, and every
    control character as \\uXXXX (a raw newline is a parse error, which would fail the whole batch)."""
    out = []
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def filter_expression(f: Filter, *, also_exclude: Sequence[str] = ()) -> str:
    """The boolean expression of a Filter (and extra ids to leave out); "" for none."""
    parts = []
    if f.category:
        parts.append(f"{CATEGORY} == {quote(f.category)}")
    excluded = sorted(set(f.exclude) | set(also_exclude))
    if excluded:
        parts.append(f"{PRODUCT_ID} not in [{', '.join(quote(pid) for pid in excluded)}]")
    return " and ".join(parts)


@dataclass(frozen=True)
class CollectionState:
    """What a generation's properties say (`lookalike index` writes them)."""

    name: str
    generation: int
    fingerprint: str
    embedder_model: str
    dim: int
    products: int = 0
    max_vectors: int = 1
    state_id: str = ""
    write_ts: int = 0
    kind: str = "hnsw"
    search: dict[str, int] = field(default_factory=dict)
    rejected: str = ""

    @classmethod
    def from_properties(cls, name: str, props: dict[str, Any]) -> "CollectionState":
        try:
            return cls(name=name, generation=int(props[P_GENERATION]), fingerprint=str(props[P_FINGERPRINT]),
                       embedder_model=str(props.get(P_MODEL, "")), dim=int(props[P_DIM]),
                       products=int(props.get(P_PRODUCTS, 0)), max_vectors=max(1, int(props.get(P_MAX_VECTORS, 1))),
                       state_id=str(props.get(P_STATE, "")), write_ts=int(props.get(P_WRITE_TS, 0)),
                       kind=str(props.get(P_KIND, "hnsw")), search=json.loads(props.get(P_SEARCH, "{}") or "{}"),
                       rejected=str(props.get(P_REJECTED, "")))
        except (KeyError, ValueError, TypeError) as exc:
            raise CollectionMismatchError(f"collection {name} is not a lookalike index (properties: {exc})") from None

    def properties(self) -> dict[str, str]:
        return {P_GENERATION: str(self.generation), P_FINGERPRINT: self.fingerprint, P_MODEL: self.embedder_model,
                P_DIM: str(self.dim), P_PRODUCTS: str(self.products), P_MAX_VECTORS: str(self.max_vectors),
                P_STATE: self.state_id, P_WRITE_TS: str(self.write_ts), P_KIND: self.kind,
                P_SEARCH: json.dumps(self.search, sort_keys=True), P_REJECTED: self.rejected}


def read_state(client: Any, name: str, timeout_s: int | None = None) -> CollectionState:
    described = client.describe_collection(name, timeout=timeout_s)
    properties = dict(described.get("properties") or {})
    if not properties:  # seen for a moment after a Milvus restart; a collection of ours always has them
        raise BackendUnavailableError(f"collection {name} shows no properties yet (Milvus still starting?)")
    return CollectionState.from_properties(name, properties)


class _QuietMissingAlias(logging.Filter):
    """pymilvus logs every failed call at ERROR; an alias that does not exist yet is an answer here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "alias not found" not in record.getMessage()


logging.getLogger("pymilvus.decorators").addFilter(_QuietMissingAlias())


def aliased(client: Any, alias: str, timeout_s: int | None = None) -> str | None:
    """The collection the alias names, None when there is no such alias."""
    try:
        return str(client.describe_alias(alias, timeout=timeout_s)["collection_name"])
    except Exception as exc:  # noqa: BLE001 - pymilvus raises MilvusException for an unknown alias
        if _is_missing(exc):
            return None
        raise


def _is_missing(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(s in text for s in ("alias not exist", "does not exist", "not found", "can't find", "alias not found"))


def in_expression(product_ids: Sequence[str]) -> str:
    return f"{PRODUCT_ID} in [{', '.join(quote(pid) for pid in product_ids)}]"


def grouped(row: list[tuple[str, float]]) -> dict[str, float]:
    """A search's rows (best first) -> each product's best score."""
    best: dict[str, float] = {}
    for pid, score in row:
        best.setdefault(pid, score)
    return best


def batches(wanted: list[list[str]], max_vectors: int, budget: int = RESCORE_BUDGET) -> list[tuple[list[int], list[str]]]:
    """Query rows, each with the products to score exactly, in runs that one Milvus search each answers:
    (row numbers, the union of their products). A run returns at most `budget` hits (rows x union x
    max_vectors) unless one row alone needs more, and covers at most MAX_LIMIT rows of vectors (Milvus's
    top-k cap; a row that needs more gets runs of its own)."""
    per_call = max(1, MAX_LIMIT // max_vectors)
    out: list[tuple[list[int], list[str]]] = []
    rows: list[int] = []
    union: dict[str, None] = {}
    for r, ids in enumerate(wanted):
        if not ids:
            continue
        if len(ids) > per_call:
            out += [([r], ids[start:start + per_call]) for start in range(0, len(ids), per_call)]
            continue
        grown = union | dict.fromkeys(ids)
        if rows and (len(grown) > per_call or len(grown) * max_vectors * (len(rows) + 1) > budget):
            out.append((rows, list(union)))
            rows, grown = [], dict.fromkeys(ids)
        rows.append(r)
        union = grown
    if rows:
        out.append((rows, list(union)))
    return out


def search_params(state: CollectionState, limit: int) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if state.kind == "hnsw":
        params["ef"] = max(int(state.search.get("efSearch", 128)), limit)
    elif state.kind == "ivf-pq":
        params["nprobe"] = int(state.search.get("nprobe", 32))
    return {"metric_type": "IP", "params": params}


class MilvusIndex:
    """The served side of a Milvus collection behind an alias, with what `lookalike.serving.product_search`
    asks of an index: search, similar, INDEX_INFO's facts. Knows only what the alias names now (looked
    up every REFRESH_S). A collection of another embedder is never searched: the previous one keeps
    serving, or, with none, no products (INDEX_INFO version 0, as before the first index), so that
    `lookalike index` can build the new embedder's generation; the log says why."""

    backend = "milvus"
    device = "milvus"
    reranks = False

    def __init__(self, settings: MilvusSettings, fingerprint: str, embedder_model: str, dim: int, *,
                 client_factory: Callable[[MilvusSettings], Any] = connect, log_error: Callable[[str], None] | None = None,
                 refresh_s: float = REFRESH_S) -> None:
        self.settings = settings
        self.expected_fingerprint = fingerprint
        self.embedder_model = embedder_model
        self._dim = dim
        self._factory = client_factory
        self._client: Any = None
        self._client_at = 0.0
        self._backoff = 1.0
        self._state: CollectionState | None = None
        self._checked_at = -1e9
        self._refresh_s = refresh_s
        self._lock = threading.Lock()
        self._log_error = log_error or log.error
        self._refused: set[str] = set()
        self.last_error: str | None = None
        self.refusal: str | None = None  # why the collection the alias names is not served

    # -- connection and state ----------------------------------------------------------------------
    def _connection(self) -> Any:
        """The client; while Milvus is unreachable, a reconnect is tried at most every 1, 2, 4, then 5 s,
        and requests in between fail at once (UNAVAILABLE) rather than each waiting for a connect."""
        if self._client is None:
            now = time.monotonic()
            if self.last_error and now - self._client_at < self._backoff:
                raise BackendUnavailableError(self.last_error)
            self._client_at = now
            try:
                self._client = self._factory(self.settings)
            except BackendUnavailableError as exc:
                self.last_error = str(exc)
                self._backoff = min(MAX_RECONNECT_S, self._backoff * 2)
                raise
            self._backoff = 1.0
        return self._client

    def _call(self, op: Callable[[Any], Any]) -> Any:
        """One Milvus call. An outage drops the client (the next call reconnects) and raises
        BackendUnavailableError, as does a collection gone under the call (the alias is looked up again);
        a call Milvus refuses raises MilvusRequestError (`failure_kind`)."""
        client = self._connection()
        try:
            result = op(client)
        except Exception as exc:  # noqa: BLE001
            if isinstance(exc, (UnknownProductError, CollectionMismatchError, BackendUnavailableError)):
                raise
            kind = failure_kind(exc)
            if kind == "request":
                raise MilvusRequestError(f"milvus at {self.settings.uri} refused the call: {type(exc).__name__}: "
                                         f"{_short(exc)}") from exc
            if kind == "stale":
                self._checked_at = -1e9  # the next call looks the alias up again
                raise unavailable(self.settings, exc) from exc
            error = unavailable(self.settings, exc)
            self.last_error = str(error)
            self._drop()
            raise error from exc
        self.last_error = None
        return result

    def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001
                pass

    def close(self) -> None:
        self._drop()

    def state(self, force: bool = False) -> CollectionState | None:
        """What the alias names (None: nothing indexed yet, or only a collection that is not served),
        looked up at most every REFRESH_S."""
        with self._lock:
            now = time.monotonic()
            if not force and now - self._checked_at < self._refresh_s:
                return self._state
            timeout = self.settings.deadline
            name = self._call(lambda cl: aliased(cl, self.settings.alias, timeout))
            self._checked_at = now
            if name is None:
                self._state, self.refusal = None, None
                return None
            try:
                fresh = self._call(lambda cl: read_state(cl, name, timeout))
                problem = self._problem(fresh)
            except CollectionMismatchError as exc:
                fresh, problem = None, str(exc)
            if problem is not None or fresh is None:  # never searched: the previous one, or nothing, is served
                if name not in self._refused:
                    self._refused.add(name)
                    still = f"still serving {self._state.name}" if self._state else "serving no products until then"
                    self._log_error(f"product_search: {problem}; {still}")
                self.refusal = problem
                return self._state
            if self._state is None or name != self._state.name:
                self._call(lambda cl: cl.load_collection(name, timeout=timeout))  # a no-op when loaded
            self._state, self.refusal = fresh, None
            return self._state

    def _problem(self, state: CollectionState) -> str | None:
        if state.fingerprint != self.expected_fingerprint:
            return (f"collection {state.name} (alias {self.settings.alias}) was built with embedder "
                    f"{state.embedder_model} {state.fingerprint}, but the embedder is {self.embedder_model} "
                    f"{self.expected_fingerprint}: run `lookalike index` again")
        if state.dim != self._dim:
            return f"collection {state.name} holds {state.dim}-d vectors, the embedder makes {self._dim}-d ones"
        return None

    # -- what product_search reports ---------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self._dim

    @property
    def fingerprint(self) -> str:
        return self.expected_fingerprint

    def info(self) -> dict[str, Any]:
        state = self.state()
        return {"version": state.generation if state else 0, "products": state.products if state else 0,
                "kind": f"milvus-{state.kind}" if state else "milvus", "dim": self._dim,
                "embedder_model": self.embedder_model, "embedder_fingerprint": self.expected_fingerprint,
                "index_id": state.state_id if state else "", "backend": self.backend, "device": self.device}

    # -- searching ---------------------------------------------------------------------------------
    def _search(self, state: CollectionState, queries: np.ndarray, limit: int, expr: str) -> list[list[tuple[str, float]]]:
        rows = self._call(lambda cl: cl.search(
            state.name, data=queries.tolist(), limit=limit, filter=expr, output_fields=[PRODUCT_ID],
            search_params=search_params(state, limit), consistency_level="Customized",
            guarantee_timestamp=state.write_ts, timeout=self.settings.deadline))
        return [[(str(hit["entity"][PRODUCT_ID]), float(hit["distance"])) for hit in row] for row in rows]

    def _vectors_of(self, state: CollectionState, product_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """Every stored vector of these products (exact rescoring, similar_products)."""
        found: dict[str, list[list[float]]] = {}
        ids = list(dict.fromkeys(product_ids))
        for start in range(0, len(ids), 256):
            chunk = ids[start:start + 256]
            expr = in_expression(chunk)
            limit = len(chunk) * state.max_vectors
            rows = self._call(lambda cl, expr=expr, limit=limit: cl.query(
                state.name, filter=expr, output_fields=[PRODUCT_ID, VECTOR], limit=limit,
                consistency_level="Customized", guarantee_timestamp=state.write_ts, timeout=self.settings.deadline))
            for row in rows:
                found.setdefault(str(row[PRODUCT_ID]), []).append(row[VECTOR])
        return {pid: np.asarray(v, dtype=np.float32) for pid, v in found.items()}

    def search(self, queries: np.ndarray, k: int, filters: Sequence[Filter] | Filter | None = None
               ) -> tuple[list[list[str]], list[np.ndarray]]:
        """Per query row: the k best products (a product scores its best vector), as ids and scores."""
        n = len(queries)
        row_filters = [filters or NO_FILTER] * n if filters is None or isinstance(filters, Filter) else list(filters)
        hits: list[Hits] = [([], np.zeros(0, np.float32))] * n
        state = self.state()
        if state is None or n == 0:
            return [h[0] for h in hits], [h[1] for h in hits]
        groups: dict[str, list[int]] = {}
        for r, f in enumerate(row_filters):
            groups.setdefault(filter_expression(f), []).append(r)
        limit = min(MAX_LIMIT, k * state.max_vectors)
        for expr, members in groups.items():
            found = self._search(state, queries[members], limit, expr)
            best = [grouped(row) for row in found]
            if state.kind not in EXACT_KINDS and state.max_vectors > 1:
                self._rescore(state, queries[members], found, best, k)
            for r, scores in zip(members, best):
                ranked = sorted(scores.items(), key=lambda item: -item[1])[:k]
                hits[r] = ([pid for pid, _ in ranked], np.array([s for _, s in ranked], dtype=np.float32))
        return [h[0] for h in hits], [h[1] for h in hits]

    def _rescore(self, state: CollectionState, queries: np.ndarray, found: list[list[tuple[str, float]]],
                 best: list[dict[str, float]], k: int) -> None:
        """Scores exactly, in `best`, each row's leading k x RESCORE_SLACK candidates whose vectors did not
        all come back (an approximate search may have reached a product by one image but not its best).
        Few calls for the whole batch (`batches`): on HNSW, a search restricted to those products, which Milvus answers
        by brute force (a top-k that covers every row the filter lets through is always searched so:
        knowhere's kHnswSearchBFTopkThreshold), so that only (id, exact score) pairs travel; on IVF-PQ,
        whose scores are approximate, their stored vectors."""
        wanted: list[list[str]] = []
        for row, scores in zip(found, best):
            returned: dict[str, int] = {}
            for pid, _ in row:
                returned[pid] = returned.get(pid, 0) + 1
            leading = sorted(scores, key=lambda pid: -scores[pid])[: k * RESCORE_SLACK]
            wanted.append([pid for pid in leading if returned[pid] < state.max_vectors])
        if not any(wanted):
            return
        if state.kind == "hnsw":
            for rows, ids in batches(wanted, state.max_vectors):
                answers = self._search(state, queries[rows], len(ids) * state.max_vectors, in_expression(ids))
                for r, answer in zip(rows, answers):
                    scores = best[r]
                    for pid, score in answer:
                        if pid in scores and score > scores[pid]:
                            scores[pid] = score
            return
        ids = list(dict.fromkeys(pid for row in wanted for pid in row))
        vectors = self._vectors_of(state, ids)
        for query, scores in zip(queries, best):
            for pid in scores.keys() & vectors.keys():
                block = vectors[pid]
                if len(block):
                    scores[pid] = max(scores[pid], float((block @ query).max()))

    def similar(self, product_ids: Sequence[str], k: int, filters: Sequence[Filter] | Filter | None = None
                ) -> tuple[list[list[str]], list[np.ndarray]]:
        """The k products most similar to each catalog product (its stored vectors; never itself); a
        candidate scores its best (query vector, candidate vector) pair. UnknownProductError names the
        first id the collection does not hold."""
        state = self.state()
        n = len(product_ids)
        row_filters = [filters or NO_FILTER] * n if filters is None or isinstance(filters, Filter) else list(filters)
        stored = self._vectors_of(state, product_ids) if state is not None else {}
        for pid in product_ids:
            if pid not in stored:
                raise UnknownProductError(f"{c.UNKNOWN_PRODUCT} {c.quoted(pid)}: not in the served index "
                                          f"({state.products if state else 0} products)")
        out_ids, out_scores = [], []
        for pid, f in zip(product_ids, row_filters):
            block = stored[pid]
            ids, scores = self.search(block, k, [Filter(f.category, f.exclude | {pid})] * len(block))
            best: dict[str, float] = {}
            for row_ids, row_scores in zip(ids, scores):
                for other, score in zip(row_ids, row_scores.tolist()):
                    if score > best.get(other, -np.inf):
                        best[other] = score
            ranked = sorted(best.items(), key=lambda item: -item[1])[:k]
            out_ids.append([p for p, _ in ranked])
            out_scores.append(np.array([s for _, s in ranked], dtype=np.float32))
        return out_ids, out_scores
