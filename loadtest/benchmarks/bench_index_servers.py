"""`make bench-index-servers`: `lookalike index` of one catalog through 1 server, then through 2, on one
model repository (as on a shared volume), every image embedded each time (`--full`: reuse=False).

Starts the largest of --servers tritonservers on this machine (free loopback ports, `lookalike.server.serve.
lookalike_server`, as the integration tests do) over one copy of --model-repository, so that every
server serves the repository that `index` writes into. Each server first embeds a few images (the
first requests of a model are slow), then each point indexes the whole catalog through the first N
servers with --concurrency requests in flight per server, and reports catalog images per second over
the whole run (check, hashing, embedding, build, publish on every server) and over the embedding alone,
the images each server embedded, and the ratio to the first point. Servers that a point does not use
stay up, idle. On one machine the servers share its cores: a gain needs cores the first server leaves
idle; across machines each brings its own.

Writes OUT/bench_index_servers.json and OUT/bench_index_servers.md.

    .venv/bin/python -m loadtest.benchmarks.bench_index_servers --catalog data/sample_catalog/catalog.csv --out results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def machine() -> str:
    return f"{platform.node()} ({os.cpu_count()} CPUs), {platform.platform()}, Python {platform.python_version()}"


def warm_up(clients, catalog: Path, images: int) -> None:
    """A few real catalog images through each server's embed_image, outside the measurement."""
    from lookalike.indexing.catalog import read_catalog

    items, _ = read_catalog(catalog)
    data = [item.image.read_bytes() for item in items[:images]]
    for client in clients:
        client.embed(data)


def embedder_setup(repository: Path) -> str:
    """How each server runs the embedder (from its config.pbtxt): instances and ONNX Runtime threads."""
    from lookalike.indexing.model_configs import CONFIG_FILE, parameters, read

    config = read(repository / "embedder" / CONFIG_FILE)
    instances = sum(group.count or 1 for group in config.instance_group) or 1
    threads = parameters(config).get("intra_op_threads", "default")
    return f"{config.backend or config.platform}, {instances} instance(s), intra_op_threads {threads}"


def table(points: list[dict]) -> list[str]:
    rows = ["| servers | images embedded | vectors | total s | images/s | embedding s | embedding images/s | "
            "ratio (images/s) | images per server |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for p in points:
        per = ", ".join(f"{url} {n}" for url, n in p["embedded_by"].items())
        rows.append(f"| {p['servers']} | {p['embedded']:,} | {p['vectors']:,} | {p['seconds']:.1f} | {p['images_per_s']:.2f} | "
                    f"{p['embedding_seconds']:.1f} | {p['embedding_images_per_s']:.2f} | {p['ratio']:.2f} | {per} |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", type=Path, default=ROOT / "data" / "sample_catalog" / "catalog.csv")
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--servers", type=int, nargs="+", default=[1, 2], help="server counts, one point each, in order")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight per server (index's default)")
    parser.add_argument("--batch-size", type=int, default=16, help="catalog rows a request (index's default)")
    parser.add_argument("--warmup", type=int, default=8, help="images each server embeds before the points")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    args = parser.parse_args()
    if min(args.servers) < 1:
        parser.error("--servers: 1 or more")

    from lookalike.indexing.indexer import index_catalog
    from lookalike.indexing.repository import copy_repository
    from lookalike.server.launcher import ServerOptions, free_port
    from lookalike.server.serve import lookalike_server
    from lookalike_client import LookalikeClient

    command = "python -m loadtest.benchmarks.bench_index_servers " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    work = Path(tempfile.mkdtemp(prefix="lookalike-bench-index-servers-"))
    repo = copy_repository(args.model_repository, work / "model_repository")  # one repository for every server
    servers = []
    clients = []
    points: list[dict] = []
    try:
        started = time.perf_counter()
        for i in range(max(args.servers)):
            options = ServerOptions(model_repository=repo.root, http_port=free_port(), grpc_port=free_port(),
                                    metrics_port=free_port(), health_port=None, server_id=f"lookalike-bench-{i + 1}")
            servers.append(lookalike_server(options, log_file=work / f"tritonserver-{i + 1}.log").start())
        for server in servers:
            server.wait_ready()
        print(f"{len(servers)} tritonservers ready on {repo.root} in {time.perf_counter() - started:.0f} s", flush=True)
        clients = [LookalikeClient(s.options.grpc_url, timeout_s=120) for s in servers]
        warm_up(clients, args.catalog, args.warmup)
        info = clients[0].info()
        setup = embedder_setup(repo.root)
        for n in args.servers:
            report = index_catalog(args.catalog, repo, clients[:n], reuse=False, progress=False,
                                   concurrency=args.concurrency, batch_size=args.batch_size)
            point = {"servers": n, "urls": report.servers, "embedded": report.embedded, "vectors": report.vectors,
                     "failed": report.failed, "products": report.products, "version": report.version,
                     "seconds": report.seconds, "embedding_seconds": report.embedding_seconds,
                     "images_per_s": report.embedded / report.seconds,
                     "embedding_images_per_s": report.embedded / report.embedding_seconds,
                     "embedded_by": report.embedded_by}
            point["ratio"] = point["images_per_s"] / (points[0]["images_per_s"] if points else point["images_per_s"])
            points.append(point)
            print(f"{n} server(s): {report.embedded} images embedded in {report.seconds:.1f} s ({point['images_per_s']:.2f} "
                  f"images/s; embedding {report.embedding_seconds:.1f} s, {point['embedding_images_per_s']:.2f} images/s), "
                  f"per server {report.embedded_by}, index version {report.version} on {len(report.servers)}", flush=True)
    finally:
        for client in clients:
            client.close()
        for server in servers:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    views = points[0]["vectors"] / max(1, points[0]["embedded"])
    results = {
        "command": command, "machine": machine(), "tritonserver": info.server_version, "embedder": info.embedder_model,
        "embedder_setup": setup, "catalog": str(args.catalog), "concurrency_per_server": args.concurrency,
        "batch_size": args.batch_size,
        "vectors_per_image": views, "points": points,
        "ratio": {f"{p['servers']} servers / {points[0]['servers']}": p["ratio"] for p in points[1:]},
        "note": "every server on this machine, sharing its cores; images/s counts catalog images (each embedded with "
                "its catalog views) over the whole `lookalike index` run",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_index_servers.json").write_text(json.dumps(results, indent=2) + "\n")
    md = [
        "# `lookalike index` through several servers on one repository",
        "",
        f"`{command}` on {machine()}; tritonserver {info.server_version}, embedder {info.embedder_model} on each "
        f"server: {setup}; {args.catalog}, every image embedded each time (reuse=False), "
        f"{views:.0f} vectors an image (the packshot and its catalog views); {args.concurrency} requests in flight "
        f"per server, {args.batch_size} catalog rows a request. Every server runs on this machine, so they share "
        "its cores.",
        "",
        *table(points),
        "",
    ]
    (args.out / "bench_index_servers.md").write_text("\n".join(md))
    print("\n".join(table(points)))
    print(f"wrote {args.out / 'bench_index_servers.json'}, {args.out / 'bench_index_servers.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
