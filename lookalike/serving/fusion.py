"""How the views of one query photo score a catalog product: the server's fusion, used by `product_search`
(both search backends) and by `lookalike eval`.

A query photo is embedded as V views (lookalike.serving.query_views). Each view is searched on its own and
scores a product by its best vector (a product holds its packshot and its catalog views), then
the product's V view scores make one:

- "max": its best view. Exact from the per-view lists of the top k: a product in the top k by its
  best view is in that view's own top k, since every product above it there is above it here too.
- "mean_top2": the mean of its two best views: a product that two framings agree on beats one that a
  single view happens to like. Each view is searched deeper (`depth`), and a product missing from a
  view's list takes that list's lowest score, an upper bound of what it would have had.

With one view both are that view's own scores.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

FUSIONS = ("max", "mean_top2")


def depth(k: int, views: int, fusion: str) -> int:
    """How many products to ask of each view's search for the fused top `k`."""
    if views == 1 or fusion == "max":
        return k
    return k + max(k, 10)


def fuse(ids: Sequence[Sequence[str]], scores: Sequence[np.ndarray], k: int, fusion: str) -> tuple[list[str], np.ndarray]:
    """One query's fused top `k`: `ids[v]` and `scores[v]` are view v's products, best first (one entry
    per product); returns the products and their fused scores, best first (ties by first seen)."""
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    if len(ids) == 1:
        return list(ids[0][:k]), np.asarray(scores[0][:k], dtype=np.float32)
    position: dict[str, int] = {}
    for view_ids in ids:
        for pid in view_ids:
            position.setdefault(pid, len(position))
    if not position:
        return [], np.zeros(0, dtype=np.float32)
    table = np.full((len(position), len(ids)), -np.inf, dtype=np.float64)
    for v, (view_ids, view_scores) in enumerate(zip(ids, scores)):
        if fusion != "max" and len(view_scores):
            table[:, v] = float(np.min(view_scores))  # missing: at most the list's lowest score
        for pid, score in zip(view_ids, view_scores):
            table[position[pid], v] = float(score)
    if fusion == "max":
        fused = table.max(axis=1)
    else:
        best_two = -np.sort(-table, axis=1)[:, :2]
        best_two = np.where(np.isfinite(best_two), best_two, best_two[:, :1])  # a view with no list at all
        fused = best_two.mean(axis=1)
    order = np.argsort(-fused, kind="stable")[:k]
    names = list(position)
    return [names[i] for i in order], fused[order].astype(np.float32)
