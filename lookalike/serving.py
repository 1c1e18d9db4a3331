"""Request-level rules shared by the Triton models, kept here so they are tested without Triton."""

from __future__ import annotations

import numpy as np

from lookalike_client import contract as c


def resolve_top_k(top_k: np.ndarray | None, rows: int) -> int:
    """The TOP_K of one request of `rows` embeddings. Missing (or, through an ensemble, empty) means
    the default; one request has one TOP_K; out of 1..1000 raises ValueError (-> INVALID_ARG)."""
    if top_k is None or top_k.size == 0:
        return c.DEFAULT_TOP_K
    values = np.unique(top_k.reshape(-1))
    if values.size != 1:
        raise ValueError(f"TOP_K must be the same for all {rows} images of a request, got {values.tolist()}")
    k = int(values[0])
    if not c.MIN_TOP_K <= k <= c.MAX_TOP_K:
        raise ValueError(f"TOP_K must be in {c.MIN_TOP_K}..{c.MAX_TOP_K}, got {k}")
    return k
