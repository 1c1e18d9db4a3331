"""The plain Python under the `product_search` model: loading a served index version, checking each
request, and searching the requests of a dynamic batch, tested without Triton.

A dynamic batch holds requests from different clients. Everything here keeps them apart: each
request is checked on its own (a bad one gets its own error), and no request's rows, size or TOP_K
can change what another request gets back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from lookalike.serving.adapter import Inputs, Log, Outcome, Outputs, required, run_together
from lookalike.serving.artifacts import PREPROCESSING_FILE, EmbedderManifest
from lookalike.serving.errors import RequestError
from lookalike.serving.filtering import NO_FILTER, Filter
from lookalike.serving.fusion import depth as fusion_depth
from lookalike.serving.fusion import fuse
from lookalike.serving.gpu import DEFAULT_GPU_TEMP_MEMORY, set_threads
from lookalike.serving.search import ProductIndex, UnknownProductError
from lookalike_client import contract as c

if TYPE_CHECKING:
    from lookalike.serving.milvus_search import MilvusIndex

# How far an embedding's L2 norm may be from 1. The embedders normalise in the graph (FP32 and FP16
# engines land within 1e-3); anything further off was not made by our embedder, and its inner
# products would not be cosine similarities.
DEFAULT_NORM_TOLERANCE = 0.01

# Fill of a result row that has fewer hits than the longest row of the same request (only an
# approximate index leaves gaps): the contract's NO_PRODUCT_ID and FAISS's own "no neighbour" score,
# the lowest float32, which is finite (JSON-safe) and sorts last.
PAD_PRODUCT_ID = c.NO_PRODUCT_ID.encode()
PAD_SCORE = float(np.finfo(np.float32).min)


# Views of one query (EMBEDDING [N, V x D]) at most: the preprocessing file's query_views are a handful.
MAX_VIEWS = 16

INPUTS = (c.EMBEDDING, c.PRODUCT_ID, c.TOP_K, c.CATEGORY, c.EXCLUDE_IDS)


def resolve_top_k(top_k: np.ndarray | None, rows: int) -> int:
    """The TOP_K of one request of `rows` embeddings. Missing (or, through an ensemble, empty) means
    the default; one request has one TOP_K; out of 1..1000 raises RequestError (-> INVALID_ARG)."""
    if top_k is None or top_k.size == 0:
        return c.DEFAULT_TOP_K
    values = np.unique(top_k.reshape(-1))
    if values.size != 1:
        raise RequestError(f"TOP_K must be the same for all {rows} images of a request, got {values.tolist()}")
    k = int(values[0])
    if not c.MIN_TOP_K <= k <= c.MAX_TOP_K:
        raise RequestError(f"TOP_K must be in {c.MIN_TOP_K}..{c.MAX_TOP_K}, got {k}")
    return k


def check_embeddings(embeddings: np.ndarray, dim: int, norm_tolerance: float = DEFAULT_NORM_TOLERANCE) -> np.ndarray:
    """One request's EMBEDDING tensor, [N, dim] float32, finite and L2-normalised; else RequestError
    naming the first bad row (-> INVALID_ARG for that request only)."""
    if embeddings.ndim != 2 or embeddings.shape[1] != dim:
        raise RequestError(f"{c.EMBEDDING} must be [N, {dim}], got {list(embeddings.shape)}")
    rows = embeddings.shape[0]
    finite = np.isfinite(embeddings).all(axis=1)
    if not finite.all():
        row = int(np.argmin(finite))
        kinds = sorted({"NaN" if np.isnan(v) else "inf" for v in embeddings[row] if not np.isfinite(v)})
        raise RequestError(f"{c.EMBEDDING} row {row} of {rows} is not finite (holds {' and '.join(kinds)})")
    norms = np.linalg.norm(embeddings.astype(np.float64), axis=1)
    off = np.abs(norms - 1.0) > norm_tolerance
    if off.any():
        row = int(np.argmax(off))
        raise RequestError(f"{c.EMBEDDING} row {row} of {rows} has L2 norm {norms[row]:.6g}; embeddings must be "
                         f"L2-normalised (norm 1 +- {norm_tolerance:g})")
    return np.ascontiguousarray(embeddings, dtype=np.float32)


def _strings(array: np.ndarray, name: str) -> list[list[str]]:
    """A TYPE_STRING tensor [N, W] as N rows of str (utf-8); RequestError naming the tensor otherwise."""
    if array.ndim == 1:
        array = array.reshape(-1, 1)
    if array.ndim != 2:
        raise RequestError(f"{name} must be [N, W] strings, got shape {list(array.shape)}")
    rows = []
    for row in array.tolist():
        values = []
        for value in row:
            if isinstance(value, (bytes, bytearray)):
                try:
                    value = bytes(value).decode("utf-8")
                except UnicodeDecodeError:
                    raise RequestError(f"{name} must be utf-8 text") from None
            elif not isinstance(value, str):
                raise RequestError(f"{name} must be strings, got {type(value).__name__}")
            values.append(value)
        rows.append(values)
    return rows


def _per_row(values: list[list[str]], rows: int, name: str) -> list[list[str]]:
    """One entry per query row: N rows as sent, or 1 row for all N."""
    if len(values) == rows:
        return values
    if len(values) == 1:
        return values * rows
    raise RequestError(f"{name} has {len(values)} rows for {rows} queries (send one row per query, or one for all)")


def parse_filters(inputs: Inputs, rows: int) -> tuple[Filter, ...]:
    """The optional CATEGORY [N, 1] and EXCLUDE_IDS [N, E] of one request as one Filter per row (missing
    or, through an ensemble, empty: no filter). "" is no category, and pads an EXCLUDE_IDS row."""
    category, exclude = inputs.get(c.CATEGORY), inputs.get(c.EXCLUDE_IDS)
    categories: list[str] = [""] * rows
    excluded: list[frozenset[str]] = [frozenset()] * rows
    if category is not None and category.size:
        values = _per_row(_strings(category, c.CATEGORY), rows, c.CATEGORY)
        if any(len(v) != 1 for v in values):
            raise RequestError(f"{c.CATEGORY} holds one category per query, got {max(len(v) for v in values)}")
        categories = [v[0] for v in values]
    if exclude is not None and exclude.size:
        values = _per_row(_strings(exclude, c.EXCLUDE_IDS), rows, c.EXCLUDE_IDS)
        longest = max(len(v) for v in values)
        if longest > c.MAX_EXCLUDE_IDS:
            raise RequestError(f"{c.EXCLUDE_IDS} holds at most {c.MAX_EXCLUDE_IDS} ids per query, got {longest}")
        excluded = [frozenset(pid for pid in v if pid) for v in values]
    return tuple(Filter(cat or None, ex) for cat, ex in zip(categories, excluded))


@dataclass(frozen=True)
class SearchRequest:
    embeddings: np.ndarray | None  # [N * V, D], already checked: V views per query row; or None for search by product id:
    k: int
    filters: tuple[Filter, ...] = ()  # one per row (empty: none)
    product_ids: tuple[str, ...] = ()  # similar_products: the catalog products to match
    views: int = 1  # embeddings per query row (lookalike.serving.query_views), fused (lookalike.serving.fusion)

    @property
    def rows(self) -> int:
        return len(self.embeddings) // self.views if self.embeddings is not None else len(self.product_ids)

    def row_filters(self) -> list[Filter]:
        return list(self.filters) if self.filters else [NO_FILTER] * self.rows


@dataclass(frozen=True)
class SearchResult:
    product_ids: np.ndarray  # [N, W] object array of utf-8 bytes, W = the longest row (<= k)
    scores: np.ndarray  # [N, W] float32, best first


def search_requests(index: "ProductIndex | MilvusIndex", requests: Sequence[SearchRequest],
                    fusion: str = "max") -> list[SearchResult | Exception]:
    """Searches the requests of one dynamic batch, one result per request, in order.

    Requests with the same k and number of views share one search call per filter (the common case:
    every client sends the default and no filter); different k are searched apart, because an
    approximate index (HNSW's efSearch grows with k) may answer a row differently when asked for more
    neighbours. A query row of V views searches each view (`fusion.depth` deep) and fuses their
    product scores (`fusion.fuse`). Requests by product id are answered one by one. Within a request, a
    row with fewer hits is padded with PAD_PRODUCT_ID / PAD_SCORE up to the request's longest row. A
    request by product id that names an id the index does not hold gets its UnknownProductError as its
    result (the others go on)."""
    results: list[SearchResult | Exception | None] = [None] * len(requests)
    for i, request in enumerate(requests):
        if request.embeddings is None:
            try:
                results[i] = _rectangular(*index.similar(request.product_ids, request.k, request.row_filters()))
            except UnknownProductError as exc:
                results[i] = exc
    by_vector = [i for i, r in enumerate(requests) if r.embeddings is not None]
    for k, views in sorted({(requests[i].k, requests[i].views) for i in by_vector}):
        members = [i for i in by_vector if (requests[i].k, requests[i].views) == (k, views)]
        queries = np.concatenate([requests[i].embeddings for i in members])  # type: ignore[misc]
        filters = [f for i in members for f in requests[i].row_filters() for _ in range(views)]
        ids, scores = index.search(queries, fusion_depth(k, views, fusion), filters)
        if views > 1:
            fused = [fuse(ids[r : r + views], scores[r : r + views], k, fusion) for r in range(0, len(ids), views)]
            ids, scores = [f[0] for f in fused], [f[1] for f in fused]
        start = 0
        for i in members:
            count = requests[i].rows
            results[i] = _rectangular(ids[start : start + count], scores[start : start + count])
            start += count
    return results  # type: ignore[return-value]


def search_views(index: "ProductIndex | MilvusIndex", embeddings: np.ndarray, views: int, k: int,
                 fusion: str = "max") -> tuple[list[list[str]], list[np.ndarray]]:
    """What product_search answers for photos embedded as `views` views each ([N x views, D], the photos'
    views in turn): each photo's product ids and scores, best first, padding dropped. The same work in
    process as served (`lookalike eval`, the benchmarks' in-process pipeline and peer)."""
    result = search_requests(index, [SearchRequest(np.ascontiguousarray(embeddings, dtype=np.float32), k,
                                                   views=views)], fusion)[0]
    if isinstance(result, Exception):
        raise result
    ids = [[pid.decode("utf-8") for pid in row if pid != PAD_PRODUCT_ID] for row in result.product_ids]
    return ids, [scores[: len(row)] for row, scores in zip(ids, result.scores)]


def _rectangular(ids: list[list[str]], scores: list[np.ndarray]) -> SearchResult:
    width = max((len(row) for row in ids), default=0)
    out_ids = np.full((len(ids), width), PAD_PRODUCT_ID, dtype=np.object_)
    out_scores = np.full((len(ids), width), PAD_SCORE, dtype=np.float32)
    for r, (row_ids, row_scores) in enumerate(zip(ids, scores)):
        out_ids[r, : len(row_ids)] = [pid.encode("utf-8") for pid in row_ids]
        out_scores[r, : len(row_scores)] = row_scores
    return SearchResult(out_ids, out_scores)


class IndexMismatchError(RuntimeError):
    """An index version built with another embedder than the one served: it must not load."""


def parse_request(inputs: Inputs, dim: int, norm_tolerance: float = DEFAULT_NORM_TOLERANCE,
                  index: ProductIndex | None = None) -> SearchRequest:
    """One request, checked (RequestError -> INVALID_ARG): EMBEDDING (visual_search) or PRODUCT_ID
    (similar_products: ids that `index` holds), optional TOP_K, CATEGORY and EXCLUDE_IDS."""
    embedding, product_id = inputs.get(c.EMBEDDING), inputs.get(c.PRODUCT_ID)
    has_embedding, has_product = embedding is not None and embedding.size > 0, product_id is not None and product_id.size > 0
    if has_embedding == has_product:
        raise RequestError(f"send either {c.EMBEDDING} or {c.PRODUCT_ID}" + (", not both" if has_embedding else ""))
    if has_product:
        assert product_id is not None
        rows = _strings(product_id, c.PRODUCT_ID)
        if any(len(row) != 1 for row in rows):
            raise RequestError(f"{c.PRODUCT_ID} holds one product id per query")
        ids = tuple(row[0] for row in rows)
        if index is not None:
            for pid in ids:
                if pid not in index:  # quoted: the message never grows with the id (gRPC sends it in a header)
                    raise UnknownProductError(f"{c.UNKNOWN_PRODUCT} {c.quoted(pid)}: not in the served index "
                                              f"({len(index)} products)")
        return SearchRequest(None, resolve_top_k(inputs.get(c.TOP_K), len(ids)), parse_filters(inputs, len(ids)), ids)
    embedding = required(inputs, c.EMBEDDING)
    views = embedding.shape[1] // dim if embedding.ndim == 2 and embedding.shape[1] % dim == 0 else 0
    if views < 1 or views > MAX_VIEWS:
        raise RequestError(f"{c.EMBEDDING} must be [N, {dim}], or [N, V x {dim}] for V views of each query "
                         f"(V at most {MAX_VIEWS}), got {list(embedding.shape)}")
    rows = embedding.shape[0]
    embeddings = check_embeddings(embedding.reshape(rows * views, dim), dim, norm_tolerance)
    return SearchRequest(embeddings, resolve_top_k(inputs.get(c.TOP_K), rows), parse_filters(inputs, rows),
                         views=views)


def outputs(result: SearchResult | Exception, info: bytes = b"{}") -> Outputs | Exception:
    """A request's output tensors: its results, and INDEX_INFO on every row (Triton passes on the
    outputs a client names, every output to one that names none; the ensembles never pass it on).
    A request's exception is passed on as its own error."""
    if isinstance(result, Exception):
        return result
    rows = len(result.product_ids)
    return {c.PRODUCT_IDS: result.product_ids, c.SCORES: result.scores,
            c.INDEX_INFO: np.full((rows, 1), info, dtype=np.object_)}


def index_info(index: ProductIndex, version: int, embedder_model: str) -> dict[str, Any]:
    """What INDEX_INFO says of a served FAISS index version (contract.INDEX_INFO_FIELDS)."""
    info = {"version": int(version), "products": len(index), "kind": index.kind, "dim": index.dim,
            "embedder_model": embedder_model, "embedder_fingerprint": index.fingerprint,
            "index_id": index.meta.index_id, "backend": "faiss", "device": index.device}
    assert tuple(info) == c.INDEX_INFO_FIELDS
    return info


class ProductSearch:
    """One served index: what `product_search`'s model.py holds per instance. The FAISS index of a
    version directory, or (search_backend milvus) the Milvus collection behind an alias, whose INDEX_INFO
    is looked up again for each batch (an alias move or a write changes it without a Triton reload)."""

    def __init__(self, index: "ProductIndex | MilvusIndex", norm_tolerance: float = DEFAULT_NORM_TOLERANCE, *,
                 version: int = 0, embedder_model: str = "", fusion: str = "max") -> None:
        self.index = index
        self.norm_tolerance = norm_tolerance
        self.fusion = fusion  # how the views of one query make a product's score (lookalike.serving.fusion)
        self.info = index_info(index, version, embedder_model) if isinstance(index, ProductIndex) else index.info()
        self._info_json = json.dumps(self.info, sort_keys=True).encode()

    def describe(self) -> str:
        """One line for the log: what is served, and where the search runs."""
        index = self.index
        if isinstance(index, ProductIndex):
            return (f"{len(index)} products, {index.kind} index {index.meta.factory} {index.search_params} on the "
                    f"{index.device}" + (" (this FAISS build has no GPU support)" if index.device == "cpu" and
                                         not _faiss_has_gpu() else "") + f", query views fused by {self.fusion}")
        info = index.info()
        where = f"milvus {index.settings.uri}, alias {index.settings.alias}"
        if index.last_error:
            return f"{where}: not reachable yet ({index.last_error}); requests get UNAVAILABLE until it is"
        if index.refusal:
            return f"{where}: {index.refusal}"
        return (f"{where}: generation {info['version']}, {info['products']} products, {info['kind']}, "
                f"query views fused by {self.fusion}")

    def close(self) -> None:
        if not isinstance(self.index, ProductIndex):
            self.index.close()

    @property
    def backend(self) -> str:
        return "faiss" if isinstance(self.index, ProductIndex) else "milvus"

    def current_info(self) -> bytes:
        """INDEX_INFO as JSON: fixed for a FAISS version, what the alias names now on Milvus."""
        if isinstance(self.index, ProductIndex):
            return self._info_json
        self.info = self.index.info()
        self._info_json = json.dumps(self.info, sort_keys=True).encode()
        return self._info_json

    @classmethod
    def load(cls, model_dir: Path, version: str, params: Mapping[str, str], *, instance_kind: str = "CPU",
             device_id: int = 0) -> "ProductSearch":
        """The index in `model_dir/version`, with the model config's `params`. Refuses (IndexMismatchError)
        an index built with another embedder than the manifest's `embedder_manifest` names. With the
        parameter search_backend milvus, the index is the Milvus collection its parameters name instead
        (the version directory then holds only the model code)."""
        backend = params.get("search_backend", "faiss").strip() or "faiss"
        if backend not in c.SEARCH_BACKENDS:
            raise ValueError(f"parameter search_backend must be one of {', '.join(c.SEARCH_BACKENDS)}, got {backend!r}")
        if backend == "milvus":
            return cls.load_milvus(model_dir, version, params)
        set_threads(int(params.get("faiss_threads", "0")))
        device = params.get("device", params.get("faiss_device", "auto")).strip() or "auto"
        temp_mb = _optional_int(params, "gpu_temp_memory_mb")
        if temp_mb is not None and temp_mb < 0:
            raise ValueError(f"parameter gpu_temp_memory_mb must be >= 0, got {temp_mb}")
        index = ProductIndex.load(Path(model_dir) / version, device=device,
                                  gpu_device=device_id if instance_kind == "GPU" else 0,
                                  gpu_temp_memory_bytes=(temp_mb << 20) if temp_mb is not None else DEFAULT_GPU_TEMP_MEMORY)
        index.set_search_params(ef_search=_optional_int(params, "ef_search"), nprobe=_optional_int(params, "nprobe"),
                                filter_scan_max_vectors=_optional_int(params, "filter_scan_max_vectors"))
        manifest_path = (Path(model_dir) / params["embedder_manifest"]).resolve()
        manifest = EmbedderManifest.load(manifest_path)
        expected = manifest.fingerprint
        if index.fingerprint != expected:
            raise IndexMismatchError(
                f"index version {version} was built with embedder {index.fingerprint or '?'}, "
                f"but the embedder is {expected}: run `lookalike index` again"
            )
        return cls(index, float(params.get("embedding_norm_tolerance", DEFAULT_NORM_TOLERANCE)),
                   version=int(version), embedder_model=manifest.model, fusion=query_fusion(manifest_path.parent))

    @classmethod
    def load_milvus(cls, model_dir: Path, version: str, params: Mapping[str, str]) -> "ProductSearch":
        """The Milvus collection behind the alias of the parameters milvus_uri / milvus_collection (token:
        $LOOKALIKE_MILVUS_TOKEN). Loads while Milvus is down (requests get UNAVAILABLE until it is back);
        never searches a collection of another embedder (`MilvusIndex`)."""
        from lookalike.serving.milvus_search import BackendUnavailableError, CollectionMismatchError, MilvusIndex, MilvusSettings

        manifest_path = (Path(model_dir) / params["embedder_manifest"]).resolve()
        manifest = EmbedderManifest.load(manifest_path)
        index = MilvusIndex(MilvusSettings.from_params(params), manifest.fingerprint, manifest.model, manifest.dim)
        try:
            index.state(force=True)
        except (BackendUnavailableError, CollectionMismatchError):
            pass  # served as unavailable until Milvus answers (the log line says so)
        return cls(index, float(params.get("embedding_norm_tolerance", DEFAULT_NORM_TOLERANCE)),
                   version=int(version), embedder_model=manifest.model, fusion=query_fusion(manifest_path.parent))

    def __call__(self, requests: Sequence[Inputs], log: Log | None = None) -> list[Outcome]:
        """The outcomes of one dynamic batch's requests, in order."""
        if isinstance(self.index, ProductIndex):
            local: ProductIndex | None = self.index
            unavailable: tuple[type[Exception], ...] = ()
        else:
            from lookalike.serving.milvus_search import BackendUnavailableError

            local, unavailable = None, (BackendUnavailableError,)

        def compute(searches: list[SearchRequest]) -> list[Outputs | Exception]:
            results = search_requests(self.index, searches, self.fusion)
            info = self.current_info()
            return [outputs(r, info) for r in results]

        return run_together(
            requests,
            parse=lambda inputs: parse_request(inputs, self.index.dim, self.norm_tolerance, local),
            compute=compute, what="search", log=log, unavailable=unavailable,
        )


def query_fusion(embedder_dir: Path) -> str:
    """The fusion of the query views that the embedder's preprocessing file names ("max" without one)."""
    from lookalike.serving.preprocessing import PreprocessConfig

    path = Path(embedder_dir) / PREPROCESSING_FILE
    return PreprocessConfig.load(path).query_fusion if path.exists() else "max"


def _faiss_has_gpu() -> bool:
    import faiss

    return hasattr(faiss, "GpuIndex")


def _optional_int(params: Mapping[str, str], name: str) -> int | None:
    """A config parameter that may be left empty (the index version's own default then)."""
    value = params.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"parameter {name} must be an integer or empty, got {value!r}") from None


def instance_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """Where Triton's `initialize` args put this instance: kind ("CPU"/"GPU") and device id."""
    return {"instance_kind": str(args.get("model_instance_kind", "CPU")),
            "device_id": int(args.get("model_instance_device_id", 0))}
