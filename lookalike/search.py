"""The product index: FAISS over L2-normalised embeddings, searched by inner product (= cosine).

FAISS positions are int64 and stay inside this module; callers see the catalog's own product ids.
An index is a directory, written once and never modified (file names and metadata schema in
`lookalike.artifacts`): index.faiss (faiss.write_index), products.json (ids, categories, image paths
and how many vectors each product has, in FAISS order: a product's vectors are consecutive, its
packshot, then its catalog views) and index.json (`IndexMeta`, written last, vouching for the others).

`product_search` serves one such directory per Triton model version (see `lookalike.repository`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import faiss
import numpy as np

from .artifacts import INDEX_FILE, META_FILE, PRODUCTS_FILE, ArtifactError, IndexMeta, file_digest

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "gpu")
DEFAULT_GPU_TEMP_MEMORY = 256 << 20  # FAISS reserves about 512 MB of scratch per resources object by default


class CorruptIndexError(ValueError):
    """An index directory that cannot be served: a missing, truncated or altered file."""


@dataclass(frozen=True)
class Product:
    product_id: str
    category: str = ""
    image: str = ""


class ProductIndex:
    def __init__(self, index: faiss.Index, products: Sequence[Product], meta: IndexMeta,
                 vectors: Sequence[int] | None = None) -> None:
        counts = np.ones(len(products), dtype=np.int64) if vectors is None else np.asarray(vectors, dtype=np.int64)
        if len(counts) != len(products) or (len(counts) and counts.min() < 1):
            raise ValueError(f"need one vector count >= 1 per product ({len(counts)} counts, {len(products)} products)")
        if index.ntotal != int(counts.sum()):
            raise ValueError(f"index holds {index.ntotal} vectors but its {len(products)} products have {int(counts.sum())}")
        self.index = index
        self.products = list(products)
        self.vectors = counts
        self._ids = np.array([p.product_id for p in self.products], dtype=object)
        self._owner = np.repeat(np.arange(len(products)), counts)  # FAISS position -> product position
        self._max_vectors = int(counts.max()) if len(counts) else 1
        self.meta = meta
        self._inner = faiss.downcast_index(index)  # IndexHNSWFlat, IndexIVFPQ, ...: what search parameters apply
        gpu: Any = faiss  # GpuIndex exists only in GPU builds
        self.on_gpu = hasattr(gpu, "GpuIndex") and isinstance(index, gpu.GpuIndex)
        self.search_params: dict[str, int] = dict(meta.search)
        self._apply_gpu_params()

    def _apply_gpu_params(self) -> None:
        """A GPU IVF index takes nprobe as a setting (per-call parameters are the CPU indexes')."""
        if self.on_gpu and "nprobe" in self.search_params and hasattr(self.index, "nprobe"):
            gpu: Any = faiss
            gpu.GpuParameterSpace().set_index_parameter(self.index, "nprobe", self.search_params["nprobe"])

    def set_search_params(self, *, ef_search: int | None = None, nprobe: int | None = None) -> None:
        """Overrides of the version's search-time defaults (product_search's config parameters)."""
        for name, value in (("efSearch", ef_search), ("nprobe", nprobe)):
            if value is not None:
                if value < 1:
                    raise ValueError(f"{name} must be >= 1, got {value}")
                self.search_params[name] = int(value)
        self._apply_gpu_params()

    @property
    def device(self) -> str:
        return "gpu" if self.on_gpu else "cpu"

    @property
    def kind(self) -> str:
        """flat, hnsw, ivf-pq or ivf, from the FAISS class (IndexIVFPQ and GpuIndexIVFPQ alike)."""
        name = type(self._inner).__name__
        return "hnsw" if "HNSW" in name else "ivf-pq" if "IVFPQ" in name else "ivf" if "IVF" in name else "flat"

    def _faiss_params(self, rows: int) -> faiss.SearchParameters | None:
        """Per-call search parameters (the version's, else the FAISS index's own): HNSW explores at least as
        many candidates as rows asked for."""
        if isinstance(self._inner, faiss.IndexHNSW):
            ef = self.search_params.get("efSearch", int(self._inner.hnsw.efSearch))
            return faiss.SearchParametersHNSW(efSearch=max(ef, rows))  # pyright: ignore[reportAttributeAccessIssue] - SWIG
        if isinstance(self._inner, faiss.IndexIVF):
            nprobe = self.search_params.get("nprobe", int(self._inner.nprobe))
            return faiss.SearchParametersIVF(nprobe=nprobe)  # pyright: ignore[reportCallIssue] - SWIG keyword
        return None

    # -- properties ------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def fingerprint(self) -> str:
        return self.meta.embedder_fingerprint

    def __len__(self) -> int:
        return len(self.products)

    # -- build -----------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        products: Sequence[Product],
        embeddings: np.ndarray,
        *,
        dim: int | None = None,
        factory: str = "Flat",
        embedder_fingerprint: str = "",
        vectors: Sequence[int] | None = None,
        search: dict[str, int] | None = None,
    ) -> "ProductIndex":
        """Builds an inner-product index. `embeddings` [R, D] must be L2-normalised (the embedder's
        output is). `vectors[i]` is how many consecutive rows belong to product i (default one each:
        R = N). `dim` is required only for an empty catalog."""
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if len(products) == 0 and dim:  # an empty catalog: whatever shape the caller had
            embeddings = np.zeros((0, int(dim)), dtype=np.float32)
        rows = len(products) if vectors is None else int(np.sum(vectors))
        if embeddings.ndim != 2 or embeddings.shape[0] != rows:
            raise ValueError(f"embeddings {embeddings.shape} do not match {len(products)} products ({rows} vectors)")
        d = int(dim or embeddings.shape[1])
        if embeddings.shape[1] != d:
            raise ValueError(f"embeddings have dim {embeddings.shape[1]}, expected {d}")
        ids = [p.product_id for p in products]
        if len(set(ids)) != len(ids):
            raise ValueError("product ids must be unique")
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            if len(products) < 1:
                raise ValueError(f"index factory {factory!r} needs training data; use 'Flat' for an empty catalog")
            index.train(embeddings)
        if len(products):
            index.add(embeddings)
        meta = IndexMeta.new(dim=d, count=len(products), vectors=rows, factory=factory,
                             embedder_fingerprint=embedder_fingerprint, search=search)
        return cls(index, products, meta, vectors)

    # -- persistence -----------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(directory / INDEX_FILE))
        products = {
            "product_id": [p.product_id for p in self.products],
            "category": [p.category for p in self.products],
            "image": [p.image for p in self.products],
            "vectors": self.vectors.tolist(),
        }
        (directory / PRODUCTS_FILE).write_text(json.dumps(products))
        self.meta.sealed(directory).save(directory)

    @classmethod
    def load(cls, directory: str | Path, *, device: str = "cpu", gpu_device: int = 0,
             gpu_temp_memory_bytes: int = DEFAULT_GPU_TEMP_MEMORY) -> "ProductIndex":
        """Loads an index directory after `check_index_dir`, so a damaged file is refused with a reason
        before FAISS parses it; `device` auto|cpu|gpu (see `place`)."""
        directory = Path(directory)
        meta = check_index_dir(directory)
        products, vectors = _load_columns(directory)
        try:
            index = faiss.read_index(str(directory / INDEX_FILE))
        except RuntimeError as exc:
            raise CorruptIndexError(f"{INDEX_FILE}: FAISS cannot read it: {str(exc).splitlines()[0]}") from None
        index = place(index, device, gpu_device=gpu_device, temp_memory_bytes=gpu_temp_memory_bytes)
        try:
            loaded = cls(index, products, meta, vectors)
        except ValueError as exc:
            raise CorruptIndexError(f"{INDEX_FILE} and {PRODUCTS_FILE} disagree: {exc}") from None
        if len(loaded) != meta.count or loaded.dim != meta.dim:
            raise CorruptIndexError(f"{INDEX_FILE} holds {len(loaded)} x {loaded.dim}, {META_FILE} says "
                                    f"{meta.count} x {meta.dim}")
        return loaded

    # -- search ----------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> tuple[list[list[str]], list[np.ndarray]]:
        """[N, D] queries -> (N lists of product ids, N float32 score arrays), best first, at most
        min(k, catalog size) each. Scores are cosine similarities for normalised queries.

        Rows are independent: an approximate index that finds fewer than k neighbours for one row
        (FAISS marks the gaps with position -1) returns fewer items for that row only, never fewer
        for the others. Callers must refuse non-finite queries first (`lookalike.product_search`): FAISS
        ranks NaN scores arbitrarily."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [N, {self.dim}], got {list(queries.shape)}")
        k_eff = min(int(k), len(self))
        if k_eff <= 0 or queries.shape[0] == 0:
            return [[] for _ in range(queries.shape[0])], [np.zeros(0, np.float32) for _ in range(queries.shape[0])]
        if self._max_vectors == 1:
            scores, positions = self.index.search(queries, k_eff, params=self._faiss_params(k_eff))
            found = positions >= 0  # FAISS fills each row best first, gaps (-1) only at the end
            ids = [list(self._ids[row[keep]]) for row, keep in zip(positions, found)]
            return ids, [np.ascontiguousarray(row[keep], dtype=np.float32) for row, keep in zip(scores, found)]
        # Several vectors per product: a product scores its best vector. The k best products are
        # among the k * (most vectors of a product) best vectors, whatever their owners.
        rows = min(k_eff * self._max_vectors, self.index.ntotal)
        scores, positions = self.index.search(queries, rows, params=self._faiss_params(rows))
        all_ids, all_scores = [], []
        for row_scores, row_positions in zip(scores, positions):
            keep = row_positions >= 0
            owners = self._owner[row_positions[keep]]
            _, first = np.unique(owners, return_index=True)  # each owner's best (first) hit
            first = np.sort(first)[:k_eff]
            all_ids.append(list(self._ids[owners[first]]))
            all_scores.append(np.ascontiguousarray(row_scores[keep][first], dtype=np.float32))
        return all_ids, all_scores


def load_products(directory: str | Path) -> list[Product]:
    """The products of an index directory, in FAISS order, without loading the index."""
    return _load_columns(directory)[0]


def _load_columns(directory: str | Path) -> tuple[list[Product], list[int]]:
    try:
        columns = json.loads((Path(directory) / PRODUCTS_FILE).read_text())
        ids, categories, images = columns["product_id"], columns["category"], columns["image"]
        vectors = columns.get("vectors", [1] * len(ids))  # indexes from before catalog views: one each
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptIndexError(f"{PRODUCTS_FILE}: {type(exc).__name__}: {exc}") from None
    if not len(ids) == len(categories) == len(images) == len(vectors) or not all(isinstance(i, str) and i for i in ids):
        raise CorruptIndexError(f"{PRODUCTS_FILE}: columns of different lengths or an empty/non-string id")
    if not all(isinstance(v, int) and v >= 1 for v in vectors):
        raise CorruptIndexError(f"{PRODUCTS_FILE}: vector counts must be integers >= 1")
    return [Product(pid, cat, img) for pid, cat, img in zip(ids, categories, images)], vectors


def check_index_dir(directory: str | Path) -> IndexMeta:
    """Returns the metadata of an index directory whose files are whole and unaltered; raises
    CorruptIndexError naming the first problem. The sizes and hashes come from index.json (indexes
    written before they were recorded are checked when FAISS and JSON parse them in `load`)."""
    directory = Path(directory)
    try:
        meta = IndexMeta.load(directory)
    except ArtifactError as exc:
        raise CorruptIndexError(str(exc).replace(f" ({directory / META_FILE})", "")) from None
    for name in (INDEX_FILE, PRODUCTS_FILE):
        path = directory / name
        if not path.is_file():
            raise CorruptIndexError(f"no {name}")
        recorded = (meta.files or {}).get(name)
        if recorded is None:
            continue
        size, want = path.stat().st_size, recorded.get("bytes")
        if size != want:
            raise CorruptIndexError(f"{name}: {size:,} bytes, but {META_FILE} recorded "
                                    + (f"{want:,}" if isinstance(want, int) else repr(want)))
        if file_digest(path)["sha256"] != recorded.get("sha256"):
            raise CorruptIndexError(f"{name}: its content changed since it was written (sha256 mismatch)")
    return meta


class GpuUnavailableError(RuntimeError):
    """device "gpu" where FAISS cannot put this index on a GPU: a load error that says why."""


def gpu_unavailable() -> str | None:
    """Why FAISS cannot use a GPU in this process, or None when it can."""
    if not hasattr(faiss, "StandardGpuResources"):
        return f"this FAISS build ({faiss.__version__}) has no GPU support (faiss-cpu; a GPU build is faiss-gpu)"
    if faiss.get_num_gpus() < 1:
        return "FAISS sees no GPU (none visible to this process: driver, CUDA_VISIBLE_DEVICES)"
    return None


def to_gpu(index: faiss.Index, device: int = 0, temp_memory_bytes: int = DEFAULT_GPU_TEMP_MEMORY) -> faiss.Index | None:
    """`index` copied to GPU `device` with a resources object of its own (one per model instance) whose
    scratch memory is bounded; None for an index kind FAISS has no GPU version of (HNSW; CAGRA, its
    GPU graph, needs a cuVS build and a rebuild, not a copy). Needs `gpu_unavailable()` to be None."""
    if isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
        return None
    gpu: Any = faiss  # the GPU classes exist only in GPU builds of the SWIG module
    resources = gpu.StandardGpuResources()
    resources.setTempMemory(int(temp_memory_bytes))
    options = gpu.GpuClonerOptions()
    options.useFloat16LookupTables = True  # IVF-PQ with many sub-quantisers: its tables must fit shared memory
    gpu_index = gpu.index_cpu_to_gpu(resources, device, index, options)
    gpu_index.referenced_resources = resources  # keep the resources alive with the index (FAISS's own idiom)
    log.info("FAISS index on GPU %d (scratch memory %d MB)", device, temp_memory_bytes >> 20)
    return gpu_index


def place(index: faiss.Index, device: str, *, gpu_device: int = 0,
          temp_memory_bytes: int = DEFAULT_GPU_TEMP_MEMORY) -> faiss.Index:
    """The index where `device` (auto|cpu|gpu) says: "gpu" raises GpuUnavailableError when it cannot be
    done; "auto" uses the GPU when FAISS can, else stays on the CPU."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu":
        return index
    reason = gpu_unavailable()
    moved = to_gpu(index, gpu_device, temp_memory_bytes) if reason is None else None
    if moved is not None:
        return moved
    if reason is None:
        reason = f"FAISS has no GPU version of a {type(faiss.downcast_index(index)).__name__} (use flat or ivf-pq)"
    if device == "gpu":
        raise GpuUnavailableError(f"device gpu: {reason}")
    log.info("device auto: searching on the CPU (%s)", reason)
    return index


def set_threads(count: int) -> None:
    """FAISS uses OpenMP; in a server with several model instances, each should use a share of cores."""
    if count > 0:
        faiss.omp_set_num_threads(count)
