"""How close an exported embedder is to its reference: the one cosine and the one gate of every export
check (ONNX Runtime vs torch, a TensorRT engine vs ONNX Runtime, FP16 vs FP32 on a GPU)."""

from __future__ import annotations

from typing import Any

import numpy as np

# Mean cosine an export must reach against its reference, by precision; below it nothing is written.
MIN_COSINE = {"fp32": 0.9999, "fp16": 0.999, "int8": 0.99}


class ParityError(RuntimeError):
    pass


def row_cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of `candidate` [N, D] with the same row of `reference`."""
    ref = np.asarray(reference, dtype=np.float64)
    got = np.asarray(candidate, dtype=np.float64)
    ref = ref / np.maximum(np.linalg.norm(ref, axis=1, keepdims=True), 1e-12)
    got = got / np.maximum(np.linalg.norm(got, axis=1, keepdims=True), 1e-12)
    return np.sum(ref * got, axis=1)


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict[str, Any]:
    """images, mean_cosine, min_cosine and max_abs_diff of `candidate` against `reference`."""
    cosine = row_cosines(reference, candidate)
    return {"images": int(len(cosine)), "mean_cosine": float(cosine.mean()), "min_cosine": float(cosine.min()),
            "max_abs_diff": float(np.abs(np.asarray(reference) - np.asarray(candidate)).max())}


def gate(report: dict[str, Any], precision: str, what: str) -> dict[str, Any]:
    """`report` with its threshold, or ParityError when its mean cosine is below MIN_COSINE[precision]."""
    threshold = MIN_COSINE[precision]
    if not report["mean_cosine"] >= threshold:
        raise ParityError(f"{what} fails parity: mean cosine {report['mean_cosine']:.6f} < {threshold}")
    return {**report, "threshold": threshold}
