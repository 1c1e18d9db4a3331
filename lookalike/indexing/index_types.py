"""Which FAISS index a catalog gets: `lookalike index --index auto|flat|hnsw|ivf-pq`.

- flat: exact inner product; every query scans all vectors (N x D floats). Best up to tens of
  thousands of vectors, and the reference the others are measured against.
- hnsw: a graph (HNSW, M links a node) over the full vectors; no training, memory about
  N x (4 D + 8 M) bytes, recall set at search time by efSearch.
- ivf-pq: an inverted file of `nlist` k-means cells, vectors compressed by product quantisation into
  `m` bytes each; needs training, memory about N x m bytes, recall set at search time by nprobe.

`auto` picks by the number of vectors (a product has one per image and catalog view) and says why.
The search-time parameters recorded here are the version's defaults; `product_search`'s config
parameters `ef_search` and `nprobe` override them without a rebuild (`lookalike.serving.search`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

KINDS = ("auto", "flat", "hnsw", "ivf-pq")
# auto: exact search up to this many vectors (at 1280-d, one core scans ~50k vectors in ~15-30 ms)...
AUTO_FLAT_MAX = 50_000
# ...HNSW up to this many (its full vectors and graph fit in memory: ~5.3 KB a 1280-d vector)...
AUTO_HNSW_MAX = 2_000_000
# ...and IVF-PQ beyond.
DEFAULT_HNSW_M = 32
# HNSW's recall at a given efSearch falls as the graph grows (`make bench-index`, ten vectors a product,
# product recall@10 at 10^6 vectors: 0.90 at 128, 0.97 at 256), so the default grows with the catalog.
DEFAULT_EF_SEARCH = 128  # up to EF_SEARCH_FLAT_UNTIL vectors
EF_SEARCH_FLAT_UNTIL = 250_000
MAX_DEFAULT_EF_SEARCH = 512
DEFAULT_NPROBE = 32
PQ_DIMS_PER_BYTE = 16  # default m = D / 16 sub-quantisers of 8 bits (80 bytes a 1280-d vector)
TRAIN_POINTS_PER_CELL = 39  # FAISS's k-means wants at least this many points per centroid
PQ_CENTROIDS = 256  # centroids of each 8-bit product-quantisation code book


@dataclass(frozen=True)
class IndexChoice:
    kind: str  # flat | hnsw | ivf-pq
    factory: str  # FAISS index_factory string (metric: inner product)
    reason: str  # why this kind (auto) or "asked for"
    search: dict[str, int] = field(default_factory=dict)  # efSearch / nprobe defaults of the version


def default_nlist(vectors: int) -> int:
    """About 4 sqrt(N) cells, with enough training points for each."""
    return max(1, min(int(4 * math.sqrt(max(vectors, 1))), vectors // TRAIN_POINTS_PER_CELL))


def default_ef_search(vectors: int) -> int:
    """128 up to 250,000 vectors, then with sqrt(N) in steps of 32 (256 at 10^6), at most 512."""
    grown = 32 * round(DEFAULT_EF_SEARCH / 32 * math.sqrt(max(vectors, 1) / EF_SEARCH_FLAT_UNTIL))
    return int(min(MAX_DEFAULT_EF_SEARCH, max(DEFAULT_EF_SEARCH, grown)))


def default_m(dim: int) -> int:
    """The largest divisor of `dim` not above dim / PQ_DIMS_PER_BYTE (FAISS needs m | D)."""
    target = max(1, dim // PQ_DIMS_PER_BYTE)
    return max(d for d in range(1, target + 1) if dim % d == 0)


def choose(kind: str, vectors: int, dim: int, *, hnsw_m: int | None = None, ef_search: int | None = None,
           nlist: int | None = None, m: int | None = None, nprobe: int | None = None) -> IndexChoice:
    """The index for `vectors` vectors of `dim`; ValueError for an unknown kind or impossible settings."""
    if kind not in KINDS:
        raise ValueError(f"--index must be one of {', '.join(KINDS)}, got {kind!r}")
    reason = "asked for"
    if kind == "auto":
        if vectors <= AUTO_FLAT_MAX:
            kind, reason = "flat", f"{vectors:,} vectors <= {AUTO_FLAT_MAX:,}: exact search is fast enough"
        elif vectors <= AUTO_HNSW_MAX:
            kind, reason = "hnsw", (f"{vectors:,} vectors > {AUTO_FLAT_MAX:,}: a graph index answers far faster than "
                                    f"a scan, and its full vectors still fit in memory (<= {AUTO_HNSW_MAX:,})")
        else:
            kind, reason = "ivf-pq", (f"{vectors:,} vectors > {AUTO_HNSW_MAX:,}: compressed vectors (IVF-PQ) keep "
                                      "the index in memory")
    if kind == "flat":
        return IndexChoice("flat", "Flat", reason)
    if kind == "hnsw":
        links = hnsw_m or DEFAULT_HNSW_M
        if links < 4:
            raise ValueError(f"--hnsw-m must be >= 4, got {links}")
        return IndexChoice("hnsw", f"HNSW{links}", reason, {"efSearch": ef_search or default_ef_search(vectors)})
    cells = nlist or default_nlist(vectors)
    codes = m or default_m(dim)
    if dim % codes:
        raise ValueError(f"--ivfpq-m must divide the embedding dim {dim}, got {codes}")
    needed = max(cells, PQ_CENTROIDS) * TRAIN_POINTS_PER_CELL  # k-means of the cells and of each 8-bit code book
    if vectors < needed:
        raise ValueError(f"ivf-pq needs training data: {vectors:,} vectors is too few for {cells} cells and 8-bit "
                         f"codes (at least {needed:,}); use flat or hnsw")
    return IndexChoice("ivf-pq", f"IVF{cells},PQ{codes}", reason, {"nprobe": min(nprobe or DEFAULT_NPROBE, cells)})
