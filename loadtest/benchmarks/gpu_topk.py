"""Exact top-10 over N x D catalog embeddings on a GPU, with whatever the machine has (torch or cupy),
against the same work on its CPU (numpy matmul + partial sort), in one run: what a flat index gains
from a GPU, measured without FAISS (the GPU hosts lent to this project have torch and cupy, no FAISS).

    python -m loadtest.benchmarks.gpu_topk --vectors 1000000 --out results/gpu_topk

For each library and precision: queries/s at batch 1 and 64, p50 latency, recall@10 against the CPU's
float32 result, the device memory the catalog takes. Timings synchronise the device before reading the
clock. Numpy only at import; torch and cupy are imported when present. Needs no FAISS and no lookalike
package: `synthetic.py` (beside it) makes the same catalog-like vectors as `bench_index.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from loadtest.synthetic import catalog_like

K = 10
Search = Callable[[np.ndarray], np.ndarray]  # queries (B x D, float32, host) -> top-K positions (B x K, host)


def topk_numpy(catalog: np.ndarray, queries: np.ndarray, k: int = K) -> np.ndarray:
    """The exact top-k positions by inner product, best first (the CPU reference)."""
    scores = queries @ catalog.T
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def torch_search(catalog: np.ndarray, device: str, half: bool) -> tuple[Search, int, Callable[[], None]]:
    """(search, bytes the catalog takes on the device, synchronise) with torch: matmul + topk."""
    import torch

    dtype = torch.float16 if half else torch.float32
    on_device = torch.from_numpy(catalog).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def search(queries: np.ndarray) -> np.ndarray:
        q = torch.from_numpy(queries).to(device=device, dtype=dtype, non_blocking=True)
        return (q @ on_device.T).topk(K, dim=1).indices.cpu().numpy()

    return search, on_device.element_size() * on_device.nelement(), sync


def cupy_search(catalog: np.ndarray, half: bool) -> tuple[Search, int, Callable[[], None]]:
    """The same with cupy: matmul (cuBLAS), argpartition, then the k best sorted."""
    import cupy as cp  # pyright: ignore[reportMissingImports] - only on GPU hosts

    dtype = cp.float16 if half else cp.float32
    on_device: Any = cp.asarray(catalog, dtype=dtype)

    def search(queries: np.ndarray) -> np.ndarray:
        scores = cp.asarray(queries, dtype=dtype) @ on_device.T
        part = cp.argpartition(-scores, K - 1, axis=1)[:, :K]
        order = cp.argsort(-cp.take_along_axis(scores, part, axis=1), axis=1)
        return cp.asnumpy(cp.take_along_axis(part, order, axis=1))

    return search, int(on_device.nbytes), cp.cuda.runtime.deviceSynchronize


def measure(search: Search, sync: Callable[[], None], queries: np.ndarray, batch: int, seconds: float) -> dict[str, float]:
    """Queries/s and p50 ms of one call at `batch` queries a call, after a warm-up call."""
    search(queries[:batch])
    sync()
    latencies: list[float] = []
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or not latencies:
        chunk = queries[(done % len(queries)) : (done % len(queries)) + batch]
        t = time.perf_counter()
        search(chunk)
        sync()  # the results are on the host already; this only keeps queued work from leaking into the next call
        latencies.append(time.perf_counter() - t)
        done += len(chunk)
    return {"qps": round(done / (time.perf_counter() - started), 1), "p50_ms": round(1000 * statistics.median(latencies), 2)}


def recall(got: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(t)) / len(t) for g, t in zip(got.tolist(), truth.tolist())]))


def available(names: list[str]) -> list[tuple[str, str]]:
    """(library, device) pairs that can run here; the reason each other one cannot is printed."""
    found: list[tuple[str, str]] = []
    for name in names:
        if name == "numpy":
            found.append(("numpy", "cpu"))
        elif name == "torch":
            try:
                import torch
            except ImportError as exc:
                print(f"torch: not installed ({exc})")
                continue
            if torch.cuda.is_available():
                found.append(("torch", "cuda"))
            else:
                print("torch: no CUDA device visible")
        elif name == "cupy":
            try:
                import cupy as cp  # pyright: ignore[reportMissingImports]

                if cp.cuda.runtime.getDeviceCount() > 0:
                    found.append(("cupy", "cuda"))
            except Exception as exc:  # ImportError, or CUDA's own error where no device is usable
                print(f"cupy: cannot run ({type(exc).__name__}: {exc})")
    return found


def gpu_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except ImportError:
        return "unknown (no torch)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--families", type=int, default=1000)
    parser.add_argument("--group", type=int, default=10)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--seconds", type=float, default=5.0, help="per throughput measurement")
    parser.add_argument("--libraries", nargs="+", default=["torch", "cupy", "numpy"], choices=["torch", "cupy", "numpy"])
    parser.add_argument("--out", type=Path, default=Path("results/gpu_topk"))
    args = parser.parse_args()

    started = time.perf_counter()
    catalog = catalog_like(args.vectors, args.dim, args.families, args.group, seed=0)
    queries = catalog_like(args.vectors, args.dim, args.families, args.group, seed=1, queries=args.queries)
    print(f"{args.vectors:,} x {args.dim} catalog and {args.queries} queries made in {time.perf_counter() - started:.0f} s", flush=True)
    truth = np.concatenate([topk_numpy(catalog, queries[i : i + 64]) for i in range(0, len(queries), 64)])

    rows: list[dict[str, Any]] = []
    for library, device in available(args.libraries):
        for half in (False, True) if device == "cuda" else (False,):
            if library == "torch":
                search, nbytes, sync = torch_search(catalog, device, half)
            elif library == "cupy":
                search, nbytes, sync = cupy_search(catalog, half)
            else:
                search, nbytes, sync = (lambda q: topk_numpy(catalog, q)), catalog.nbytes, (lambda: None)
            got = np.concatenate([search(queries[i : i + 64]) for i in range(0, len(queries), 64)])
            row: dict[str, Any] = {"library": library, "device": device, "precision": "fp16" if half else "fp32",
                                   "catalog_mb": round(nbytes / 2**20), "recall_at_10": round(recall(got, truth), 4)}
            for batch in args.batches:
                row[f"batch{batch}"] = measure(search, sync, queries, batch, args.seconds)
            print(row, flush=True)
            rows.append(row)
            del search

    cpu = next((r for r in rows if r["library"] == "numpy"), None)
    for r in rows:
        for batch in args.batches:
            r[f"batch{batch}"]["vs_cpu"] = round(r[f"batch{batch}"]["qps"] / cpu[f"batch{batch}"]["qps"], 1) if cpu else None
    machine = {"cpu_count": os.cpu_count(), "gpu": gpu_name(), "platform": platform.platform(), "python": platform.python_version()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_topk.json").write_text(json.dumps({"machine": machine, "vectors": args.vectors, "dim": args.dim,
                                                         "rows": rows}, indent=2) + "\n")
    head = "| library | device | precision | catalog MB | recall@10 vs CPU fp32 | " + " | ".join(
        f"q/s batch {b} | p50 ms batch {b} | × CPU batch {b}" for b in args.batches) + " |"
    lines = [f"Exact top-{K} over {args.vectors:,} x {args.dim} (synthetic catalog-like), {args.queries} queries; "
             f"GPU: {machine['gpu']}; CPU: {os.cpu_count()} cores (numpy)", "", head,
             "|" + "---|" * 5 + "---:|---:|---:|" * len(args.batches)]
    for r in rows:
        lines.append(f"| {r['library']} | {r['device']} | {r['precision']} | {r['catalog_mb']} | {r['recall_at_10']:.4f} | " + " | ".join(
            f"{r[f'batch{b}']['qps']} | {r[f'batch{b}']['p50_ms']} | {r[f'batch{b}']['vs_cpu']}" for b in args.batches) + " |")
    table = "\n".join(lines)
    (args.out / "gpu_topk.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
