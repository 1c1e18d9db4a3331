"""Benchmark of the index types (`lookalike index --index flat|hnsw|ivf-pq`) on synthetic clustered unit
vectors: build time, memory, size on disk, queries/s at batch 1 and 64, and recall@10 against exact
search, all through `lookalike.search.ProductIndex` (what product_search serves), in one run.

    .venv/bin/python loadtest/bench_index.py --sizes 100000 --out results

The vectors (`catalog_like`): product families in random directions of D = 1280, each product a tight
group of vectors (its images and catalog views) near its family; queries are fresh vectors near random
products, like a shopper's photo of one. Synthetic: real embeddings' neighbourhoods differ. Writes OUT/bench_index.json, .md and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from lookalike.index_types import choose
from lookalike.search import Product, ProductIndex, set_threads


def catalog_like(n: int, dim: int, families: int, group: int, seed: int, queries: int = 0) -> np.ndarray:
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
    which = draw.integers(0, products, count) if queries else np.repeat(np.arange(products), group)[:count]
    out = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, 50_000):  # in chunks: 10^6 x 1280 floats is 5 GB already
        stop = min(count, start + 50_000)
        x = product_dirs[which[start:stop]] + 0.4 * unit_noise * draw.standard_normal((stop - start, dim)).astype(np.float32)
        out[start:stop] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def queries_per_s(index: ProductIndex, queries: np.ndarray, batch: int, seconds: float) -> float:
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or done == 0:
        chunk = queries[(done % len(queries)) : (done % len(queries)) + batch]
        index.search(chunk, 10)
        done += len(chunk)
    return done / (time.perf_counter() - started)


def recall_at_10(index: ProductIndex, truth: list[list[str]], queries: np.ndarray) -> float:
    got, _ = index.search(queries, 10)
    return float(np.mean([len(set(g) & set(t)) / 10 for g, t in zip(got, truth)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--families", type=int, default=1000, help="product families (categories)")
    parser.add_argument("--group", type=int, default=10, help="vectors per product (images and views)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=5.0, help="per throughput measurement")
    parser.add_argument("--kinds", nargs="+", default=["flat", "hnsw", "ivf-pq"])
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    set_threads(os.cpu_count() or 1)

    rows = []
    for n in args.sizes:
        vectors = catalog_like(n, args.dim, args.families, args.group, seed=0)
        queries = catalog_like(n, args.dim, args.families, args.group, seed=1, queries=args.queries)
        products = [Product(f"p{i}") for i in range(n)]
        truth: list[list[str]] = []
        for kind in args.kinds:
            choice = choose(kind, n, args.dim)
            before = rss_mb()
            started = time.perf_counter()
            index = ProductIndex.build(products, vectors, factory=choice.factory, search=choice.search)
            build_s = time.perf_counter() - started
            memory = rss_mb() - before
            with tempfile.TemporaryDirectory() as tmp:
                index.save(tmp)
                disk = (Path(tmp) / "index.faiss").stat().st_size / 2**20
            if kind == "flat":
                truth, _ = index.search(queries, 10)
            elif not truth:
                truth, _ = ProductIndex.build(products, vectors).search(queries, 10)
            row = {
                "vectors": n, "kind": kind, "factory": choice.factory, "search": choice.search,
                "build_s": round(build_s, 1), "memory_mb": round(memory), "disk_mb": round(disk),
                "recall_at_10": round(recall_at_10(index, truth, queries), 3),
                "qps_batch1": round(queries_per_s(index, queries, 1, args.seconds), 1),
                "qps_batch64": round(queries_per_s(index, queries, 64, args.seconds), 1),
            }
            print(row, flush=True)
            rows.append(row)
            del index

    for row in rows:
        flat = next((r for r in rows if r["vectors"] == row["vectors"] and r["kind"] == "flat"), None)
        row["qps_vs_flat_batch1"] = round(row["qps_batch1"] / flat["qps_batch1"], 1) if flat else None
    machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_index.json").write_text(json.dumps({"machine": machine, "dim": args.dim, "families": args.families,
                                                           "group": args.group, "rows": rows}, indent=2) + "\n")
    lines = [f"{args.dim}-d synthetic catalog-like unit vectors ({args.families} families, {args.group} vectors a "
             f"product), {args.queries} queries, {os.cpu_count()} CPU cores",
             "", "| vectors | index | factory | build s | memory MB | disk MB | recall@10 | q/s batch 1 | q/s batch 64 | "
             "× flat (batch 1) |", "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['vectors']:,} | {r['kind']} | {r['factory']} {r['search'] or ''} | {r['build_s']} | "
                     f"{r['memory_mb']} | {r['disk_mb']} | {r['recall_at_10']:.3f} | {r['qps_batch1']} | "
                     f"{r['qps_batch64']} | {r['qps_vs_flat_batch1']} |")
    table = "\n".join(lines)
    (args.out / "bench_index.md").write_text(table + "\n")
    print(table)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for r in rows:
            ax.scatter(r["recall_at_10"], r["qps_batch1"], s=40)
            ax.annotate(f"{r['kind']} {r['vectors']:,}", (r["recall_at_10"], r["qps_batch1"]), fontsize=8)
        ax.set(xlabel="recall@10 vs exact", ylabel="queries/s (batch 1)", yscale="log",
               title=f"index types, {args.dim}-d, {os.cpu_count()} cores")
        fig.tight_layout()
        fig.savefig(args.out / "bench_index.png", dpi=120)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
