"""Benchmark of the index types (`lookalike index --index flat|hnsw|ivf-pq`) on synthetic clustered unit
vectors: build time, memory, size on disk, queries/s at batch 1 and 64, and recall@10 against exact
search, all through `lookalike.serving.search.ProductIndex` (what product_search serves), in one run.

    .venv/bin/python -m loadtest.benchmarks.bench_index --sizes 100000 --out results

The vectors (`synthetic.catalog_like`): product families in random directions of D = 1280, each product
a tight group of `--group` vectors (its images and catalog views) near its family; queries are fresh
vectors near random products, like a shopper's photo of one. Recall@10 is of products, as lookalike
serves them (a product scores its best vector; `--one-per-vector`: of vectors, the classic ANN
measure). Synthetic: real embeddings' neighbourhoods differ. Writes OUT/bench_index.json, .md and .png.
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

from loadtest.synthetic import catalog_like, categories_for
from lookalike.indexing.index_types import choose
from lookalike.serving.filtering import Filter
from lookalike.serving.gpu import set_threads
from lookalike.serving.index_files import Product
from lookalike.serving.search import ProductIndex


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


Truth = tuple[list[list[str]], list[np.ndarray]]  # the exact search's ids and scores of each query


def recall_at_10(index: ProductIndex, truth: Truth, queries: np.ndarray, f: Filter | None = None,
                 strategy: str = "auto") -> tuple[float, float, float]:
    """(recall@10 against `truth`, share of queries that got 10 results, score shortfall: how much less
    similar, in cosine, the results are than the exact ones on average; 0 when the same)."""
    got, scores = index.search(queries, 10, f, strategy=strategy)
    ids, exact = truth
    shortfall = [float(np.mean(e) - np.mean(s)) for s, e in zip(scores, exact) if len(s) == len(e) > 0]
    return (float(np.mean([len(set(g) & set(t)) / max(1, len(t)) for g, t in zip(got, ids)])),
            float(np.mean([len(g) == 10 for g in got])), float(np.mean(shortfall)) if shortfall else 0.0)


def filtered_qps(index: ProductIndex, queries: np.ndarray, f: Filter, strategy: str, seconds: float) -> float:
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or done == 0:
        index.search(queries[done % len(queries) : done % len(queries) + 1], 10, f, strategy=strategy)
        done += 1
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000],
                        help="catalog sizes (vectors) to measure; none: only the tables and plot of --merge's runs")
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--families", type=int, default=1000, help="product families (categories)")
    parser.add_argument("--group", type=int, default=10, help="vectors per product (images and views)")
    parser.add_argument("--one-per-vector", action="store_true",
                        help="count each vector as a product of its own (recall of the nearest vectors, not products)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=5.0, help="per throughput measurement")
    parser.add_argument("--kinds", nargs="+", default=["flat", "hnsw", "ivf-pq"])
    parser.add_argument("--nlist", type=int, default=None, help="ivf-pq cells (default: lookalike's, ~4 sqrt(N))")
    parser.add_argument("--filter-shares", type=float, nargs="*", default=[0.01, 0.2],
                        help="category sizes (share of products) of the filtered-search measurements")
    parser.add_argument("--filter-queries", type=int, default=200)
    parser.add_argument("--ef-sweep", type=int, nargs="*", default=[],
                        help="hnsw: also recall@10 and q/s (batch 1) at these efSearch values, same index")
    parser.add_argument("--merge", type=Path, nargs="*", default=[],
                        help="bench_index.json files of earlier runs: their rows come first in this run's table and plot")
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    set_threads(os.cpu_count() or 1)

    rows = []
    for n in args.sizes:
        vectors = catalog_like(n, args.dim, args.families, args.group, seed=0)
        queries = catalog_like(n, args.dim, args.families, args.group, seed=1, queries=args.queries)
        categories, shares = categories_for(n, args.dim, args.families, args.group, args.filter_shares)
        if args.one_per_vector:  # the classic ANN measure: the 10 nearest vectors
            products, counts = [Product(f"p{i}", categories[i]) for i in range(n)], None
        else:  # as lookalike indexes a catalog: a product's images and views are its vectors, scored by the best
            if n % args.group:
                raise SystemExit(f"--sizes must be multiples of --group ({args.group}), got {n}")
            products = [Product(f"p{i}", categories[i * args.group]) for i in range(n // args.group)]
            counts = [args.group] * len(products)
        truth: Truth = ([], [])
        filter_truth: dict[tuple[str, str], Truth] = {}
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
            index = ProductIndex.build(products, vectors, vectors=counts, factory=choice.factory, search=choice.search)
            build_s = time.perf_counter() - started
            memory = rss_mb() - before
            with tempfile.TemporaryDirectory() as tmp:
                index.save(tmp)  # the index files; the stored embeddings (vectors.npy) are N x D x 4 bytes for all
                disk = sum(f.stat().st_size for f in Path(tmp).glob("*.faiss")) / 2**20
            if not truth[0]:
                exact = index if kind == "flat" else ProductIndex.build(products, vectors, vectors=counts)
                truth = exact.search(queries, 10)
                filter_truth = {key: exact.search(fq, 10, Filter(key[1])) for key, fq in fqs.items()}
                del exact
            recall, _, shortfall = recall_at_10(index, truth, queries)
            row = {
                "vectors": n, "products": len(products), "kind": kind, "factory": choice.factory, "search": choice.search,
                "build_s": round(build_s, 1), "memory_mb": round(memory), "disk_mb": round(disk),
                "recall_at_10": round(recall, 3), "score_shortfall": round(shortfall, 4),
                "qps_batch1": round(queries_per_s(index, queries, 1, args.seconds), 1),
                "qps_batch64": round(queries_per_s(index, queries, 64, args.seconds), 1),
                "filtered": [],
            }
            for (where, name), fq in fqs.items():
                share = shares[name]
                for strategy in ("auto", "selector", "scan") if kind != "flat" else ("auto",):
                    f = Filter(name)
                    recall, full, shortfall = recall_at_10(index, filter_truth[(where, name)], fq, f, strategy)
                    path = index.filter_path(f) if strategy == "auto" else strategy
                    row["filtered"].append({"category": name, "share": round(share, 4), "queries": where,
                                            "strategy": "auto: " + path if strategy == "auto" else strategy,
                                            "recall_at_10": round(recall, 3), "full_top_k": round(full, 3),
                                            "score_shortfall": round(shortfall, 4),
                                            "qps_batch1": round(filtered_qps(index, fq, f, strategy, args.seconds / 2), 1)})
            if kind == "hnsw" and args.ef_sweep:
                row["ef_sweep"] = []
                for ef in args.ef_sweep:
                    index.set_search_params(ef_search=ef)
                    recall, _, shortfall = recall_at_10(index, truth, queries)
                    row["ef_sweep"].append({"ef_search": ef, "recall_at_10": round(recall, 3), "score_shortfall": round(shortfall, 4),
                                            "qps_batch1": round(queries_per_s(index, queries, 1, args.seconds), 1)})
            print(row, flush=True)
            rows.append(row)
            del index

    rows = [row for earlier in args.merge for row in json.loads(earlier.read_text())["rows"]] + rows
    for row in rows:
        flat = next((r for r in rows if r["vectors"] == row["vectors"] and r["kind"] == "flat"), None)
        row["qps_vs_flat_batch1"] = round(row["qps_batch1"] / flat["qps_batch1"], 1) if flat else None
    machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_index.json").write_text(json.dumps({"machine": machine, "dim": args.dim, "families": args.families,
                                                           "group": args.group, "rows": rows}, indent=2) + "\n")
    table = report(rows, args)
    (args.out / "bench_index.md").write_text(table + "\n")
    print(table)
    plot(rows, args.dim, args.out / "bench_index.png")

def report(rows: list[dict], args: argparse.Namespace) -> str:
    """The markdown tables: index types; filtered search, one line per index, category and kind of photo,
    the strategies side by side; hnsw's efSearch sweeps."""
    nan = float("nan")
    lines = [f"{args.dim}-d synthetic catalog-like unit vectors ({args.families} families, {args.group} vectors a "
             f"product), {args.queries} queries, {os.cpu_count()} CPU cores; recall of the 10 best "
             + ("vectors (each its own product)" if args.one_per_vector else "products (a product scores its best vector)")
             + "; shortfall: how much lower (cosine) the mean score of the results is than the exact top 10's",
             "", "| vectors | index | factory | build s | memory MB | disk MB | recall@10 | shortfall | q/s batch 1 | "
             "q/s batch 64 | × flat (batch 1) |", "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['vectors']:,} | {r['kind']} | {r['factory']} {r['search'] or ''} | {r['build_s']} | "
                     f"{r['memory_mb']} | {r['disk_mb']} | {r['recall_at_10']:.3f} | {r.get('score_shortfall', nan):.4f} | "
                     f"{r['qps_batch1']} | {r['qps_batch64']} | {r['qps_vs_flat_batch1']} |")
    lines += ["", "Filtered search (CATEGORY), batch 1. Photos of products in the category (in) or of any product "
              "(any: mostly outside it, the hard case for graph and cell search). auto = lookalike's choice and the "
              "path it took (scan: an exact pass over the category's vectors, for IVF-PQ every cell, re-ranked; "
              "subindex: the category's own graph; selector: FAISS IDSelector on the index, efSearch/nprobe raised "
              "by 1/share); selector and scan forced, for comparison. Every row returned full TOP_K.",
              "", "| vectors | index | category | photos | auto | recall@10 | shortfall | q/s | selector recall@10 | q/s | "
              "scan recall@10 | q/s |", "|---:|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cases: dict[tuple[float, str], dict[str, dict]] = {}
        for f in r["filtered"]:
            cases.setdefault((f["share"], f["queries"]), {})[f["strategy"].split(":")[0]] = f
        for (share, where), by in sorted(cases.items(), key=lambda item: (item[0][1], item[0][0])):
            auto = by["auto"]
            cells = [f"{by[s]['recall_at_10']:.3f} | {by[s]['qps_batch1']}" if s in by else "– | –" for s in ("selector", "scan")]
            lines.append(f"| {r['vectors']:,} | {r['kind']} | {share:.1%} | {where} | {auto['strategy'][6:]} | "
                         f"{auto['recall_at_10']:.3f} | {auto.get('score_shortfall', nan):.4f} | {auto['qps_batch1']} | "
                         f"{cells[0]} | {cells[1]} |")
            if any(f["full_top_k"] < 1 for f in by.values()):
                lines[-1] += " (not full TOP_K: " + ", ".join(f"{k} {f['full_top_k']:.2f}" for k, f in by.items()) + ")"
    sweeps = [r for r in rows if r.get("ef_sweep")]
    if sweeps:
        lines += ["", "hnsw at other efSearch values (product_search's `ef_search` parameter; same index):", "",
                  "| vectors | efSearch | recall@10 | shortfall | q/s batch 1 | × flat |", "|---:|---:|---:|---:|---:|---:|"]
        for r in sweeps:
            flat = next((x for x in rows if x["vectors"] == r["vectors"] and x["kind"] == "flat"), None)
            for e in sorted(sweep_points(r), key=lambda e: e["ef_search"]):
                ratio = round(e["qps_batch1"] / flat["qps_batch1"], 1) if flat else None
                lines.append(f"| {r['vectors']:,} | {e['ef_search']} | {e['recall_at_10']:.3f} | "
                             f"{e.get('score_shortfall', nan):.4f} | {e['qps_batch1']} | {ratio} |")
    return "\n".join(lines)


def sweep_points(row: dict) -> list[dict]:
    """An hnsw row's efSearch sweep with its own (default) efSearch as one more point; [] without a sweep."""
    if not row.get("ef_sweep"):
        return []
    return row["ef_sweep"] + [{"ef_search": row["search"].get("efSearch"), "recall_at_10": row["recall_at_10"],
                               "score_shortfall": row.get("score_shortfall", float("nan")), "qps_batch1": row["qps_batch1"]}]


def plot(rows: list[dict], dim: int, path: Path) -> None:
    """Left: recall@10 against queries/s (batch 1) of each index type and size, hnsw's efSearch sweep as a
    line. Right: filtered search (auto), q/s of each index type, category share and query kind."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    colours = {"flat": "tab:gray", "hnsw": "tab:blue", "ivf-pq": "tab:orange"}
    markers = {100_000: "o", 1_000_000: "s"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 5))
    for r in rows:
        colour, marker = colours.get(r["kind"], "tab:green"), markers.get(r["vectors"], "^")
        left.scatter(r["recall_at_10"], r["qps_batch1"], s=50, color=colour, marker=marker,
                     label=f"{r['kind']}, {r['vectors']:,}")
        sweep = sorted(sweep_points(r), key=lambda e: e["recall_at_10"])
        if sweep:
            left.plot([e["recall_at_10"] for e in sweep], [e["qps_batch1"] for e in sweep], color=colour, lw=1, alpha=0.6)
            for e in sweep:
                left.annotate(f"ef {e['ef_search']}", (e["recall_at_10"], e["qps_batch1"]), fontsize=7,
                              xytext=(3, 3), textcoords="offset points")
    left.set(xlabel="recall@10 vs exact", ylabel="queries/s, batch 1 (log)", yscale="log",
             title=f"index types, {dim}-d synthetic, {os.cpu_count()} cores")
    left.legend(fontsize=7, loc="lower left")
    labels, values, recalls, bar_colours = [], [], [], []
    for r in rows:
        for f in r["filtered"]:
            if not f["strategy"].startswith("auto"):
                continue
            labels.append(f"{r['kind']} {r['vectors'] // 1000:,}k\n{f['share']:.0%} {f['queries']}")
            values.append(f["qps_batch1"])
            recalls.append(f["recall_at_10"])
            bar_colours.append(colours.get(r["kind"], "tab:green"))
    bars = right.bar(range(len(values)), values, color=bar_colours)
    for bar, recall in zip(bars, recalls):
        right.annotate(f"{recall:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                       fontsize=6, xytext=(0, 2), textcoords="offset points")
    right.set_xticks(range(len(labels)), labels, fontsize=5.5, rotation=90)
    right.set(ylabel="queries/s, batch 1 (log)", yscale="log",
              title="filtered (CATEGORY), auto; bar label: recall@10")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
