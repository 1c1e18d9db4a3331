"""Benchmark: visual_search on a real tritonserver vs the same pipeline in one process, in one run.

Starts its own server (same launcher as `lookalike serve`) on free loopback ports over a copy of the
model repository, indexes the sample catalog, then measures with the same query photos:

  server, 1 request at a time       latency of a single request (gRPC and HTTP)
  server, 8 concurrent clients      throughput and latency under load (gRPC and HTTP)
  in process, 1 image at a time     Preprocessor -> ONNX Runtime -> FAISS, no server, no network
  in process, batches of 8          the same, batched like the server's dynamic batcher can

Prints a table, writes OUT/bench.json and OUT/bench.png. Absolute numbers depend on the machine;
compare the ratios, which come from one run on one machine.

    .venv/bin/python loadtest/bench.py --catalog data/sample_catalog --out results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def percentiles(samples_ms: list[float]) -> dict:
    a = np.asarray(samples_ms)
    return {"p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean())}


def run_server_load(url: str, protocol: str, images: list[bytes], concurrency: int, requests: int, top_k: int) -> dict:
    from lookalike_client import LookalikeClient

    latencies: list[float] = []
    with LookalikeClient(url, protocol=protocol, timeout_s=120) as client:
        for data in images[: min(8, len(images))]:  # warm-up
            client.search(data, top_k=top_k)

        def worker(worker_id: int) -> list[float]:
            out = []
            for i in range(worker_id, requests, concurrency):
                start = time.perf_counter()
                client.search(images[i % len(images)], top_k=top_k)
                out.append((time.perf_counter() - start) * 1000)
            return out

        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            for part in pool.map(worker, range(concurrency)):
                latencies += part
        wall = time.perf_counter() - started
    return {"requests": len(latencies), "concurrency": concurrency, "images_per_s": len(latencies) / wall,
            **percentiles(latencies)}


def run_in_process(repo, images: list[bytes], batch: int, requests: int, top_k: int) -> dict:
    from lookalike.embedding import OnnxEmbedder
    from lookalike.preprocessing import Preprocessor
    from lookalike.search import ProductIndex

    preprocessor = Preprocessor(repo.preprocessing().for_side("query"))  # as visual_search's preprocess_query
    embedder = OnnxEmbedder(repo.onnx_file)
    index = ProductIndex.load(repo.latest_index_dir())

    def pipeline(chunk: list[bytes]):
        return index.search(embedder(preprocessor.batch(chunk)), top_k)

    pipeline(images[:batch])  # warm-up
    latencies = []
    started = time.perf_counter()
    done = 0
    while done < requests:
        chunk = [images[(done + j) % len(images)] for j in range(batch)]
        start = time.perf_counter()
        pipeline(chunk)
        latencies.append((time.perf_counter() - start) * 1000)
        done += batch
    wall = time.perf_counter() - started
    return {"requests": done, "batch": batch, "images_per_s": done / wall, **percentiles(latencies)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", type=Path, default=ROOT / "data" / "sample_catalog")
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--requests", type=int, default=200, help="requests per measurement")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=10)
    args = parser.parse_args()

    from lookalike.indexer import index_catalog
    from lookalike.repository import copy_repository
    from lookalike.serve import lookalike_server
    from lookalike.server import ServerOptions, free_port
    from lookalike_client import LookalikeClient

    queries = sorted((args.catalog / "queries").iterdir())
    images = [q.read_bytes() for q in queries if q.suffix.lower() in (".jpg", ".png")]
    if not images:
        raise SystemExit(f"no query images in {args.catalog / 'queries'}: run `make catalog`")
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lookalike-bench-"))
    try:
        repo_dir = work / "model_repository"
        repo = copy_repository(args.model_repository, repo_dir)
        options = ServerOptions(model_repository=repo_dir, http_port=free_port(), grpc_port=free_port(),
                                metrics_port=free_port())
        results: dict = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                                     "python": platform.python_version()},
                         "embedder": repo.manifest().model, "query_images": len(images), "top_k": args.top_k}
        with lookalike_server(options, log_file=work / "tritonserver.log") as server:
            with LookalikeClient(options.grpc_url) as client:
                report = index_catalog(args.catalog / "catalog.csv", repo, client, progress=False)
            results["catalog_products"] = report.products
            rows = {}
            for protocol, url in (("grpc", options.grpc_url), ("http", options.http_url)):
                rows[f"server {protocol}, 1 at a time"] = run_server_load(url, protocol, images, 1, args.requests // 2, args.top_k)
                rows[f"server {protocol}, {args.concurrency} concurrent"] = run_server_load(
                    url, protocol, images, args.concurrency, args.requests, args.top_k)
            server.stop()
        rows["in process, 1 at a time"] = run_in_process(repo, images, 1, args.requests // 2, args.top_k)
        rows[f"in process, batches of {args.concurrency}"] = run_in_process(repo, images, args.concurrency, args.requests, args.top_k)
        results["rows"] = rows
    finally:
        shutil.rmtree(work, ignore_errors=True)

    one = rows["in process, 1 at a time"]
    batched = rows[f"in process, batches of {args.concurrency}"]
    grpc_rate = rows[f"server grpc, {args.concurrency} concurrent"]["images_per_s"]
    http_rate = rows[f"server http, {args.concurrency} concurrent"]["images_per_s"]
    results["ratios"] = {
        "grpc_single_latency_vs_in_process": rows["server grpc, 1 at a time"]["p50_ms"] / one["p50_ms"],
        "grpc_concurrent_throughput_vs_in_process_batched": grpc_rate / batched["images_per_s"],
        "http_concurrent_throughput_vs_grpc": http_rate / grpc_rate,
    }
    print(f"\nvisual_search, {results['embedder']}, {results['catalog_products']} products, top_k {args.top_k}, "
          f"{len(images)} query photos, {os.cpu_count()} CPU cores")
    print(f"| {'what':<30} | {'images/s':>9} | {'p50 ms':>7} | {'p90 ms':>7} | {'p99 ms':>7} |")
    print(f"|{'-' * 32}|{'-' * 11}|{'-' * 9}|{'-' * 9}|{'-' * 9}|")
    for name, r in rows.items():
        print(f"| {name:<30} | {r['images_per_s']:>9.1f} | {r['p50_ms']:>7.1f} | {r['p90_ms']:>7.1f} | {r['p99_ms']:>7.1f} |")
    for name, value in results["ratios"].items():
        print(f"{name}: {value:.2f}")
    (args.out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
        names = list(rows)
        left.barh(names, [rows[n]["images_per_s"] for n in names], color="#3a7")
        left.set_xlabel("images / s")
        right.barh(names, [rows[n]["p50_ms"] for n in names], color="#37c", label="p50")
        right.barh(names, [rows[n]["p99_ms"] - rows[n]["p50_ms"] for n in names],
                   left=[rows[n]["p50_ms"] for n in names], color="#9bd", label="p99")
        right.set_xlabel("latency per request, ms")
        right.set_yticks([])
        right.legend()
        fig.suptitle(f"visual_search vs in-process, {results['embedder']}, {os.cpu_count()} cores")
        fig.tight_layout()
        fig.savefig(args.out / "bench.png", dpi=100)
    except ImportError:
        pass
    print(f"wrote {args.out / 'bench.json'} and {args.out / 'bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
