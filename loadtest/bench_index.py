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
from lookalike.search import Filter, Product, ProductIndex, set_threads


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


def recall_at_10(index: ProductIndex, truth: list[list[str]], queries: np.ndarray, f: Filter | None = None,
                 strategy: str = "auto") -> tuple[float, float]:
    """(recall@10 against `truth`, share of queries that got 10 results)."""
    got, _ = index.search(queries, 10, f, strategy=strategy)
    return (float(np.mean([len(set(g) & set(t)) / max(1, len(t)) for g, t in zip(got, truth)])),
            float(np.mean([len(g) == 10 for g in got])))


def filtered_qps(index: ProductIndex, queries: np.ndarray, f: Filter, strategy: str, seconds: float) -> float:
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or done == 0:
        index.search(queries[done % len(queries) : done % len(queries) + 1], 10, f, strategy=strategy)
        done += 1
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--families", type=int, default=1000, help="product families (categories)")
    parser.add_argument("--group", type=int, default=10, help="vectors per product (images and views)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=5.0, help="per throughput measurement")
    parser.add_argument("--kinds", nargs="+", default=["flat", "hnsw", "ivf-pq"])
    parser.add_argument("--nlist", type=int, default=None, help="ivf-pq cells (default: lookalike's, ~4 sqrt(N))")
    parser.add_argument("--filter-shares", type=float, nargs="*", default=[0.01, 0.2],
                        help="category sizes (share of products) of the filtered-search measurements")
    parser.add_argument("--filter-queries", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    set_threads(os.cpu_count() or 1)

    rows = []
    for n in args.sizes:
        vectors = catalog_like(n, args.dim, args.families, args.group, seed=0)
        queries = catalog_like(n, args.dim, args.families, args.group, seed=1, queries=args.queries)
        categories, shares = categories_for(n, args.dim, args.families, args.group, args.filter_shares)
        products = [Product(f"p{i}", categories[i]) for i in range(n)]
        truth: list[list[str]] = []
        filter_truth: dict[tuple[str, str], list[list[str]]] = {}
        # Filtered queries: photos of products of the category ("in"), and of any product ("any": mostly
        # outside the category, the hard case for an approximate index).
        fqs = {("any", name): queries[: args.filter_queries] for name in shares}
        for name in shares:
            inside = np.flatnonzero(np.array(categories[:: args.group]) == name)
            fqs[("in", name)] = catalog_like(n, args.dim, args.families, args.group, seed=2,
                                             queries=args.filter_queries, among=inside)
        for kind in args.kinds:
            choice = choose(kind, n, args.dim, nlist=args.nlist if kind == "ivf-pq" else None)
            before = rss_mb()
            started = time.perf_counter()
            index = ProductIndex.build(products, vectors, factory=choice.factory, search=choice.search)
            build_s = time.perf_counter() - started
            memory = rss_mb() - before
            with tempfile.TemporaryDirectory() as tmp:
                index.save(tmp)
                disk = (Path(tmp) / "index.faiss").stat().st_size / 2**20
            if not truth:
                exact = index if kind == "flat" else ProductIndex.build(products, vectors)
                truth, _ = exact.search(queries, 10)
                filter_truth = {key: exact.search(fq, 10, Filter(key[1]))[0] for key, fq in fqs.items()}
                del exact
            recall, _ = recall_at_10(index, truth, queries)
            row = {
                "vectors": n, "kind": kind, "factory": choice.factory, "search": choice.search,
                "build_s": round(build_s, 1), "memory_mb": round(memory), "disk_mb": round(disk),
                "recall_at_10": round(recall, 3),
                "qps_batch1": round(queries_per_s(index, queries, 1, args.seconds), 1),
                "qps_batch64": round(queries_per_s(index, queries, 64, args.seconds), 1),
                "filtered": [],
            }
            for (where, name), fq in fqs.items():
                share = shares[name]
                for strategy in ("auto", "selector", "scan") if kind != "flat" else ("auto",):
                    f = Filter(name)
                    recall, full = recall_at_10(index, filter_truth[(where, name)], fq, f, strategy)
                    path = index.filter_path(f) if strategy == "auto" else strategy
                    row["filtered"].append({"category": name, "share": round(share, 4), "queries": where,
                                            "strategy": "auto: " + path if strategy == "auto" else strategy,
                                            "recall_at_10": round(recall, 3), "full_top_k": round(full, 3),
                                            "qps_batch1": round(filtered_qps(index, fq, f, strategy, args.seconds / 2), 1)})
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
    lines += ["", "Filtered search (CATEGORY), batch 1: auto = lookalike's choice (and the path it took); selector = FAISS "
              "IDSelector on the index with efSearch/nprobe raised by 1/share; scan = exact pass over the category's "
              "vectors only (what a per-category flat sub-index computes, without its memory; IVF-PQ: every cell, "
              "re-ranked); subindex = the category's own graph (hnsw, categories over 20,000 vectors)",
              "; queries: photos of products in the category (in) or of any product (any: mostly outside it, the "
              "hard case for graph and cell search)",
              "", "| vectors | index | category share | queries | strategy | recall@10 | full TOP_K | q/s batch 1 |",
              "|---:|---|---:|---|---|---:|---:|---:|"]
    for r in rows:
        for f in r["filtered"]:
            lines.append(f"| {r['vectors']:,} | {r['kind']} | {f['share']:.1%} | {f['queries']} | {f['strategy']} | "
                         f"{f['recall_at_10']:.3f} | "
                         f"{f['full_top_k']:.2f} | {f['qps_batch1']} |")
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
