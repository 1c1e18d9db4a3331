"""`make bench-backends`: product_search's two search backends, FAISS in process (`lookalike.serving.search.
ProductIndex`) and Milvus (`lookalike.serving.milvus_search.MilvusIndex` over a real local Milvus 2.3.5 standalone,
`lookalike.server.milvus.MilvusServer`), measured in one run on this machine:

  1. search only   --vectors synthetic 1280-d catalog-like vectors (`synthetic.catalog_like`, --group of
                   them a product, like a catalog image and its 9 views), FAISS hnsw as `lookalike index
                   --index hnsw` builds it (`index_types.choose` defaults) against Milvus HNSW of the same
                   M and efSearch (`MilvusWriter.build_generation`, `milvus_publish.milvus_kind`: what
                   `lookalike index --search-backend milvus` builds), FAISS flat and Milvus FLAT: build
                   time, memory, recall@10 of products against FAISS flat (exact), queries/s and latency
                   of a call at batch 1 and at batch 64 (one search call of 64 query rows). Milvus goes
                   through MilvusIndex.search, which groups rows by product and scores the leading
                   candidates exactly (a second, restricted search), as product_search serves them;
                   "search call only" is the bare Milvus search of the same collection (grouped, not
                   rescored).
  2. filters       the Milvus HNSW collection built with and without the category partition key
                   (build_generation(partition_key=...)), unfiltered and filtered by a 5 % and a 20 %
                   category (`synthetic.categories_for`; the other families in 11 more categories, about as
                   many as a real catalog), photos of products in the category ("in") and of any product
                   ("any": mostly outside it, the hard case for a graph); FAISS hnsw alongside.
  3. end to end    visual_search on each backend: two tritonservers, one after the other, over copies of
                   --model-repository, each with --catalog indexed (`lookalike.indexing.indexer.index_catalog`,
                   index hnsw, Milvus through `MilvusTarget`), --concurrency gRPC clients in a closed loop
                   (`bench.closed_loop`) sending the same query photos: queries/s, p50/p95/p99, milvus /
                   faiss, Triton's time per model and CPU per photo (Milvus's own processes included).

FAISS (search only and end to end) is measured while no Milvus runs: the Milvus figures carry its
server's CPU on the same cores, as on one host. FAISS searches with all cores (OpenMP; product_search
serves with faiss_threads 1, which changes batch 64 only). Only one Milvus standalone can run on a host
(fixed internal ports): the run waits until none runs, and stops its own at the end.

Writes OUT/bench_backends.json (after each phase) and OUT/bench_backends.md.

    .venv/bin/python -m loadtest.benchmarks.bench_backends --catalog data/sample_catalog/catalog.csv --out results/bench_backends
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, cast

import numpy as np

from loadtest.benchmarks.bench import breakdown, closed_loop, cpu_per_image, cpu_seconds, same_results, stats, summary, warm_up
from loadtest.benchmarks.bench_index import Truth, recall_at_10, rss_mb
from loadtest.synthetic import catalog_like, categories_for
from lookalike.indexing.index_types import choose
from lookalike.serving.filtering import NO_FILTER, Filter
from lookalike.serving.gpu import set_threads
from lookalike.serving.index_files import Product
from lookalike.serving.search import ProductIndex

ROOT = Path(__file__).resolve().parents[2]
FINGERPRINT, MODEL = "synthetic-bench", "synthetic"  # the synthetic collections' embedder (MilvusIndex checks it)
FILTER_SHARES = [0.05, 0.2]  # the categories filtered by
OTHER_SHARES = [0.01, 0.02, 0.03, 0.04, 0.06, 0.07, 0.08, 0.09, 0.10, 0.11]  # more categories; the rest "other"
Search = Callable[[np.ndarray, int, Filter], tuple[list[list[str]], list[np.ndarray]]]


# --- measuring -----------------------------------------------------------------------------------------

def timed(search: Callable[[np.ndarray], object], queries: np.ndarray, batch: int, seconds: float, warmup: int = 3) -> dict:
    """Calls of `batch` query rows one after another for `seconds` (at least 3, after `warmup`):
    queries/s and the latency of a call."""
    span = max(1, len(queries) - batch + 1)

    def chunk(i: int) -> np.ndarray:
        start = (i * batch) % span
        return queries[start:start + batch]

    for i in range(warmup if batch == 1 else 1):
        search(chunk(i))
    latencies: list[float] = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or len(latencies) < 3:
        rows = chunk(warmup + len(latencies))
        start = time.perf_counter()
        search(rows)
        latencies.append((time.perf_counter() - start) * 1000)
    s = summary(latencies, time.perf_counter() - started)
    return {"batch": batch, "calls": s["requests"], "qps": round(s["images_per_s"] * batch, 1),
            "p50_ms": round(s["p50_ms"], 2), "p95_ms": round(s["p95_ms"], 2), "mean_ms": round(s["mean_ms"], 2)}


class Batched:
    """A search function with the call that `bench_index.recall_at_10` makes of an index, answered in calls
    of `batch` rows (as product_search's dynamic batches reach it)."""

    def __init__(self, search: Search, batch: int = 64) -> None:
        self._search, self.batch = search, batch

    def search(self, queries: np.ndarray, k: int, f: Filter | None = None, strategy: str = "auto"
               ) -> tuple[list[list[str]], list[np.ndarray]]:
        ids: list[list[str]] = []
        scores: list[np.ndarray] = []
        for start in range(0, len(queries), self.batch):
            got, got_scores = self._search(queries[start:start + self.batch], k, f or NO_FILTER)
            ids += got
            scores += got_scores
        return ids, scores


def recall(search: Search, truth: Truth, queries: np.ndarray, f: Filter | None = None) -> dict:
    value, full, shortfall = recall_at_10(cast(ProductIndex, Batched(search)), truth, queries, f)
    return {"recall_at_10": round(value, 3), "full_top_k": round(full, 3), "score_shortfall": round(shortfall, 4)}


def measure(search: Search, truth: Truth, queries: np.ndarray, seconds: float, f: Filter = NO_FILTER) -> dict:
    """recall@10 (in calls of 64 rows), then q/s and latency at batch 1 and 64, all with filter `f`."""
    return {**recall(search, truth, queries, f),
            "batch1": timed(lambda q: search(q, 10, f), queries, 1, seconds),
            "batch64": timed(lambda q: search(q, 10, f), queries, 64, seconds)}


def group_usage(pid: int) -> tuple[float, float]:
    """(RSS MB, CPU seconds user + system) of a process and its descendants (the Milvus server)."""
    import psutil

    rss = cpu = 0.0
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return float("nan"), float("nan")
    for p in processes:
        try:
            rss += p.memory_info().rss
            t = p.cpu_times()
            cpu += t.user + t.system
        except psutil.Error:
            continue
    return rss / 2**20, cpu


# --- synthetic data, FAISS -------------------------------------------------------------------------------

class Synthetic:
    def __init__(self, args: argparse.Namespace) -> None:
        n, dim, families, group = args.vectors, args.dim, args.families, args.group
        if n % group:
            raise SystemExit(f"--vectors must be a multiple of --group ({group}), got {n}")
        self.dim, self.group = dim, group
        self.vectors = catalog_like(n, dim, families, group, seed=0)
        self.queries = catalog_like(n, dim, families, group, seed=1, queries=args.queries)
        categories, shares = categories_for(n, dim, families, group, FILTER_SHARES + OTHER_SHARES)
        self.products = [Product(f"p{i}", categories[i * group]) for i in range(n // group)]
        self.counts = [group] * len(self.products)
        self.shares = {name: shares[name] for name in (f"{s:.0%}" for s in FILTER_SHARES)}
        self.category_shares = {**shares, "other": float(np.mean(np.array(categories) == "other"))}
        # (photos, category) -> query rows: photos of any product (mostly outside the category), of products in it
        self.filter_queries: dict[tuple[str, str], np.ndarray] = {}
        for name in self.shares:
            inside = np.flatnonzero(np.array([p.category for p in self.products]) == name)
            self.filter_queries[("in", name)] = catalog_like(n, dim, families, group, seed=2, queries=args.filter_queries,
                                                             among=inside)
            self.filter_queries[("any", name)] = self.queries[: args.filter_queries]

    def milvus_rows(self) -> list:
        """The catalog as `lookalike index` writes it into Milvus: one image of `group` vectors a product."""
        from lookalike.indexing.milvus_index import catalog_rows

        g = self.group
        return catalog_rows([(p.product_id, p.category, [(f"synthetic/{p.product_id}.jpg", f"{i:064x}",
                                                          self.vectors[i * g:(i + 1) * g])])
                             for i, p in enumerate(self.products)])


def faiss_search(index: ProductIndex) -> Search:
    return lambda q, k, f: index.search(q, k, f)


def faiss_phase(data: Synthetic, args: argparse.Namespace) -> tuple[dict, Truth, dict[tuple[str, str], Truth]]:
    """FAISS flat (the exact reference) and hnsw: unfiltered rows and hnsw's filtered cases."""
    set_threads(os.cpu_count() or 1)
    out: dict[str, Any] = {"rows": {}, "filtered": {}}
    truth: Truth = ([], [])
    filter_truth: dict[tuple[str, str], Truth] = {}
    for kind in ("flat", "hnsw"):  # flat first: the exact results
        choice = choose(kind, len(data.vectors), data.dim)
        before, started = rss_mb(), time.perf_counter()
        index = ProductIndex.build(data.products, data.vectors, vectors=data.counts, factory=choice.factory, search=choice.search)
        build_s, memory = time.perf_counter() - started, rss_mb() - before
        if kind == "flat":
            truth = index.search(data.queries, 10)
            filter_truth = {key: index.search(q, 10, Filter(key[1])) for key, q in data.filter_queries.items()}
        row = {"system": f"FAISS {kind}", "kind": kind, "params": f"{choice.factory} {choice.search or ''}".strip(),
               "build_s": round(build_s, 1), "memory_mb": round(memory),
               **measure(faiss_search(index), truth, data.queries, args.seconds)}
        out["rows"][f"faiss {kind}"] = row
        print(f"  {row['system']}: recall@10 {row['recall_at_10']}, batch 1 {row['batch1']['qps']} q/s, "
              f"batch 64 {row['batch64']['qps']} q/s, build {row['build_s']} s", flush=True)
        if kind == "hnsw":
            out["hnsw_choice"] = {"factory": choice.factory, "search": choice.search}
            cases = {"none": (NO_FILTER, data.queries, truth)}
            cases.update({f"{name} {where}": (Filter(name), q, filter_truth[(where, name)])
                          for (where, name), q in data.filter_queries.items()})
            for case, (f, q, t) in cases.items():
                found = measure(faiss_search(index), t, q, args.seconds / 2, f)
                out["filtered"][case] = {**found, "path": index.filter_path(f)}
                print(f"  FAISS hnsw, filter {case}: {found['recall_at_10']}, {found['batch1']['qps']} q/s "
                      f"({index.filter_path(f)})", flush=True)
        del index
    return out, truth, filter_truth


# --- Milvus ---------------------------------------------------------------------------------------------

def milvus_busy() -> bool:
    """A Milvus standalone (ours or anyone's) runs on this host: its process, or its etcd port."""
    running = subprocess.run(["pgrep", "-f", "milvus run"], capture_output=True, text=True).stdout.split()
    with socket.socket() as sock:
        sock.settimeout(0.5)
        etcd = sock.connect_ex(("127.0.0.1", 2379)) == 0
    return bool(running) or etcd


def start_milvus(work: Path, wait_s: float):
    """Our Milvus standalone, once no other runs on this host (waits up to `wait_s`)."""
    from lookalike.server.launcher import free_port
    from lookalike.server.milvus import MilvusServer, MilvusStartError, milvus_server_binary

    if milvus_server_binary() is None:
        raise SystemExit("no milvus-server in this environment: `make setup` installs milvus==2.3.5")
    deadline = time.monotonic() + wait_s
    told = False
    while True:
        if not milvus_busy():
            server = MilvusServer(work / "milvus-data", free_port(), work / "milvus.log")
            try:
                return server.start()
            except MilvusStartError as exc:  # another one started meanwhile
                if "2379" not in str(exc):
                    raise
        if time.monotonic() > deadline:
            raise SystemExit(f"another Milvus standalone still runs on this host after {wait_s:.0f} s (pgrep -f 'milvus run')")
        if not told:
            print("waiting until no other Milvus standalone runs on this host (one at a time: fixed ports)", flush=True)
            told = True
        time.sleep(5)


class MilvusBuild:
    """One synthetic collection as `lookalike index --search-backend milvus` builds it, behind its own alias."""

    def __init__(self, uri: str, name: str, data: Synthetic, rows: list, kind: str, build: dict[str, int],
                 search: dict[str, int], partition_key: bool, server_pid: int) -> None:
        from lookalike.indexing.milvus_index import MilvusWriter
        from lookalike.serving.milvus_search import MilvusIndex, MilvusSettings

        self.settings = MilvusSettings(uri, alias=f"bench_{name}", timeout_s=60.0)
        self.writer = MilvusWriter(self.settings, log=lambda _m: None)
        before = group_usage(server_pid)[0]
        started = time.perf_counter()
        self.report = self.writer.build_generation(rows, fingerprint=FINGERPRINT, embedder_model=MODEL, dim=data.dim, kind=kind,
                                                   build=build, search=search, partition_key=partition_key)
        self.build_s = time.perf_counter() - started
        self.memory_mb = group_usage(server_pid)[0] - before
        self.index = MilvusIndex(self.settings, FINGERPRINT, MODEL, data.dim)
        state = self.index.state(force=True)
        assert state is not None, f"alias {self.settings.alias} names no collection"
        self.state = state
        self.meta = {"kind": kind, "build": build, "search": search, "partition_key": partition_key,
                     "collection": state.name, "build_s": round(self.build_s, 1), "memory_mb": round(self.memory_mb)}

    def search(self, q: np.ndarray, k: int, f: Filter) -> tuple[list[list[str]], list[np.ndarray]]:
        return self.index.search(q, k, f)

    def bare(self) -> Search:
        """The Milvus search call alone (what MilvusIndex sends), rows grouped by product, not rescored."""
        from lookalike.serving.milvus_search import MAX_LIMIT, PRODUCT_ID, filter_expression, search_params

        client, state = self.writer.client, self.state
        limit = min(MAX_LIMIT, 10 * state.max_vectors)

        def search(q: np.ndarray, k: int, f: Filter) -> tuple[list[list[str]], list[np.ndarray]]:
            found = client.search(state.name, data=q.tolist(), limit=limit, filter=filter_expression(f),
                                  output_fields=[PRODUCT_ID], search_params=search_params(state, limit),
                                  consistency_level="Customized", guarantee_timestamp=state.write_ts)
            ids, scores = [], []
            for row in found:
                best: dict[str, float] = {}
                for hit in row:  # best first
                    best.setdefault(str(hit["entity"][PRODUCT_ID]), float(hit["distance"]))
                top = list(best.items())[:k]
                ids.append([pid for pid, _ in top])
                scores.append(np.array([s for _, s in top], dtype=np.float32))
            return ids, scores

        return search

    def lookups(self, products: list[Product], queries: np.ndarray, seconds: float) -> dict:
        """Latency of the two ways to score 2k candidate products exactly for one query row: a
        `product_id in [...]` query returning every stored vector (IVF-PQ's rescoring, whose scores are
        approximate), and a search restricted to them with a top-k covering all their rows (HNSW's, which
        Milvus answers by brute force: only ids and scores travel)."""
        from lookalike.serving.milvus_search import PRODUCT_ID, RESCORE_SLACK, VECTOR, in_expression, search_params

        client, state = self.writer.client, self.state
        rng = np.random.default_rng(0)
        count = 10 * RESCORE_SLACK
        limit = count * state.max_vectors
        consistency = {"consistency_level": "Customized", "guarantee_timestamp": state.write_ts}

        def query(expr: str, i: int) -> object:
            return client.query(state.name, filter=expr, output_fields=[PRODUCT_ID, VECTOR], limit=limit, **consistency)

        def restricted(expr: str, i: int) -> object:
            return client.search(state.name, data=[queries[i % len(queries)].tolist()], filter=expr, limit=limit,
                                 output_fields=[PRODUCT_ID], search_params=search_params(state, limit), **consistency)

        out = {}
        for label, call in (("query with vectors", query), ("restricted search", restricted)):
            latencies: list[float] = []
            started = time.perf_counter()
            while time.perf_counter() - started < seconds or len(latencies) < 3:
                ids = [products[i].product_id for i in rng.choice(len(products), count, replace=False)]
                start = time.perf_counter()
                call(in_expression(ids), len(latencies))
                latencies.append((time.perf_counter() - start) * 1000)
            s = summary(latencies[1:], time.perf_counter() - started)
            out[label] = {"products": count, "p50_ms": round(s["p50_ms"], 2), "mean_ms": round(s["mean_ms"], 2)}
        return out

    def partitions(self, rows_of: dict[str, int], filtered: list[str]) -> dict:
        """Partition-key collections: the partition each filtered category hashes to and what else it holds
        (a filtered search reads that whole partition). Milvus hashes a VARCHAR key by CRC-32 (IEEE) of its
        first 100 bytes, modulo the partitions in index order; checked here against each partition's row
        count (Milvus refuses partition names in queries of a partition-key collection)."""
        import zlib

        client, name = self.writer.client, self.state.name
        try:
            names = sorted(client.list_partitions(name), key=lambda p: int(p.rpartition("_")[2]) if p.rpartition("_")[2].isdigit() else -1)
            stats = {p: int(client.get_partition_stats(name, p)["row_count"]) for p in names}
        except Exception as exc:  # noqa: BLE001 - a diagnostic only
            return {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"}
        where = {category: names[zlib.crc32(category.encode()[:100]) % len(names)] for category in rows_of}
        predicted = dict.fromkeys(names, 0)
        for category, rows in rows_of.items():
            predicted[where[category]] += rows
        out: dict[str, Any] = {"hash_matches_row_counts": predicted == stats, "nonempty_partitions": sum(1 for v in stats.values() if v)}
        for category in filtered:
            partition = where[category]
            out[category] = {"partition": partition, "rows": rows_of[category], "partition_rows": stats[partition],
                             "shared_with": [c for c in rows_of if where[c] == partition and c != category]}
        return out

    def drop(self) -> None:
        """The collection and its alias gone, then the clients closed (pymilvus's MilvusClients of one URI and
        token share one connection: closing either closes both)."""
        client = self.writer.client
        client.release_collection(self.state.name)
        client.drop_alias(self.settings.alias)
        client.drop_collection(self.state.name)
        self.index.close()
        self.writer.close()


def milvus_phase(milvus: Any, data: Synthetic, truth: Truth, filter_truth: dict[tuple[str, str], Truth],
                 hnsw_choice: dict, args: argparse.Namespace) -> dict:
    """Milvus HNSW with and without the partition key (unfiltered and filtered), and FLAT."""
    from lookalike.indexing.index_types import IndexChoice
    from lookalike.indexing.milvus_publish import milvus_kind

    kind, build, search = milvus_kind(IndexChoice("hnsw", hnsw_choice["factory"], "asked for", hnsw_choice["search"]))
    rows = data.milvus_rows()
    pid = milvus.process.pid
    out: dict[str, Any] = {"rows": {}, "filtered": {}, "collections": {}}
    cases = {"none": (NO_FILTER, data.queries, truth)}
    cases.update({f"{name} {where}": (Filter(name), q, filter_truth[(where, name)])
                  for (where, name), q in data.filter_queries.items()})
    # the default first: no partition key (`lookalike index --category-partition` gives one)
    configs = [("hnsw_nopk", kind, build, search, False), ("hnsw_pk", kind, build, search, True)]
    if not args.no_milvus_flat:
        configs.append(("flat", "flat", {}, {}, False))
    for name, k, b, s, partition_key in configs:
        print(f"  Milvus {name}: building ({len(rows):,} rows)", flush=True)
        built = MilvusBuild(milvus.uri, name, data, rows, k, b, s, partition_key, pid)
        try:
            out["collections"][name] = built.meta
            label = f"Milvus {k.upper()}" + (" (partition key)" if partition_key else " (no partition key)")
            row = {"system": label, "kind": k, "params": f"{b or ''} {s or ''}".strip(), "build_s": built.meta["build_s"],
                   "memory_mb": built.meta["memory_mb"], **measure(built.search, truth, data.queries, args.seconds)}
            out["rows"][f"milvus {name}"] = row
            print(f"  {label}: recall@10 {row['recall_at_10']}, batch 1 {row['batch1']['qps']} q/s, batch 64 "
                  f"{row['batch64']['qps']} q/s, build {row['build_s']} s", flush=True)
            if k == "hnsw":
                bare = {"system": f"{label}, search call only", "kind": k, "params": "grouped, not rescored",
                        **measure(built.bare(), truth, data.queries, args.seconds)}
                out["rows"][f"milvus {name} bare"] = bare
                print(f"  {bare['system']}: recall@10 {bare['recall_at_10']}, batch 1 {bare['batch1']['qps']} q/s", flush=True)
            if name == "hnsw_nopk":
                out["rescoring_query"] = built.lookups(data.products, data.queries, args.seconds / 2)
                print(f"  rescoring query: {out['rescoring_query']}", flush=True)
            if partition_key:
                rows_of: dict[str, int] = {}
                for product in data.products:
                    rows_of[product.category] = rows_of.get(product.category, 0) + data.group
                out["collections"][name]["partitions"] = built.partitions(rows_of, list(data.shares))
            if k == "hnsw":
                out["filtered"][name] = {}
                for case, (f, q, t) in cases.items():
                    found = measure(built.search, t, q, args.seconds / 2, f)
                    out["filtered"][name][case] = found
                    print(f"  {label}, filter {case}: {found['recall_at_10']}, {found['batch1']['qps']} q/s", flush=True)
        finally:
            built.drop()
    return out


# --- end to end -----------------------------------------------------------------------------------------

def small_catalog(catalog: Path, per_category: int, work: Path) -> Path:
    """The first `per_category` products of each category (same images, linked), as a catalog.csv."""
    if per_category <= 0:
        return catalog
    out = work / "catalog"
    out.mkdir(parents=True)
    (out / "images").symlink_to(catalog.parent.resolve() / "images", target_is_directory=True)
    with open(catalog, newline="") as handle:
        rows = list(csv.DictReader(handle))
    kept, seen = [], {}
    for row in rows:
        seen[row["category"]] = seen.get(row["category"], 0) + 1
        if seen[row["category"]] <= per_category:
            kept.append(row)
    with open(out / "catalog.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    return out / "catalog.csv"


def end_to_end(backend: str, catalog: Path, images: list[bytes], work: Path, args: argparse.Namespace,
               milvus: Any = None) -> dict:
    """One tritonserver on `backend` over a copy of the model repository, the catalog indexed (hnsw), then
    --e2e-rounds closed loops of --concurrency clients."""
    from lookalike.cli import set_search_backend
    from lookalike.indexing.indexer import index_catalog
    from lookalike.indexing.milvus_publish import MilvusTarget
    from lookalike.indexing.model_configs import search_backend_parameters
    from lookalike.indexing.repository import Repository, copy_repository
    from lookalike.server.launcher import ServerOptions, free_port
    from lookalike.server.serve import lookalike_server
    from lookalike.serving.milvus_search import MilvusSettings
    from lookalike_client import NO_RETRIES, LookalikeClient

    root = copy_repository(args.model_repository, work / f"e2e-{backend}" / "model_repository").root
    target = None
    if backend == "milvus":
        set_search_backend(Repository(root), search_backend_parameters("milvus", milvus.uri))
        target = MilvusTarget(MilvusSettings(milvus.uri))
    options = ServerOptions(model_repository=root, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                            health_port=None)
    log = work / f"tritonserver-{backend}.log"
    server = lookalike_server(options, log_file=log).start()
    out: dict[str, Any] = {"backend": backend, "rounds": []}
    try:
        server.wait_ready()
        with LookalikeClient(options.grpc_url, timeout_s=300) as client:
            started = time.perf_counter()
            report = index_catalog(catalog, Repository(root), client, index="hnsw", progress=False, milvus=target)
            out["index"] = {"seconds": round(time.perf_counter() - started, 1), "products": report.products,
                            "vectors": report.vectors, "failed": report.failed, "version": report.version}
            info = client.info()
            out["served"] = {"backend": info.backend, "index_kind": info.index_kind, "products": info.products,
                             "index_version": info.index_version, "embedder": info.embedder_model,
                             "tritonserver": info.server_version}
        print(f"  {backend}: indexed {report.products} products ({report.vectors} vectors) in {out['index']['seconds']} s; "
              f"serving {out['served']}", flush=True)
        assert server.process is not None
        server_pid = server.process.pid
        with LookalikeClient(options.grpc_url, timeout_s=300, retry=NO_RETRIES) as client:
            def call(_worker: int, data: bytes) -> object:
                return client.search(data, top_k=args.top_k)

            out["answers"] = [[m.product_id for m in client.search(image, top_k=args.top_k)] for image in images]
            warm_up(call, images)
            for r in range(args.e2e_rounds):
                before, cpu_before = stats(options.http_url), cpu_seconds(server_pid)
                if milvus is not None:
                    cpu_before["milvus"] = group_usage(milvus.process.pid)[1]
                row = closed_loop(call, images, args.concurrency, args.e2e_requests)
                cpu_after = cpu_seconds(server_pid)
                if milvus is not None:
                    cpu_after["milvus"] = group_usage(milvus.process.pid)[1]
                # (the CPU figures include each client's one warm-up call)
                row["cpu_ms_per_image"] = cpu_per_image(cpu_before, cpu_after, row["requests"] + args.concurrency)
                row["stages"] = breakdown(before, stats(options.http_url))
                out["rounds"].append(row)
                print(f"  {backend} round {r + 1}: {row['images_per_s']:.1f} q/s, p50 {row['p50_ms']:.0f} ms, "
                      f"p95 {row['p95_ms']:.0f} ms, errors {row['errors']}", flush=True)
    finally:
        server.stop()
    rounds = out["rounds"]
    total = sum(r["requests"] for r in rounds)
    out["qps"] = total / sum(r["requests"] / r["images_per_s"] for r in rounds)  # all rounds' requests over their time
    out["p50_ms"] = float(np.median([r["p50_ms"] for r in rounds]))
    out["p95_ms"] = float(np.median([r["p95_ms"] for r in rounds]))
    return out


# --- report ---------------------------------------------------------------------------------------------

def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "–"


def markdown(results: dict) -> str:
    cfg, lines = results["config"], []
    lines += [f"# product_search backends: FAISS in process vs Milvus {results.get('milvus_version', '')}", "",
              f"`{results['command']}` on {results['machine']}.", ""]
    search = results.get("search")
    if search:
        rows = search["rows"]
        base = rows.get("faiss hnsw")
        lines += ["## 1. Search only", "",
                  f"{cfg['vectors']:,} synthetic {cfg['dim']}-d catalog-like unit vectors ({cfg['vectors'] // cfg['group']:,} "
                  f"products of {cfg['group']} vectors, {cfg['families']} families), {cfg['queries']} queries; recall@10 of "
                  "products (a product scores its best vector) against FAISS flat; shortfall: how much lower (cosine) the "
                  "mean score of the 10 results is than the exact ones'. Batch 64 = one search call of 64 query rows; "
                  "latency a call. Milvus rows through MilvusIndex.search (grouped by product, leading candidates "
                  "rescored exactly), except \"search call only\". Memory: FAISS, this process's RSS "
                  "growth (index and the stored embeddings); Milvus, its server's RSS growth over the build and load "
                  "(approximate: the previous, dropped collection's memory may be returned meanwhile). Build: FAISS "
                  "index_factory + add (+ hnsw's category sub-index); Milvus insert, flush, index, load.", "",
                  "| system | params | build s | memory MB | recall@10 | shortfall | q/s batch 1 | "
                  "p50 ms batch 1 | q/s batch 64 | p50 ms a call, batch 64 | × FAISS hnsw q/s (batch 1 / 64) |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows.values():
            versus = (f"{ratio(r['batch1']['qps'], base['batch1']['qps'])} / {ratio(r['batch64']['qps'], base['batch64']['qps'])}"
                      if base else "–")
            lines.append(f"| {r['system']} | {r['params']} | {r.get('build_s', '–')} | {r.get('memory_mb', '–')} | "
                         f"{r['recall_at_10']:.3f} | {r['score_shortfall']:.4f} | {r['batch1']['qps']} | "
                         f"{r['batch1']['p50_ms']} | {r['batch64']['qps']} | {r['batch64']['p50_ms']} | {versus} |")
        lookup = search.get("rescoring_query")
        if lookup:
            lines += ["", f"Scoring {lookup['restricted search']['products']} candidate products exactly for one query row: "
                      f"a search restricted to them (HNSW's rescoring), p50 {lookup['restricted search']['p50_ms']} ms; "
                      "a `product_id in [...]` query returning their stored vectors (IVF-PQ's), p50 "
                      f"{lookup['query with vectors']['p50_ms']} ms."]
        filtered = search.get("filtered", {})
        if filtered:
            shares = results["category_shares"]
            lines += ["", "## 2. Filters and the category partition key", "",
                      "Milvus HNSW (same build and efSearch) with and without the category partition key "
                      f"({results.get('partitions', 16)} partitions, {len(shares)} categories), FAISS hnsw alongside "
                      "(path: how ProductIndex answered). Filter = one category; photos of products in it (in) or "
                      "of any product (any: mostly outside it). recall@10 against the exact filtered top 10; full: "
                      "share of queries that got 10 products.", "",
                      "| filter | photos | system | recall@10 | full | q/s batch 1 | p50 ms batch 1 | q/s batch 64 | "
                      "p50 ms a call, batch 64 |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
            systems = [("FAISS hnsw", "faiss")] + [(f"Milvus HNSW, {'partition key' if n == 'hnsw_pk' else 'no partition key'}", n)
                                                  for n in filtered if n != "faiss"]
            for case in filtered.get("faiss", {}):
                category, _, where = case.partition(" ")
                label = "none" if case == "none" else f"{category} ({shares.get(category, 0):.1%} of vectors)"
                for system, key in systems:
                    r = filtered.get(key, {}).get(case)
                    if r is None:
                        continue
                    path = f" ({r['path']})" if "path" in r else ""
                    lines.append(f"| {label} | {where or 'any'} | {system}{path} | {r['recall_at_10']:.3f} | {r['full_top_k']:.2f} | "
                                 f"{r['batch1']['qps']} | {r['batch1']['p50_ms']} | {r['batch64']['qps']} | {r['batch64']['p50_ms']} |")
            pk, nopk = filtered.get("hnsw_pk"), filtered.get("hnsw_nopk")
            if pk and nopk:
                lines += ["", "Partition key on / off (Milvus HNSW), q/s:", "",
                          "| filter | photos | batch 1 | batch 64 | recall@10 on / off |", "|---|---|---:|---:|---|"]
                for case in pk:
                    category, _, where = case.partition(" ")
                    lines.append(f"| {category} | {where or 'any'} | {ratio(pk[case]['batch1']['qps'], nopk[case]['batch1']['qps'])} | "
                                 f"{ratio(pk[case]['batch64']['qps'], nopk[case]['batch64']['qps'])} | "
                                 f"{pk[case]['recall_at_10']:.3f} / {nopk[case]['recall_at_10']:.3f} |")
                where = search.get("collections", {}).get("hnsw_pk", {}).get("partitions") or {}
                if "error" in where:
                    lines += ["", f"(partitions of the filtered categories: not found: {where['error']})"]
                elif where:
                    lines += ["", f"With the partition key, {where['nonempty_partitions']} of {results.get('partitions')} partitions "
                              "hold rows (CRC-32 of the category, as Milvus hashes it: "
                              + ("matches" if where["hash_matches_row_counts"] else "does NOT match")
                              + " the partitions' row counts); a filtered search reads its category's partition:"]
                    for category in search["filtered"]["hnsw_pk"]:
                        w = where.get(category.partition(" ")[0])
                        if w and category.endswith(" in"):
                            lines.append(f"- {category.partition(' ')[0]}: {w['partition']}, {w['rows']:,} of its "
                                         f"{w['partition_rows']:,} rows" + (f" (shared with {', '.join(w['shared_with'])})"
                                                                            if w["shared_with"] else ""))
    e2e = results.get("e2e", {})
    if e2e:
        lines += ["", "## 3. End to end: visual_search", "", e2e.get("setup", ""), "",
                  "| backend | round | requests | errors | q/s | p50 ms | p95 ms | p99 ms | product_search ms a request | "
                  "product_search mean batch | CPU ms a photo (all processes) | of which Milvus |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for backend in ("faiss", "milvus"):
            b = e2e.get(backend)
            if not b:
                continue
            for i, r in enumerate(b["rounds"]):
                ps = r["stages"].get("product_search", {})
                cpu = r.get("cpu_ms_per_image", {})
                of_milvus = f"{cpu['milvus']:.0f}" if "milvus" in cpu else "–"
                lines.append(f"| {backend} | {i + 1} | {r['requests']} | {r['errors']} | {r['images_per_s']:.1f} | {r['p50_ms']:.0f} | "
                             f"{r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {ps.get('total_ms', float('nan')):.1f} | "
                             f"{ps.get('mean_batch', float('nan')):.1f} | {sum(cpu.values()):.0f} | {of_milvus} |")
        if "faiss" in e2e and "milvus" in e2e:
            f, m = e2e["faiss"], e2e["milvus"]
            lines += ["", f"- milvus / faiss throughput (all rounds): **{m['qps'] / f['qps']:.2f}** "
                      f"({m['qps']:.1f} / {f['qps']:.1f} q/s; target >= 0.8)",
                      f"- milvus / faiss p50: {m['p50_ms'] / f['p50_ms']:.2f}, p95: {m['p95_ms'] / f['p95_ms']:.2f}",
                      "- same answers: " + ", ".join(f"{k} {v:.2f}" for k, v in e2e.get("same_results", {}).items())]
        if "milvus_idle_cpu" in results:
            lines.append(f"- Milvus standalone idle (no collection loaded): {results['milvus_idle_cpu']:.1%} of a core")
    if search:
        hnsw = search["rows"].get("milvus hnsw_nopk")
        if hnsw:
            lines += [f"- Milvus HNSW (the default: no partition key) recall@10: **{hnsw['recall_at_10']:.3f}** (target >= 0.95)"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=100_000, help="synthetic catalog vectors (search only)")
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--families", type=int, default=1000, help="product families (categories are made of them)")
    parser.add_argument("--group", type=int, default=10, help="vectors a product (its image and catalog views)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--filter-queries", type=int, default=200, help="queries of each filtered case")
    parser.add_argument("--seconds", type=float, default=8.0, help="each throughput point (filtered: half)")
    parser.add_argument("--no-milvus-flat", action="store_true", help="skip Milvus FLAT")
    parser.add_argument("--catalog", type=Path, default=ROOT / "data" / "sample_catalog" / "catalog.csv",
                        help="the catalog indexed on each end-to-end server")
    parser.add_argument("--per-category", type=int, default=0, help="end to end: only the first N products of each "
                        "category of --catalog (0: all)")
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--photos", type=Path, default=ROOT / "data" / "sample_catalog" / "queries",
                        help="folder of query photos sent end to end (the same to both backends)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--e2e-requests", type=int, default=300, help="requests of each measured round")
    parser.add_argument("--e2e-rounds", type=int, default=2)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--skip-search", action="store_true", help="only the end-to-end part")
    parser.add_argument("--skip-e2e", action="store_true", help="only the search-only parts")
    parser.add_argument("--milvus-wait-s", type=float, default=1800, help="how long to wait for another Milvus to stop")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_backends")
    args = parser.parse_args()

    import pymilvus

    from lookalike.indexing.milvus_index import PARTITIONS

    command = "python -m loadtest.benchmarks.bench_backends " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    machine = f"{platform.node()} ({os.cpu_count()} CPUs), {platform.platform()}, Python {platform.python_version()}"
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lookalike-bench-backends-"))
    results: dict[str, Any] = {"command": command, "machine": machine, "milvus_version": "2.3.5 standalone (local)",
                               "pymilvus": pymilvus.__version__, "partitions": PARTITIONS,
                               "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}

    def save() -> None:
        (args.out / "bench_backends.json").write_text(json.dumps(results, indent=2, default=str) + "\n")

    milvus = None
    ok = False
    try:
        data = truth = filter_truth = None
        if not args.skip_search:
            print(f"synthetic catalog: {args.vectors:,} x {args.dim}", flush=True)
            data = Synthetic(args)
            results["category_shares"] = {k: round(v, 4) for k, v in data.category_shares.items()}
            print("FAISS (no Milvus running)", flush=True)
            faiss_out, truth, filter_truth = faiss_phase(data, args)
            results["search"] = {"rows": faiss_out["rows"], "filtered": {"faiss": faiss_out["filtered"]},
                                 "hnsw_choice": faiss_out["hnsw_choice"]}
            save()
        images: list[bytes] = []
        catalog = args.catalog
        if not args.skip_e2e:
            images = [p.read_bytes() for p in sorted(args.photos.iterdir()) if p.suffix.lower() in (".png", ".jpg", ".jpeg")]
            catalog = small_catalog(args.catalog, args.per_category, work)
            e2e: dict[str, Any] = {"setup": (
                f"{catalog if args.per_category else args.catalog} indexed (index hnsw) on each server"
                + (f" ({args.per_category} products a category of {args.catalog})" if args.per_category else "")
                + f"; {len(images)} query photos of {args.photos} (the same to both), top_k {args.top_k}; "
                f"{args.concurrency} gRPC clients in a closed loop, {args.e2e_rounds} rounds of {args.e2e_requests} "
                "requests after a warm-up (every photo once); one tritonserver at a time; product_search ms: Triton's "
                "mean time a request in the model (queue + compute); CPU: tritonserver and its model processes "
                "(and Milvus's) over the round, per photo; faiss measured with no Milvus running")}
            results["e2e"] = e2e
            print("end to end: faiss", flush=True)
            e2e["faiss"] = end_to_end("faiss", catalog, images, work, args)
            save()
        milvus = start_milvus(work, args.milvus_wait_s)
        print(f"Milvus standalone at {milvus.uri}", flush=True)
        if data is not None and truth is not None and filter_truth is not None:
            out = milvus_phase(milvus, data, truth, filter_truth, results["search"]["hnsw_choice"], args)
            results["search"]["rows"].update(out["rows"])
            results["search"]["filtered"].update(out["filtered"])
            results["search"]["collections"] = out["collections"]
            results["search"]["rescoring_query"] = out.get("rescoring_query")
            save()
        assert milvus.process is not None
        cpu_before = group_usage(milvus.process.pid)[1]
        time.sleep(10)
        results["milvus_idle_cpu"] = (group_usage(milvus.process.pid)[1] - cpu_before) / 10
        if not args.skip_e2e:
            print("end to end: milvus", flush=True)
            e2e = results["e2e"]
            e2e["milvus"] = end_to_end("milvus", catalog, images, work, args, milvus=milvus)
            e2e["same_results"] = same_results({"lookalike": e2e["faiss"]["answers"], "milvus vs faiss": e2e["milvus"]["answers"]})
            save()
        ok = True
    finally:
        if milvus is not None:
            milvus.stop()
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"failed: logs kept in {work}", file=sys.stderr)
        save()
    text = markdown(results)
    (args.out / "bench_backends.md").write_text(text)
    print("\n" + text)
    print(f"wrote {args.out / 'bench_backends.json'}, {args.out / 'bench_backends.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
