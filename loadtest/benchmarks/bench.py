"""`make bench`: lookalike's visual_search against the same pipeline in process and against a FastAPI
peer, in one run, on one machine, with the same full-size phone JPEGs (`phone_photos.py`).

  (a) in process     Preprocessor (query side) -> ONNX Runtime -> FAISS, no server: one photo at a
                     time (the loop an app would write), and batches of 8
  (b) lookalike      visual_search over gRPC and HTTP through the client SDK, through the socket and
                     with the photos in shared memory, at each --concurrency
  (c) FastAPI peer   `fastapi_peer.py` under uvicorn with the same ONNX model and index version: its
                     `async def` endpoint and its thread-pool endpoint, at the same concurrencies

Closed loop: `c` client threads, each sending its next photo when the last one is answered. Every
point reports throughput, p50/p95/p99 latency and, for lookalike, where the server's time went:
per model, from Triton's own statistics (/v2/models/stats) before and after the point. The CPU-time
limit is the machine's cores over one photo's single-thread CPU time (decode + preprocess, the
embedder at batch 8, the search), measured here in process.

lookalike runs on its own tritonserver (free loopback ports) over a copy of --model-repository,
serving the repository's newest index version (the one `make demo` built), or the --catalog indexed
into the copy when there is none. --url measures a running server instead (its host; --grpc-port and
--http-port), which must serve the repository's newest index version.

Writes OUT/bench.json, OUT/bench.md and OUT/bench.png (throughput and p99 against concurrency).

    .venv/bin/python -m loadtest.benchmarks.bench --catalog data/sample_catalog/catalog.csv --out results/bench
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from loadtest.phone_photos import phone_photos

ROOT = Path(__file__).resolve().parents[2]
STAGE_MODELS = ("preprocess_query", "embedder", "product_search")
STAGE_PARTS = ("queue", "compute_input", "compute_infer", "compute_output")
PROBES = 8  # photos whose results are compared across (a), (b) and (c): the same work gives the same products


# --- measuring ---------------------------------------------------------------------------------------

def summary(latencies_ms: list[float], wall_s: float, errors: int = 0) -> dict:
    a = np.asarray(latencies_ms)
    return {"requests": len(a), "errors": errors, "images_per_s": len(a) / wall_s,
            "p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean())}


def closed_loop(call: Callable[[int, bytes], object], images: list[bytes], concurrency: int, requests: int) -> dict:
    """`concurrency` threads, each calling `call(worker, image)` until `requests` calls are done in all
    (after one warm-up call each, not counted). A call that raises counts as an error."""
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda w: call(w, images[w % len(images)]), range(concurrency)))
    counter = iter(range(requests))
    lock = threading.Lock()
    errors = [0]

    def worker(w: int) -> list[float]:
        out = []
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return out
            start = time.perf_counter()
            try:
                call(w, images[i % len(images)])
            except Exception:  # noqa: BLE001 - counted, and the benchmark says so
                with lock:
                    errors[0] += 1
                continue
            out.append((time.perf_counter() - start) * 1000)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = [x for part in pool.map(worker, range(concurrency)) for x in part]
    result = summary(latencies, time.perf_counter() - started, errors[0])
    result["concurrency"] = concurrency
    return result


def warm_up(call: Callable[[int, bytes], object], images: list[bytes]) -> None:
    """Every photo once, 4 at a time, not counted: caches, allocators and lazy initialisation settle
    before the first point (otherwise concurrency 1, measured first, pays for them)."""
    closed_loop(call, images, 4, len(images))


def requests_for(concurrency: int, base: int) -> int:
    return max(base, 8 * concurrency)


# --- (a) in process ----------------------------------------------------------------------------------

class InProcess:
    def __init__(self, repo, index_dir: Path) -> None:
        from lookalike.serving.embedding import OnnxEmbedder
        from lookalike.serving.gpu import set_threads
        from lookalike.serving.query_views import ViewPreprocessor
        from lookalike.serving.search import ProductIndex

        # the served query side: its views (lookalike.serving.query_views), searched and fused as product_search does
        self.preprocessor = ViewPreprocessor(repo.preprocessing(), repo.image_limits())
        self.fusion = repo.preprocessing().query_fusion
        self.embedder = OnnxEmbedder(repo.onnx_file)  # ONNX Runtime's defaults: a thread per core
        self.onnx_file = repo.onnx_file
        set_threads(1)  # as product_search's faiss_threads
        self.index = ProductIndex.load(index_dir)

    def loop(self, images: list[bytes], batch: int, requests: int, top_k: int) -> dict:
        def pipeline(chunk: list[bytes]) -> None:
            self.search(chunk, top_k)

        pipeline(images[:batch])  # warm-up
        latencies, done = [], 0
        started = time.perf_counter()
        while done < requests:
            chunk = [images[(done + j) % len(images)] for j in range(batch)]
            start = time.perf_counter()
            pipeline(chunk)
            latencies.append((time.perf_counter() - start) * 1000)
            done += batch
        wall = time.perf_counter() - started
        return {**summary(latencies, wall), "requests": done, "images_per_s": done / wall, "batch": batch}

    def search(self, images: list[bytes], top_k: int) -> list[list[str]]:
        from lookalike.serving.product_search import search_views

        pixels = self.preprocessor.batch(images)
        embeddings = self.embedder(pixels.reshape(-1, *pixels.shape[2:]))
        return search_views(self.index, embeddings, len(self.preprocessor), top_k, self.fusion)[0]

    def ids(self, image: bytes, top_k: int) -> list[str]:
        return self.search([image], top_k)[0]

    def stage_costs(self, images: list[bytes], top_k: int) -> dict:
        """Single-thread CPU time of one photo's stages, ms: what bounds any server on this machine."""
        from lookalike.serving.embedding import OnnxEmbedder

        def timed(fn: Callable[[], object], repeat: int) -> float:
            fn()
            start = time.perf_counter()
            for _ in range(repeat):
                fn()
            return (time.perf_counter() - start) / repeat * 1000

        start = time.perf_counter()
        pixels = np.stack([self.preprocessor(d) for d in images])  # [N, V, 3, H, W]
        preprocess = (time.perf_counter() - start) / len(images) * 1000
        one_thread = OnnxEmbedder(self.onnx_file, intra_op_threads=1)
        views = len(self.preprocessor)
        batch = pixels[: max(1, 8 // views)].reshape(-1, *pixels.shape[2:])
        embed = timed(lambda: one_thread(batch), 10) / len(batch) * views  # a photo's views
        embeddings = one_thread(pixels[0])
        from lookalike.serving.product_search import search_views

        search = timed(lambda: search_views(self.index, embeddings, views, top_k, self.fusion), 200)
        return {"preprocess_ms": preprocess, "embed_ms_at_batch_8": embed, "search_ms": search,
                "total_ms": preprocess + embed + search}


# --- (b) lookalike -----------------------------------------------------------------------------------

def stats(http_url: str) -> dict[str, dict]:
    with urllib.request.urlopen(f"http://{http_url}/v2/models/stats", timeout=30) as response:
        body = json.load(response)
    out = {}
    for model in body["model_stats"]:
        s = model["inference_stats"]
        out[model["name"]] = {"inferences": int(model["inference_count"]), "executions": int(model["execution_count"]),
                              "success": int(s["success"]["count"]),
                              **{part: int(s[part]["ns"]) for part in STAGE_PARTS}, "success_ns": int(s["success"]["ns"])}
    return out


def breakdown(before: dict[str, dict], after: dict[str, dict]) -> dict:
    """Per model: ms per request in each part, and the mean batch each execution got."""
    out = {}
    for model in ("visual_search", *STAGE_MODELS):
        if model not in before or model not in after:
            continue
        delta = {k: after[model][k] - before[model][k] for k in after[model]}
        requests = max(delta["success"], 1)
        row = {part: delta[part] / requests / 1e6 for part in STAGE_PARTS}
        row["total_ms"] = delta["success_ns"] / requests / 1e6
        if model != "visual_search":
            row["mean_batch"] = delta["inferences"] / max(delta["executions"], 1)
        out[model] = row
    return out


def cpu_seconds(server_pid: int | None) -> dict[str, float]:
    """CPU seconds (user + system) so far of this process (the benchmark's clients) and, given the
    server's pid, of tritonserver itself and of its Python-backend stubs, summed per model."""
    import psutil

    def used(p: psutil.Process) -> float:
        t = p.cpu_times()
        return t.user + t.system

    out = {"client": used(psutil.Process())}
    if server_pid is None:
        return out
    server = psutil.Process(server_pid)
    out["tritonserver"] = used(server)
    for child in server.children(recursive=True):
        try:
            model = Path(child.cmdline()[1]).parent.parent.name  # the stub's argv[1]: <repo>/<model>/<version>/model.py
            out[model] = out.get(model, 0.0) + used(child)
        except (psutil.Error, IndexError):
            continue
    return out


def cpu_per_image(before: dict[str, float], after: dict[str, float], images: int) -> dict[str, float]:
    """CPU ms a photo, per process (stubs summed per model)."""
    return {name: (after[name] - before.get(name, 0.0)) * 1000 / max(images, 1) for name in after}


def measure_lookalike(grpc_url: str, http_url: str, images: list[bytes], concurrencies: list[int],
                      protocols: list[str], base_requests: int, top_k: int, server_pid: int | None,
                      shared_memory: bool) -> dict:
    """Each protocol through the socket and, with `shared_memory`, with the photos in system shared
    memory (the client on the server's host)."""
    from lookalike_client import NO_RETRIES, LookalikeClient

    rows = {}
    for protocol, shm in [(p, s) for p in protocols for s in ((False, True) if shared_memory else (False,))]:
        url = grpc_url if protocol == "grpc" else http_url
        system = f"lookalike {protocol}" + (" + shm" if shm else "")
        with LookalikeClient(url, protocol=protocol, timeout_s=300, shared_memory=shm,
                             retry=NO_RETRIES) as client:
            warm_up(lambda _w, data: client.search(data, top_k=top_k), images)
            for concurrency in concurrencies:
                before, cpu_before = stats(http_url), cpu_seconds(server_pid)
                row = closed_loop(lambda _w, data: client.search(data, top_k=top_k), images, concurrency,
                                  requests_for(concurrency, base_requests))
                # (the CPU figures include the warm-up calls; close enough at >= 8 calls a client)
                row["cpu_ms_per_image"] = cpu_per_image(cpu_before, cpu_seconds(server_pid), row["requests"] + concurrency)
                row["stages"] = breakdown(before, stats(http_url))
                rows[f"{system} c={concurrency}"] = {"system": system, **row}
                print(f"  {system} c={concurrency}: {row['images_per_s']:.1f} img/s, p50 {row['p50_ms']:.0f} ms", flush=True)
    return rows


# --- (c) the FastAPI peer ------------------------------------------------------------------------------

def multipart(data: bytes, boundary: str) -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"photo.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()


class PeerClient:
    """A keep-alive HTTP connection per client thread, the way requests.Session would."""

    def __init__(self, port: int, path: str, top_k: int) -> None:
        self.port, self.path, self.top_k = port, path, top_k
        self.local = threading.local()

    def __call__(self, _worker: int, data: bytes) -> dict:
        connection = getattr(self.local, "connection", None)
        if connection is None:
            connection = self.local.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        boundary = uuid.uuid4().hex
        connection.request("POST", f"{self.path}?top_k={self.top_k}", body=multipart(data, boundary),
                           headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"peer answered {response.status}: {body[:200]!r}")
        return json.loads(body)


def same_results(answers: dict[str, list[list[str]]]) -> dict[str, float]:
    """Per other system, the share of probe photos for which it returned lookalike's top product, and
    the mean overlap of the top-k lists (float rounding in batched inference may swap near-ties)."""
    ours = answers["lookalike"]
    out = {}
    for name, theirs in answers.items():
        if name == "lookalike":
            continue
        out[f"{name}: same top 1"] = float(np.mean([a[:1] == b[:1] for a, b in zip(ours, theirs)]))
        out[f"{name}: top-k overlap"] = float(np.mean([len(set(a) & set(b)) / max(len(a), 1) for a, b in zip(ours, theirs)]))
    return out


def start_peer(repo_dir: Path, index_dir: Path, port: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PEER_MODEL_REPOSITORY=str(repo_dir), PEER_INDEX_DIR=str(index_dir))
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "fastapi_peer:app", "--app-dir", str(Path(__file__).parent),
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log"],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the FastAPI peer exited ({process.returncode}): see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return process
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit(f"the FastAPI peer did not answer in 120 s: see {log}")


def measure_peer(port: int, images: list[bytes], concurrencies: list[int], base_requests: int, top_k: int) -> dict:
    rows = {}
    for path, name in (("/search", "FastAPI async def"), ("/search_threadpool", "FastAPI threadpool")):
        warm_up(PeerClient(port, path, top_k), images)
        for concurrency in concurrencies:
            row = closed_loop(PeerClient(port, path, top_k), images, concurrency, requests_for(concurrency, base_requests))
            rows[f"{name} c={concurrency}"] = {"system": name, **row}
            print(f"  {name} c={concurrency}: {row['images_per_s']:.1f} img/s, p50 {row['p50_ms']:.0f} ms", flush=True)
    return rows


# --- the machine, the report ---------------------------------------------------------------------------

def products_in(index_dir: Path | None) -> int:
    from lookalike.serving.artifacts import IndexMeta

    return 0 if index_dir is None else IndexMeta.load(index_dir).count


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = None
    try:
        memory_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    import onnxruntime

    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": memory_gib, "gpu": "none used",
            "platform": platform.platform(), "python": platform.python_version(), "onnxruntime": onnxruntime.__version__}


def ratios(rows: dict, concurrencies: list[int]) -> dict:
    """lookalike at saturation against the in-process loop; each lookalike system's p50 at concurrency
    1 against in process, and its throughput and p99 against each peer endpoint at each concurrency."""
    loop = rows["in process, 1 photo at a time"]
    out: dict = {}
    ours = sorted({r["system"] for r in rows.values() if r.get("system", "").startswith("lookalike")})
    servers = [r for r in rows.values() if r.get("system", "") in ours]
    if servers:
        best = max(servers, key=lambda r: r["images_per_s"])
        out["saturation: lookalike's best point"] = f"{best['system']} c={best['concurrency']}"
        out["saturation: lookalike / in process, 1 at a time"] = best["images_per_s"] / loop["images_per_s"]
        out["saturation: lookalike / in process, batches of 8"] = (
            best["images_per_s"] / rows["in process, batches of 8"]["images_per_s"])
    for system in ours:
        one = rows.get(f"{system} c=1")
        if one:
            out[f"p50 at c=1: {system} / in process"] = one["p50_ms"] / loop["p50_ms"]
        for peer in ("FastAPI async def", "FastAPI threadpool"):
            for concurrency in concurrencies:
                mine, theirs = rows.get(f"{system} c={concurrency}"), rows.get(f"{peer} c={concurrency}")
                if mine and theirs:
                    key = f"c={concurrency}: {system} / {peer}"
                    out[key + ", throughput"] = mine["images_per_s"] / theirs["images_per_s"]
                    out[key + ", p99"] = mine["p99_ms"] / theirs["p99_ms"]
    return out


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"visual_search, {results['embedder']}, {results['catalog_products']} products, top_k {results['top_k']}, "
             f"{results['photos']} phone JPEGs (mean {results['photo_mb']:.1f} MB), "
             f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, GPU: {m['gpu']}", "",
             "| system | concurrency | images/s | p50 ms | p95 ms | p99 ms | errors |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results["rows"].items():
        system = r.get("system", name)
        concurrency = r.get("concurrency", f"batch {r.get('batch', '')}")
        lines.append(f"| {system} | {concurrency} | {r['images_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | "
                     f"{r['p99_ms']:.0f} | {r['errors']} |")
    limit = results["cpu_limit"]
    lines += ["", f"CPU-time limit: {limit['images_per_s']:.1f} images/s = {m['cores']} cores / "
              f"{limit['total_ms']:.1f} ms a photo (preprocess {limit['preprocess_ms']:.1f}, embedder "
              f"{limit['embed_ms_at_batch_8']:.1f} at batch 8, search {limit['search_ms']:.2f}; one thread each).", ""]
    lines += [f"- {k}: {v:.2f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in results["ratios"].items()]
    lines += ["", f"Same work: on {PROBES} probe photos, against lookalike's results: "
              + ", ".join(f"{k} {v:.2f}" for k, v in results["same_results"].items())]
    lines += ["", "Where lookalike's time went (ms per request, Triton's statistics; batch = mean requests per execution):",
              "", "| point | model | queue | input | infer | output | batch |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, r in results["rows"].items():
        for model, s in r.get("stages", {}).items():
            lines.append(f"| {name} | {model} | {s['queue']:.1f} | {s['compute_input']:.1f} | {s['compute_infer']:.1f} | "
                         f"{s['compute_output']:.1f} | {s.get('mean_batch', float('nan')):.1f} |")
    lines += ["", "CPU ms a photo, per process (the benchmark's client threads share the machine):", ""]
    names = sorted({k for r in results["rows"].values() for k in r.get("cpu_ms_per_image", {})})
    if names:
        lines += ["| point | " + " | ".join(names) + " | all |", "|---|" + "---:|" * (len(names) + 1)]
        for name, r in results["rows"].items():
            cpu = r.get("cpu_ms_per_image")
            if cpu:
                lines.append(f"| {name} | " + " | ".join(f"{cpu.get(k, 0):.1f}" for k in names) + f" | {sum(cpu.values()):.1f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    systems = sorted({r["system"] for r in rows.values() if "system" in r})
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for system in systems:
        points = sorted((r["concurrency"], r) for r in rows.values() if r.get("system") == system)
        xs = [c for c, _ in points]
        style = "-o" if system.startswith("lookalike") else "--s"
        left.plot(xs, [r["images_per_s"] for _, r in points], style, label=system)
        right.plot(xs, [r["p99_ms"] for _, r in points], style, label=system)
    loop = rows["in process, 1 photo at a time"]
    left.axhline(loop["images_per_s"], color="grey", linestyle=":", label="in process, 1 at a time")
    left.axhline(results["cpu_limit"]["images_per_s"], color="black", linestyle="-.", label="CPU-time limit")
    ticks = sorted({r["concurrency"] for r in rows.values() if "concurrency" in r})
    for axis, label in ((left, "images / s"), (right, "p99 latency, ms")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(ticks, [str(t) for t in ticks])
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    right.set_yscale("log")
    left.legend(fontsize=8)
    m = results["machine"]
    fig.suptitle(f"visual_search, phone JPEGs: lookalike vs in process vs FastAPI peer ({m['cores']} CPU cores, {m['cpu']}, no GPU)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# --- main -------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", type=Path, default=ROOT / "data" / "sample_catalog" / "catalog.csv",
                        help="the catalog the photos are of (indexed when the repository has no index)")
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    parser.add_argument("--photos", type=int, default=48, help="phone JPEGs of catalog products")
    parser.add_argument("--photo-cache", type=Path, default=ROOT / "data" / "bench_photos")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--protocols", nargs="+", choices=("grpc", "http"), default=["grpc", "http"])
    parser.add_argument("--requests", type=int, default=160, help="requests a point (at least 8 a client)")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--url", help="host of a running lookalike server to measure instead of starting one")
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--no-peer", action="store_true", help="skip the FastAPI peer")
    parser.add_argument("--no-shared-memory", action="store_true",
                        help="skip lookalike with the photos in system shared memory (needs the server on this host)")
    parser.add_argument("--no-in-process", action="store_true", help="skip (a) except the stage costs")
    args = parser.parse_args()

    from lookalike.indexing.indexer import index_catalog
    from lookalike.indexing.repository import Repository, copy_repository
    from lookalike.server.launcher import ServerOptions, free_port
    from lookalike.server.serve import lookalike_server
    from lookalike_client import LookalikeClient

    print(f"phone photos: {args.photos} (cached in {args.photo_cache})", flush=True)
    images = phone_photos(args.catalog, args.photos, args.photo_cache)
    probes = images[:PROBES]
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lookalike-bench-"))
    source = Repository(args.model_repository)
    rows: dict = {}
    try:
        if args.url:
            repo = source
            grpc_url, http_url = f"{args.url}:{args.grpc_port}", f"{args.url}:{args.http_port}"
            server = None
        else:
            repo = copy_repository(args.model_repository, work / "model_repository",
                                   with_indexes=products_in(source.latest_index_dir()) > 0)
            options = ServerOptions(model_repository=repo.root, http_port=free_port(), grpc_port=free_port(),
                                    metrics_port=free_port(), health_port=None)
            grpc_url, http_url = options.grpc_url, options.http_url
            server = lookalike_server(options, log_file=work / "tritonserver.log").start()
            server.wait_ready()
        with LookalikeClient(grpc_url, timeout_s=120) as client:
            if products_in(repo.latest_index_dir()) == 0:  # none, or the empty one a server starts with
                if server is None:
                    raise SystemExit(f"the server at {args.url} serves no products: run `make demo` (or `lookalike index`) first")
                print(f"indexing {args.catalog} into the benchmark's copy of the repository", flush=True)
                index_catalog(args.catalog, repo, client, progress=False)
            served = client.served_index_versions()
            answers = {"lookalike": [[m.product_id for m in client.search(p, top_k=args.top_k)] for p in probes]}
        index_dir = repo.latest_index_dir()
        assert index_dir is not None
        if served and int(index_dir.name) not in served:
            raise SystemExit(f"the server serves index versions {served}, the repository's newest is {index_dir.name}")
        print(f"lookalike at {grpc_url} (gRPC) and {http_url} (HTTP), index version {index_dir.name}", flush=True)
        rows.update(measure_lookalike(grpc_url, http_url, images, args.concurrency, args.protocols, args.requests, args.top_k,
                                       server.process.pid if server is not None and server.process is not None else None,
                                       shared_memory=not args.no_shared_memory))
        server_version = json.load(urllib.request.urlopen(f"http://{http_url}/v2", timeout=10)).get("version")
        if server is not None:
            server.stop()
        if not args.no_peer:
            port = free_port()
            peer = start_peer(repo.root, index_dir, port, work / "peer.log")
            try:
                probe = PeerClient(port, "/search", args.top_k)
                answers["FastAPI peer"] = [probe(0, p)["product_ids"] for p in probes]
                rows.update(measure_peer(port, images, args.concurrency, args.requests, args.top_k))
            finally:
                peer.terminate()
                peer.wait(30)
        in_process = InProcess(repo, index_dir)
        if not args.no_in_process:
            rows["in process, 1 photo at a time"] = in_process.loop(images, 1, args.requests, args.top_k)
            rows["in process, batches of 8"] = in_process.loop(images, 8, args.requests, args.top_k)
        answers["in process"] = [in_process.ids(p, args.top_k) for p in probes]
        costs = in_process.stage_costs(images, args.top_k)
        products = len(in_process.index)
        if products == 0:
            raise SystemExit(f"index version {index_dir.name} holds no products: nothing to compare")
        embedder = repo.manifest().model
    finally:
        shutil.rmtree(work, ignore_errors=True)

    costs["images_per_s"] = (os.cpu_count() or 1) * 1000 / costs["total_ms"]
    results = {"machine": machine(), "tritonserver": server_version, "embedder": embedder,
               "catalog_products": products, "photos": len(images), "photo_mb": float(np.mean([len(i) for i in images]) / 1e6),
               "top_k": args.top_k, "cpu_limit": costs, "same_results": same_results(answers), "rows": rows}
    if not args.no_in_process:
        results["ratios"] = ratios(rows, args.concurrency)
        best = max((r for r in rows.values() if r.get("system", "").startswith("lookalike")), key=lambda r: r["images_per_s"],
                   default=None)
        if best:
            results["ratios"]["saturation: lookalike / CPU-time limit"] = best["images_per_s"] / costs["images_per_s"]
    else:
        results["ratios"] = {}
    (args.out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results) if not args.no_in_process else json.dumps(rows, indent=1)
    (args.out / "bench.md").write_text(text)
    print("\n" + text)
    if not args.no_in_process:
        try:
            plot(results, args.out / "bench.png")
        except ImportError:
            print("matplotlib missing: no plot")
    print(f"wrote {args.out}/bench.json, bench.md, bench.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
