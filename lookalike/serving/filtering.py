"""Filtered search: a query row restricted to one category and/or with product ids excluded, answered
by the cheapest strategy that stays exact enough (an exact scan of the allowed vectors, the category's own
sub-index of a graph index, or the approximate index with an IDSelector and widened search), with an exact
pass for rows the approximate pass left short. `FilteredSearch` is the part of `ProductIndex`
(`lookalike.serving.search`) that does it; the thresholds are measured by `make bench-index`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

import faiss
import numpy as np

# Filtered search (`Filter`), measured by `make bench-index`: a filter that leaves at most this many
# vectors is answered by an exact scan of just those vectors (an IDSelector over the flat vectors, or
# every IVF cell): a few ms at 1280-d, and exact. Wider filters search the approximate index with the
# IDSelector and its efSearch / nprobe raised by 1 / (share of vectors allowed), up to these caps; a row
# that still comes back short of TOP_K is searched again by the exact scan, so a filtered query returns
# TOP_K products whenever that many match.
FILTER_SCAN_MAX_VECTORS = 20_000
FILTER_MAX_EF_SEARCH = 2048
STRATEGIES = ("auto", "selector", "scan")
# A graph (HNSW) searched with a selector explores the query's neighbourhood, which a photo from outside
# a large category mostly lies outside of: recall@10 fell to 0.80 for a 20 % category (`make bench-index`).
# So a graph index also gets one sub-index (the same factory) per category too large to scan and at most
# this share of the vectors (larger ones: the selector on the main graph loses little), built with the
# version: memory grows by at most that share of the index.
SUBINDEX_MAX_SHARE = 0.5
SUBINDEX_PREFIX = "category-"
# A compressed index re-ranks a filtered query's candidates from this many times the rows asked for: a
# filtered query is often far from its category, where PQ's approximate scores are close together (measured
# on 1280-d catalog-like vectors, 20 % category, queries mostly outside it: recall@10 0.85 / 0.93 / 0.97 /
# 0.99 at 32 / 64 / 128 / 256x), at most `search.RERANK_MAX` a query.
FILTERED_RERANK_FACTOR = 128


@dataclass(frozen=True)
class Filter:
    """What a query row may return: products of `category` only (None or "": any category), never the
    ids in `exclude` (ids that the index does not hold are ignored)."""

    category: str | None = None
    exclude: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.category) or bool(self.exclude)


NO_FILTER = Filter()
Hits = tuple[list[str], np.ndarray]  # one row's product ids and scores, best first


def build_subindexes(index: faiss.Index, factory: str, embeddings: np.ndarray, categories: Iterable[str],
                     positions_of: Callable[[str], np.ndarray]) -> dict[str, tuple[faiss.Index, np.ndarray]]:
    """A graph index's sub-indexes: one (the same factory) per category too large to scan and at most
    SUBINDEX_MAX_SHARE of the vectors (`positions_of`: a category's FAISS positions; "" (no category)
    is never a filter). Other index kinds have none."""
    if not isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
        return {}
    out = {}
    for category in sorted(c for c in categories if c):
        positions = positions_of(category)
        if FILTER_SCAN_MAX_VECTORS < len(positions) <= SUBINDEX_MAX_SHARE * index.ntotal:
            sub = faiss.index_factory(index.d, factory, faiss.METRIC_INNER_PRODUCT)
            sub.add(embeddings[positions])
            out[category] = (sub, positions)
    return out


class FilteredSearch:
    """The filtered half of `ProductIndex`: which products a filter allows and how its rows are searched."""

    index: faiss.Index
    cpu_index: faiss.Index
    vectors: np.ndarray
    scan_max_vectors: int
    subindexes: dict[str, tuple[faiss.Index, np.ndarray]]
    _cpu_inner: Any
    _flat_storage: faiss.IndexFlat | None
    _categories: dict[str, np.ndarray]
    _position: dict[str, int]
    _owner: np.ndarray

    if TYPE_CHECKING:  # ProductIndex's own search machinery, which the strategies share
        def __len__(self) -> int: ...
        def _faiss_params(self, rows: int, selector: Any = None, share: float = 1.0,
                          inner: Any = None) -> faiss.SearchParameters | None: ...
        def _fetch(self, rows: int, params: faiss.SearchParameters | None, ntotal: int | None = None) -> int: ...
        def _run(self, index: faiss.Index, queries: np.ndarray, rows: int,
                 params: Callable[[int], faiss.SearchParameters | None], factor: int = ...) -> tuple[np.ndarray, np.ndarray]: ...
        def _by_product(self, scores: np.ndarray, positions: np.ndarray, k_eff: int,
                        queries: np.ndarray | None = None) -> list[Hits]: ...

    def category_vectors(self, category: str) -> np.ndarray:
        """FAISS positions of a category's vectors, ascending."""
        mask = np.zeros(len(self), dtype=bool)
        mask[self._categories.get(category, np.zeros(0, np.int64))] = True
        return np.flatnonzero(mask[self._owner])

    def filter_path(self, f: Filter) -> str:
        """How a query with filter `f` is answered (strategy "auto"): none, scan, subindex or selector."""
        if not f:
            return "none"
        products = self.allowed(f)
        if isinstance(self._cpu_inner, faiss.IndexFlat) or int(self.vectors[products].sum()) <= self.scan_max_vectors:
            return "scan"
        return "subindex" if f.category in self.subindexes else "selector"

    def allowed(self, f: Filter) -> np.ndarray:
        """Positions of the products that `f` lets through (sorted)."""
        if f.category:
            members = self._categories.get(f.category)
            if members is None:
                return np.zeros(0, np.int64)
        else:
            members = np.arange(len(self))
        excluded = [self._position[pid] for pid in f.exclude if pid in self._position]
        return np.setdiff1d(members, excluded) if excluded else np.sort(members)

    def _search_filtered(self, queries: np.ndarray, k: int, f: Filter, strategy: str) -> list[Hits]:
        products = self.allowed(f)
        k_eff = min(k, len(products))
        if k_eff <= 0 or len(queries) == 0:
            return [([], np.zeros(0, np.float32)) for _ in range(len(queries))]
        mask = np.zeros(len(self), dtype=bool)
        mask[products] = True
        vector_mask = mask[self._owner]
        allowed_vectors = int(self.vectors[products].sum())
        bitmap = np.packbits(vector_mask, bitorder="little")
        selector = faiss.IDSelectorBitmap(len(vector_mask), faiss.swig_ptr(bitmap))
        rows = min(k_eff * int(self.vectors[products].max()), allowed_vectors)
        flat = isinstance(self._cpu_inner, faiss.IndexFlat)
        scan = strategy == "scan" or (strategy == "auto" and (flat or allowed_vectors <= self.scan_max_vectors))
        share = allowed_vectors / self.index.ntotal

        def exact(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            index, _ = self._exact_scan(selector, rows)
            return self._run(index, q, rows, lambda r: self._exact_scan(selector, r)[1], FILTERED_RERANK_FACTOR)

        sub = self.subindexes.get(f.category or "") if strategy == "auto" and not scan else None
        if scan:
            scores, positions = exact(queries)
        elif sub is not None:  # the category's own graph; exclusions by a selector over its positions
            sub_index, sub_positions = sub
            sub_mask = vector_mask[sub_positions]
            sub_bits = np.packbits(sub_mask, bitorder="little")
            sub_selector = None if sub_mask.all() else faiss.IDSelectorBitmap(len(sub_mask), faiss.swig_ptr(sub_bits))
            params = self._faiss_params(rows, sub_selector, float(sub_mask.mean()), inner=faiss.downcast_index(sub_index))
            scores, found = sub_index.search(queries, self._fetch(rows, params, sub_index.ntotal), params=params)
            positions = np.where(found >= 0, sub_positions[np.maximum(found, 0)], -1)
            del sub_bits
        else:
            scores, positions = self._run(self.cpu_index, queries, rows, lambda r: self._faiss_params(r, selector, share),
                                          FILTERED_RERANK_FACTOR)
        hits = self._by_product(scores, positions, k_eff, queries)
        short = [i for i, (ids, _) in enumerate(hits) if len(ids) < k_eff]
        if short and not scan and strategy == "auto":  # the approximate pass missed: search those rows exactly
            scores, positions = exact(queries[short])
            for i, h in zip(short, self._by_product(scores, positions, k_eff, queries[short])):
                hits[i] = h
        del bitmap  # the selector reads it until here
        return hits

    def _exact_scan(self, selector: Any, rows: int) -> tuple[faiss.Index, faiss.SearchParameters]:
        """An exact pass over the vectors a selector lets through: the flat vectors (a flat index, or an
        HNSW index's own storage) or, for IVF, every cell (exact up to PQ's compression)."""
        inner = self._cpu_inner
        storage = self._flat_storage
        if storage is not None:
            return storage, faiss.SearchParameters(sel=selector)  # pyright: ignore[reportCallIssue]
        if isinstance(inner, faiss.IndexIVF):
            return self.cpu_index, faiss.SearchParametersIVF(nprobe=int(inner.nlist), sel=selector)  # pyright: ignore[reportCallIssue]
        params = self._faiss_params(rows, selector, share=1e-6)
        assert params is not None
        return self.cpu_index, params
