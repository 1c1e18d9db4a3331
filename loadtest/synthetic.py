"""Synthetic catalog-like embeddings for the index benchmarks (numpy only, so that a machine without
FAISS or lookalike's dependencies can use them: `gpu_topk.py` on a GPU host).

The vectors: product families in random directions of D dimensions, each product a tight group of
vectors (its images and catalog views) near its family; queries are fresh vectors near random
products, like a shopper's photo of one. Synthetic: real embeddings' neighbourhoods differ.
"""

from __future__ import annotations

import numpy as np


def catalog_like(n: int, dim: int, families: int, group: int, seed: int, queries: int = 0,
                 among: np.ndarray | None = None) -> np.ndarray:
    """Unit vectors shaped like a catalog's: `families` of products (random directions), each product
    a group of `group` vectors close together (its images and views) near its family's direction.
    With `queries`, that many fresh vectors near random products (a shopper's photo of one)."""
    rng = np.random.default_rng(0)  # the same families and products for the catalog and its queries
    centres = rng.standard_normal((families, dim)).astype(np.float32)
    products = max(1, n // group)
    owner = rng.integers(0, families, products)
    unit_noise = 1.0 / np.sqrt(dim)
    product_dirs = centres[owner] / np.linalg.norm(centres[owner], axis=1, keepdims=True)
    product_dirs += 0.9 * unit_noise * rng.standard_normal((products, dim)).astype(np.float32)
    product_dirs /= np.linalg.norm(product_dirs, axis=1, keepdims=True)
    draw = np.random.default_rng(seed)
    count = queries or n
    pool = np.arange(products) if among is None else among  # queries near these products only
    which = pool[draw.integers(0, len(pool), count)] if queries else np.repeat(np.arange(products), group)[:count]
    out = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, 50_000):  # in chunks: 10^6 x 1280 floats is 5 GB already
        stop = min(count, start + 50_000)
        x = product_dirs[which[start:stop]] + 0.4 * unit_noise * draw.standard_normal((stop - start, dim)).astype(np.float32)
        out[start:stop] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def families_of(n: int, dim: int, families: int, group: int) -> np.ndarray:
    """The family of each of `catalog_like`'s n catalog vectors (its draws, replayed)."""
    rng = np.random.default_rng(0)
    rng.standard_normal((families, dim)).astype(np.float32)
    owner = rng.integers(0, families, max(1, n // group))
    return np.repeat(owner, group)[:n]


def categories_for(n: int, dim: int, families: int, group: int, shares: list[float]) -> tuple[list[str], dict[str, float]]:
    """A category per vector (= product here), by family, like a real catalog's: category "s<pct>"
    holds about `share` of the families; the rest are "other"."""
    family = families_of(n, dim, families, group)
    names = np.full(n, "other", dtype=object)
    first = 0
    actual = {}
    for share in shares:
        count = max(1, round(share * families))
        name = f"{share:.0%}"
        names[(family >= first) & (family < first + count)] = name
        actual[name] = float(np.mean(names == name))
        first += count
    return [str(v) for v in names], actual
