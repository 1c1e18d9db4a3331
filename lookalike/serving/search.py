"""The product index: FAISS over L2-normalised embeddings, searched by inner product (= cosine).

FAISS positions are int64 and stay inside this module; callers see the catalog's own product ids.
`ProductIndex` is assembled from three parts: its files on disk (`lookalike.serving.index_files`: an index
version is a directory written once and never modified), filtered search (`lookalike.serving.filtering`)
and GPU placement (`lookalike.serving.gpu`). Here: building, unfiltered search, exact re-ranking of a
compressed index's candidates, one result per product, and search by product id (`similar`).

`product_search` serves one such directory per Triton model version (see `lookalike.indexing.repository`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

import faiss
import numpy as np

from lookalike.serving import filtering
from lookalike.serving.artifacts import INDEX_FILE, META_FILE, PRODUCTS_FILE, VECTORS_FILE, IndexMeta
from lookalike.serving.errors import RequestError
from lookalike.serving.filtering import (
    FILTER_MAX_EF_SEARCH,
    NO_FILTER,
    STRATEGIES,
    SUBINDEX_PREFIX,
    Filter,
    FilteredSearch,
    Hits,
    build_subindexes,
)
from lookalike.serving.gpu import DEFAULT_GPU_TEMP_MEMORY, place
from lookalike.serving.index_files import CorruptIndexError, IndexFiles, Product, read_index_dir, write_index_dir
from lookalike_client import contract as c

# A compressed index (IVF-PQ) ranks by approximate scores: it fetches this many times the candidates
# asked for (a filtered query: `filtering.FILTERED_RERANK_FACTOR`), at most RERANK_MAX a query, and the
# stored embeddings (memory-mapped) re-rank them exactly.
RERANK_FACTOR = 4
RERANK_MAX = 4096


class UnknownProductError(RequestError):
    """A product id that the served index does not hold (similar_products: INVALID_ARGUMENT naming it,
    starting with `contract.UNKNOWN_PRODUCT`)."""


class ProductIndex(FilteredSearch):
    def __init__(self, index: faiss.Index, products: Sequence[Product], meta: IndexMeta,
                 vectors: Sequence[int] | None = None, *, stored: np.ndarray | None = None,
                 cpu_index: faiss.Index | None = None, subindexes: dict[str, faiss.Index] | None = None) -> None:
        counts = np.ones(len(products), dtype=np.int64) if vectors is None else np.asarray(vectors, dtype=np.int64)
        if len(counts) != len(products) or (len(counts) and counts.min() < 1):
            raise ValueError(f"need one vector count >= 1 per product ({len(counts)} counts, {len(products)} products)")
        if index.ntotal != int(counts.sum()):
            raise ValueError(f"index holds {index.ntotal} vectors but its {len(products)} products have {int(counts.sum())}")
        if stored is not None and (stored.ndim != 2 or stored.shape[0] != index.ntotal or stored.shape[1] != index.d):
            raise ValueError(f"stored embeddings {list(stored.shape)} do not match the index's {index.ntotal} x {index.d}")
        self.index = index
        self.cpu_index = cpu_index if cpu_index is not None else index  # filters and scans run here (see below)
        self.products = list(products)
        self.vectors = counts
        self.stored = stored  # the catalog embeddings (memory-mapped when loaded): search by product id
        self._ids = np.array([p.product_id for p in self.products], dtype=object)
        self._position = {p.product_id: i for i, p in enumerate(self.products)}
        self._owner = np.repeat(np.arange(len(products)), counts)  # FAISS position -> product position
        self._starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64) if len(counts) else counts
        self._max_vectors = int(counts.max()) if len(counts) else 1
        categories = np.array([p.category for p in self.products], dtype=object)
        self._categories: dict[str, np.ndarray] = {}
        if len(categories):
            names, inverse = np.unique(categories.astype(str), return_inverse=True)
            order = np.argsort(inverse, kind="stable")
            bounds = np.searchsorted(inverse[order], np.arange(len(names) + 1))
            self._categories = {str(name): order[bounds[i] : bounds[i + 1]] for i, name in enumerate(names)}
        self.meta = meta
        # category -> (its sub-index, the FAISS positions of its vectors in the main index, ascending)
        self.subindexes: dict[str, tuple[faiss.Index, np.ndarray]] = {}
        for category, sub in (subindexes or {}).items():
            positions = self.category_vectors(category)
            if sub.ntotal != len(positions):
                raise ValueError(f"sub-index of category {category!r} holds {sub.ntotal} vectors, the category {len(positions)}")
            self.subindexes[category] = (sub, positions)
        self._inner = faiss.downcast_index(index)  # IndexHNSWFlat, IndexIVFPQ, ...: what search parameters apply
        self._cpu_inner = faiss.downcast_index(self.cpu_index)
        # An HNSW index's full vectors (IndexHNSWFlat), which FAISS scores by position in C++: exact scans
        # and the exact scores of candidate products.
        storage = faiss.downcast_index(self._cpu_inner.storage) if isinstance(self._cpu_inner, faiss.IndexHNSW) else None
        self._flat_storage: faiss.IndexFlat | None = storage if isinstance(storage, faiss.IndexFlat) else None
        gpu: Any = faiss  # GpuIndex exists only in GPU builds
        self.on_gpu = hasattr(gpu, "GpuIndex") and isinstance(index, gpu.GpuIndex)
        self.search_params: dict[str, int] = dict(meta.search)
        self.scan_max_vectors = filtering.FILTER_SCAN_MAX_VECTORS  # filters that leave at most this many vectors: exact
        self._apply_gpu_params()

    def _apply_gpu_params(self) -> None:
        """A GPU IVF index takes nprobe as a setting (per-call parameters are the CPU indexes')."""
        if self.on_gpu and "nprobe" in self.search_params and hasattr(self.index, "nprobe"):
            gpu: Any = faiss
            gpu.GpuParameterSpace().set_index_parameter(self.index, "nprobe", self.search_params["nprobe"])

    def set_search_params(self, *, ef_search: int | None = None, nprobe: int | None = None,
                          filter_scan_max_vectors: int | None = None) -> None:
        """Overrides of the version's search-time defaults (product_search's config parameters)."""
        for name, value in (("efSearch", ef_search), ("nprobe", nprobe)):
            if value is not None:
                if value < 1:
                    raise ValueError(f"{name} must be >= 1, got {value}")
                self.search_params[name] = int(value)
        if filter_scan_max_vectors is not None:
            if filter_scan_max_vectors < 0:
                raise ValueError(f"filter_scan_max_vectors must be >= 0, got {filter_scan_max_vectors}")
            self.scan_max_vectors = int(filter_scan_max_vectors)
        self._apply_gpu_params()

    @property
    def device(self) -> str:
        return "gpu" if self.on_gpu else "cpu"

    @property
    def kind(self) -> str:
        """flat, hnsw, ivf-pq or ivf, from the FAISS class (IndexIVFPQ and GpuIndexIVFPQ alike)."""
        name = type(self._inner).__name__
        return "hnsw" if "HNSW" in name else "ivf-pq" if "IVFPQ" in name else "ivf" if "IVF" in name else "flat"

    def _faiss_params(self, rows: int, selector: Any = None, share: float = 1.0,
                      inner: Any = None) -> faiss.SearchParameters | None:
        """Per-call search parameters (the version's, else the FAISS index's own): HNSW explores at least as
        many candidates as rows asked for; with a `selector` that lets `share` of the vectors through,
        efSearch and nprobe grow by 1 / share (capped), so that the graph or the cells still hold enough
        allowed vectors."""
        inner = self._cpu_inner if inner is None else inner
        boost = 1.0 / max(share, 1e-6)
        if isinstance(inner, faiss.IndexHNSW):
            ef = max(self.search_params.get("efSearch", int(inner.hnsw.efSearch)), rows)
            ef = max(ef, min(int(ef * boost), FILTER_MAX_EF_SEARCH)) if selector is not None else ef
            return faiss.SearchParametersHNSW(efSearch=ef, sel=selector)  # pyright: ignore[reportAttributeAccessIssue] - SWIG
        if isinstance(inner, faiss.IndexIVF):
            nprobe = self.search_params.get("nprobe", int(inner.nprobe))
            nprobe = min(int(inner.nlist), int(np.ceil(nprobe * boost))) if selector is not None else nprobe
            return faiss.SearchParametersIVF(nprobe=nprobe, sel=selector)  # pyright: ignore[reportCallIssue] - SWIG
        return faiss.SearchParameters(sel=selector) if selector is not None else None  # pyright: ignore[reportCallIssue]

    # -- properties ------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def fingerprint(self) -> str:
        return self.meta.embedder_fingerprint

    @property
    def categories(self) -> dict[str, int]:
        """Products per category."""
        return {name: len(members) for name, members in self._categories.items()}

    def __len__(self) -> int:
        return len(self.products)

    def __contains__(self, product_id: object) -> bool:
        return product_id in self._position

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
        keep_embeddings: bool = True,
    ) -> "ProductIndex":
        """Builds an inner-product index. `embeddings` [R, D] must be L2-normalised (the embedder's
        output is). `vectors[i]` is how many consecutive rows belong to product i (default one each:
        R = N). `dim` is required only for an empty catalog. The embeddings are kept (and saved beside
        the index) for search by product id and incremental updates, unless `keep_embeddings` is False."""
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
        built = cls(index, products, IndexMeta.new(dim=d, count=len(products), vectors=rows, factory=factory,
                                                   embedder_fingerprint=embedder_fingerprint, search=search),
                    vectors, stored=embeddings if keep_embeddings else None)
        built.subindexes = build_subindexes(index, factory, embeddings, built._categories, built.category_vectors)
        names = {category: f"{SUBINDEX_PREFIX}{i}.faiss" for i, category in enumerate(sorted(built.subindexes))}
        if names:
            built.meta = dataclasses.replace(built.meta, subindexes=names)
        return built

    # -- persistence -----------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        subindexes = {category: sub for category, (sub, _) in self.subindexes.items()}
        write_index_dir(directory, IndexFiles(self.cpu_index, self.products, self.vectors.tolist(), self.meta, subindexes,
                                              self.stored))

    @classmethod
    def load(cls, directory: str | Path, *, device: str = "cpu", gpu_device: int = 0,
             gpu_temp_memory_bytes: int = DEFAULT_GPU_TEMP_MEMORY) -> "ProductIndex":
        """Loads an index directory after `check_index_dir`, so a damaged file is refused with a reason
        before FAISS parses it; `device` auto|cpu|gpu (see `place`). The stored embeddings are
        memory-mapped, not read: only the rows that search by product id touches are paged in."""
        files = read_index_dir(directory)
        meta = files.meta
        placed = place(files.index, device, gpu_device=gpu_device, temp_memory_bytes=gpu_temp_memory_bytes)
        try:
            loaded = cls(placed, files.products, meta, files.vectors, stored=files.stored, cpu_index=files.index,
                         subindexes=files.subindexes)
        except ValueError as exc:
            raise CorruptIndexError(f"{INDEX_FILE}, {PRODUCTS_FILE} and {VECTORS_FILE} disagree: {exc}") from None
        if len(loaded) != meta.count or loaded.dim != meta.dim:
            raise CorruptIndexError(f"{INDEX_FILE} holds {len(loaded)} x {loaded.dim}, {META_FILE} says "
                                    f"{meta.count} x {meta.dim}")
        return loaded

    # -- search ----------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, filters: Sequence[Filter] | Filter | None = None, *,
               strategy: str = "auto") -> tuple[list[list[str]], list[np.ndarray]]:
        """[N, D] queries -> (N lists of product ids, N float32 score arrays), best first, at most
        min(k, products allowed) each. Scores are cosine similarities for normalised queries.

        `filters`: one `Filter` for all rows or one per row. A filtered row holds min(k, products that
        match) products (see FILTER_SCAN_MAX_VECTORS, `scan_max_vectors`); an unknown category matches none. `strategy`
        (benchmarks): "selector" never falls back to the exact scan, "scan" always uses it.

        Rows are independent: an approximate index that finds fewer than k neighbours for one unfiltered
        row (FAISS marks the gaps with position -1) returns fewer items for that row only. Callers must
        refuse non-finite queries first (`lookalike.serving.product_search`): FAISS ranks NaN scores arbitrarily."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [N, {self.dim}], got {list(queries.shape)}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        n = queries.shape[0]
        row_filters = [filters or NO_FILTER] * n if filters is None or isinstance(filters, Filter) else list(filters)
        if len(row_filters) != n:
            raise ValueError(f"{len(row_filters)} filters for {n} queries")
        out: list[Hits] = [([], np.zeros(0, np.float32))] * n
        groups: dict[Filter, list[int]] = {}
        for row, f in enumerate(row_filters):
            groups.setdefault(f if f else NO_FILTER, []).append(row)
        for f, members in groups.items():
            hits = self._search_filtered(queries[members], int(k), f, strategy) if f else self._search_all(queries[members], int(k))
            for row, h in zip(members, hits):
                out[row] = h
        return [h[0] for h in out], [h[1] for h in out]

    def _search_all(self, queries: np.ndarray, k: int) -> list[Hits]:
        k_eff = min(k, len(self))
        if k_eff <= 0 or len(queries) == 0:
            return [([], np.zeros(0, np.float32)) for _ in range(len(queries))]
        rows = min(k_eff * self._max_vectors, self.index.ntotal)
        rows = self._fetch(rows, self._faiss_params(rows, inner=self._inner))
        scores, positions = self._run(self.index, queries, rows, lambda r: self._faiss_params(r, inner=self._inner))
        return self._by_product(scores, positions, k_eff, queries)

    def _fetch(self, rows: int, params: faiss.SearchParameters | None, ntotal: int | None = None) -> int:
        """How many results to ask FAISS for: a graph search explores efSearch candidates whatever k is,
        so all of them are taken (more candidate products for `_by_product` to score exactly)."""
        ef = getattr(params, "efSearch", 0)  # SearchParametersHNSW; others have none
        return min(max(rows, int(ef)), self.index.ntotal if ntotal is None else ntotal)

    @property
    def reranks(self) -> bool:
        """Whether searches re-rank a compressed index's candidates with the stored embeddings."""
        return self.stored is not None and isinstance(self._cpu_inner, (faiss.IndexIVFPQ, faiss.IndexPQ))

    def _run(self, index: faiss.Index, queries: np.ndarray, rows: int,
             params: Callable[[int], faiss.SearchParameters | None], factor: int = RERANK_FACTOR) -> tuple[np.ndarray, np.ndarray]:
        """index.search for `rows` results a query; a compressed index fetches `factor` times more
        candidates and returns the `rows` best by exact inner product with the stored embeddings."""
        if not self.reranks or index is not self.index and index is not self.cpu_index:
            return index.search(queries, rows, params=params(rows))
        wide = min(self.index.ntotal, max(rows * RERANK_FACTOR, min(rows * factor, RERANK_MAX)))
        _, positions = index.search(queries, wide, params=params(wide))
        assert self.stored is not None
        exact = np.full(positions.shape, -np.inf, dtype=np.float32)
        for r, (query, row) in enumerate(zip(queries, positions)):
            keep = row >= 0
            found = row[keep]
            order = np.argsort(found)  # sorted reads of the memory-mapped file
            vectors = np.asarray(self.stored[found[order]], dtype=np.float32)
            scores = np.empty(len(found), np.float32)
            scores[order] = vectors @ query
            exact[r, keep] = scores
        best = np.argsort(-exact, axis=1, kind="stable")[:, :rows]
        scores = np.take_along_axis(exact, best, axis=1)
        positions = np.where(np.isfinite(scores), np.take_along_axis(positions, best, axis=1), -1)
        return np.where(np.isfinite(scores), scores, np.float32(-3.4e38)).astype(np.float32), positions

    @property
    def rescores(self) -> bool:
        """Whether `_by_product` scores candidate products exactly: products of several vectors, an index
        whose results can miss a product's best vector (not flat), and the vectors at hand (a graph's own
        flat storage, or the stored embeddings)."""
        return self._max_vectors > 1 and not isinstance(self._cpu_inner, faiss.IndexFlat) and (
            self._flat_storage is not None or self.stored is not None)

    def _by_product(self, scores: np.ndarray, positions: np.ndarray, k_eff: int,
                    queries: np.ndarray | None = None) -> list[Hits]:
        """FAISS rows (best first, gaps -1 at the end) -> each row's best k_eff products, each listed once
        with its best vector's score.

        With `queries` and `rescores`, every product that any found vector belongs to is a candidate,
        scored exactly by the best of all its vectors: an approximate search that reached a product by
        one of its images, but not its best one, no longer ranks it too low, and a product is found when
        any of its images is. Measured (10^6 vectors, ten a product, HNSW32 on 2 cores): product
        recall@10 0.85 -> 0.90 at efSearch 128 and 0.92 -> 0.97 at 256."""
        if queries is not None and self.rescores:
            return self._rescored(queries, positions, k_eff)
        out: list[Hits] = []
        for row_scores, row_positions in zip(scores, positions):
            keep = row_positions >= 0
            if self._max_vectors == 1:
                first = np.arange(int(keep.sum()))[:k_eff]
                owners = row_positions[keep]
            else:
                owners = self._owner[row_positions[keep]]
                _, first = np.unique(owners, return_index=True)  # each owner's best (first) hit
                first = np.sort(first)[:k_eff]
            out.append((list(self._ids[owners[first]]), np.ascontiguousarray(row_scores[keep][first], dtype=np.float32)))
        return out

    def _rescored(self, queries: np.ndarray, positions: np.ndarray, k_eff: int) -> list[Hits]:
        """Each row's best k_eff of the products owning its found positions, each scored by its best vector."""
        rows = []  # per query: (candidate products ascending, where each one's vectors start in `wanted`, wanted)
        for row in positions:
            owners = np.unique(self._owner[row[row >= 0]])
            counts = self.vectors[owners]
            offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
            wanted = np.repeat(self._starts[owners] - offsets, counts) + np.arange(int(counts.sum()))
            rows.append((owners, offsets, wanted))
        width = max([len(wanted) for _, _, wanted in rows] + [1])
        labels = np.full((len(queries), width), -1, dtype=np.int64)
        for i, (_, _, wanted) in enumerate(rows):
            labels[i, : len(wanted)] = wanted
        exact = np.full((len(queries), width), -np.inf, dtype=np.float32)
        storage = self._flat_storage
        if storage is not None:  # in C++, straight from the graph's vectors
            queries = np.ascontiguousarray(queries, dtype=np.float32)
            storage.compute_distance_subset(  # pyright: ignore[reportAttributeAccessIssue] - SWIG
                len(queries), faiss.swig_ptr(queries), width, faiss.swig_ptr(exact), faiss.swig_ptr(labels))
        else:  # a compressed index: the stored embeddings (memory-mapped; ascending reads)
            assert self.stored is not None
            for i, (query, (_, _, wanted)) in enumerate(zip(queries, rows)):
                exact[i, : len(wanted)] = np.asarray(self.stored[wanted], dtype=np.float32) @ query
        out: list[Hits] = []
        for i, (owners, offsets, wanted) in enumerate(rows):
            if not len(owners):
                out.append(([], np.zeros(0, np.float32)))
                continue
            best = np.maximum.reduceat(exact[i, : len(wanted)], offsets)
            order = np.argsort(-best, kind="stable")[:k_eff]
            out.append((list(self._ids[owners[order]]), np.ascontiguousarray(best[order], dtype=np.float32)))
        return out

    # -- search by product -------------------------------------------------------------------------
    def product_vectors(self, product_id: str) -> np.ndarray:
        """The stored embeddings of a catalog product [its vectors, D]; UnknownProductError if the index
        does not hold it."""
        position = self._position.get(product_id)
        if position is None:
            raise UnknownProductError(f"{c.UNKNOWN_PRODUCT} {c.quoted(product_id)}: the served index (of {len(self)} products) "
                                      "does not hold it")
        start, count = int(self._starts[position]), int(self.vectors[position])
        if self.stored is not None:
            return np.array(self.stored[start : start + count], dtype=np.float32)
        try:  # versions written before the embeddings were stored: flat and HNSW indexes hold them
            return self.cpu_index.reconstruct_n(start, count)
        except RuntimeError:
            raise RuntimeError("this index version stores no embeddings to search by product: run `lookalike index` "
                               "again") from None

    def similar(self, product_ids: Sequence[str], k: int, filters: Sequence[Filter] | Filter | None = None
                ) -> tuple[list[list[str]], list[np.ndarray]]:
        """The k products most similar to each catalog product (by its stored embeddings, never itself):
        a candidate scores its best (query image, candidate image) pair, so a product with several
        images is matched by any of them. Raises UnknownProductError naming the first unknown id."""
        n = len(product_ids)
        row_filters = [filters or NO_FILTER] * n if filters is None or isinstance(filters, Filter) else list(filters)
        blocks = [self.product_vectors(pid) for pid in product_ids]
        own = [Filter(f.category, f.exclude | {pid}) for f, pid in zip(row_filters, product_ids)]
        queries = np.concatenate(blocks) if blocks else np.zeros((0, self.dim), np.float32)
        ids, scores = self.search(queries, k, [f for f, b in zip(own, blocks) for _ in range(len(b))])
        out_ids, out_scores, row = [], [], 0
        for block in blocks:
            best: dict[str, float] = {}
            for r in range(row, row + len(block)):
                for pid, score in zip(ids[r], scores[r].tolist()):
                    if score > best.get(pid, -np.inf):
                        best[pid] = score
            row += len(block)
            ranked = sorted(best.items(), key=lambda item: -item[1])[:k]
            out_ids.append([pid for pid, _ in ranked])
            out_scores.append(np.array([score for _, score in ranked], dtype=np.float32))
        return out_ids, out_scores


