"""`make bench-sdk`: what the client SDK (`lookalike_client`) costs over raw tritonclient, in one run, on
the same requests to the same server.

Four cases: gRPC and HTTP, each with the sync clients (`LookalikeClient` vs tritonclient.grpc /
tritonclient.http) and the asyncio ones (`AsyncLookalikeClient` vs tritonclient.grpc.aio /
tritonclient.http.aio). In each, the same visual_search request two ways:

  raw   what a careful user writes by hand: one tritonclient client, reused; the IMAGE (BYTES [1, 1])
        and TOP_K (INT32 [1, 1]) InferInputs built per request, the InferRequestedOutputs built once
        (binary over HTTP), a deadline per request over gRPC, the ids decoded and the scores read
  sdk   `client.search(image_bytes, top_k)`: the SDK's checks, deadline, retry loop and typed errors,
        its Match objects

Two workloads: a small PNG (a 64x64 catalog packshot: the server's time is small, so the client's
shows) and full-size phone JPEGs (`phone_photos.py`, ~2 MB: what an app uploads). One request at a
time. Raw and SDK alternate in blocks (raw, sdk, raw, sdk, ...; --blocks of each) after a warm-up of
each, so that whatever else the machine does hits both alike; an SDK block sends the images of the raw
block before it, in the same order. Per case: p50 (and p90) latency of each, SDK - raw and SDK / raw,
the median of the paired differences (the same image in the two blocks), the client's CPU per call
(`time.process_time()` over the blocks / calls: this whole process, so gRPC's own threads count too),
and whether both got the same product ids for the same image on every call. The SDK keeps its default
RetryPolicy (what a user gets; it costs nothing while nothing fails).

lookalike runs on its own tritonserver (free loopback ports) over a copy of --model-repository, as
`bench.py` starts it (the repository's newest index version, or --catalog indexed into the copy when
there is none); --url measures a running server instead (its host; --grpc-port and --http-port).

Writes OUT.json and OUT.md (a markdown table).

    .venv/bin/python -m loadtest.benchmarks.sdk_overhead --out results/bench/sdk_overhead
    .venv/bin/python -m loadtest.benchmarks.sdk_overhead --url localhost --grpc-port 18001 --http-port 18000
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import numpy as np
from PIL import Image

from loadtest.benchmarks.bench import ROOT, machine, products_in
from loadtest.phone_photos import phone_photos
from lookalike_client import AsyncLookalikeClient, LookalikeClient
from lookalike_client import contract as c

CASES = (("grpc", "sync"), ("http", "sync"), ("grpc", "asyncio"), ("http", "asyncio"))
ARMS: tuple[str, ...] = ("raw", "sdk")
TIMEOUT_S = 60.0  # each request's deadline, both arms

Ids = list[str]


# --- the two arms ----------------------------------------------------------------------------------

def _module(protocol: str, asyncio_api: bool) -> Any:
    if protocol == "grpc":
        if asyncio_api:
            import tritonclient.grpc.aio as module
        else:
            import tritonclient.grpc as module
    elif asyncio_api:
        import tritonclient.http.aio as module
    else:
        import tritonclient.http as module
    return module


class RawRequest:
    """visual_search built by hand on tritonclient (`module`: tritonclient.grpc, .http or their .aio)."""

    def __init__(self, module: Any, http: bool, top_k: int) -> None:
        self.module, self.http, self.top_k = module, http, top_k
        self.outputs = [module.InferRequestedOutput(name, binary_data=True) if http else module.InferRequestedOutput(name)
                        for name in (c.PRODUCT_IDS, c.SCORES)]
        self.kwargs: dict[str, Any] = {} if http else {"client_timeout": TIMEOUT_S}

    def inputs(self, data: bytes) -> list[Any]:
        image = self.module.InferInput(c.IMAGE, [1, 1], "BYTES")
        top_k = self.module.InferInput(c.TOP_K, [1, 1], "INT32")
        extra = {"binary_data": True} if self.http else {}
        image.set_data_from_numpy(np.array([[data]], dtype=np.object_), **extra)
        top_k.set_data_from_numpy(np.array([[self.top_k]], dtype=np.int32), **extra)
        return [image, top_k]

    def ids(self, result: Any) -> Ids:
        ids = [v.decode("utf-8") for v in result.as_numpy(c.PRODUCT_IDS).reshape(-1).tolist()]
        scores = [float(s) for s in result.as_numpy(c.SCORES).reshape(-1).tolist()]
        return [pid for pid, _ in zip(ids, scores) if pid != c.NO_PRODUCT_ID]


def sync_arms(protocol: str, url: str, top_k: int) -> tuple[dict[str, Callable[[bytes], Ids]], Callable[[], None]]:
    module = _module(protocol, asyncio_api=False)
    http = protocol == "http"
    raw = (module.InferenceServerClient(url, connection_timeout=TIMEOUT_S, network_timeout=TIMEOUT_S) if http
           else module.InferenceServerClient(url))
    request = RawRequest(module, http, top_k)
    sdk = LookalikeClient(url, protocol=protocol, timeout_s=TIMEOUT_S)

    def raw_search(data: bytes) -> Ids:
        return request.ids(raw.infer(c.VISUAL_SEARCH_MODEL, request.inputs(data), outputs=request.outputs, **request.kwargs))

    def sdk_search(data: bytes) -> Ids:
        return [m.product_id for m in sdk.search(data, top_k=top_k)]

    def close() -> None:
        raw.close()
        sdk.close()

    return {"raw": raw_search, "sdk": sdk_search}, close


def async_arms(protocol: str, url: str, top_k: int) -> tuple[dict[str, Callable[[bytes], Awaitable[Ids]]],
                                                              Callable[[], Awaitable[None]]]:
    """The asyncio arms; make them inside the event loop that runs them."""
    module = _module(protocol, asyncio_api=True)
    http = protocol == "http"
    raw = module.InferenceServerClient(url, conn_timeout=TIMEOUT_S) if http else module.InferenceServerClient(url)
    request = RawRequest(module, http, top_k)
    sdk = AsyncLookalikeClient(url, protocol=protocol, timeout_s=TIMEOUT_S)

    async def raw_search(data: bytes) -> Ids:
        return request.ids(await raw.infer(c.VISUAL_SEARCH_MODEL, request.inputs(data), outputs=request.outputs,
                                           **request.kwargs))

    async def sdk_search(data: bytes) -> Ids:
        return [m.product_id for m in await sdk.search(data, top_k=top_k)]

    async def close() -> None:
        await raw.close()
        await sdk.close()

    return {"raw": raw_search, "sdk": sdk_search}, close


# --- measuring -------------------------------------------------------------------------------------

@dataclass
class Arm:
    """What one arm of a case measured: each block's latencies (in call order), and its CPU time."""

    blocks: list[list[int]] = field(default_factory=list)
    cpu_s: float = 0.0

    def record(self, latencies_ns: list[int], cpu_s: float) -> None:
        self.blocks.append(latencies_ns)
        self.cpu_s += cpu_s

    def summary(self) -> dict[str, Any]:
        us = np.asarray([x for block in self.blocks for x in block], dtype=np.float64) / 1000
        return {"calls": len(us), "p50_us": float(np.percentile(us, 50)), "p90_us": float(np.percentile(us, 90)),
                "mean_us": float(us.mean()), "min_us": float(us.min()), "cpu_us_per_call": self.cpu_s * 1e6 / len(us),
                "block_p50_us": [float(np.percentile(block, 50)) / 1000 for block in self.blocks]}


def paired(raw: Arm, sdk: Arm) -> dict[str, float]:
    """SDK - raw of the same image at the same place in a block and the raw block before it: the
    median and quartiles of those differences, µs (robust to photos that take the server longer)."""
    diffs = np.asarray([s - r for rb, sb in zip(raw.blocks, sdk.blocks) for r, s in zip(rb, sb)], dtype=np.float64) / 1000
    q25, q50, q75 = (float(v) for v in np.percentile(diffs, [25, 50, 75]))
    return {"pairs": len(diffs), "median_us": q50, "q25_us": q25, "q75_us": q75}


class Agreement:
    """Every call's ids against the first answer for that image (whichever arm gave it)."""

    def __init__(self) -> None:
        self.first: dict[int, Ids] = {}
        self.calls = 0
        self.mismatches: list[dict[str, Any]] = []

    def check(self, arm: str, image: int, ids: Ids) -> None:
        self.calls += 1
        expected = self.first.setdefault(image, ids)
        if ids != expected and len(self.mismatches) < 5:
            self.mismatches.append({"arm": arm, "image": image, "expected": expected[:3], "got": ids[:3]})
        elif ids != expected:
            self.mismatches.append({"arm": arm, "image": image})


def plan(blocks: int, requests: int) -> list[tuple[str, int]]:
    """(arm, calls) of each block, raw and sdk alternating: `requests` calls of each arm in all."""
    per = max(1, -(-requests // blocks))
    out: list[tuple[str, int]] = []
    left = requests
    while left > 0:
        n = min(per, left)
        out += [("raw", n), ("sdk", n)]
        left -= n
    return out


class Run:
    """One case's blocks: which images each block sends (each arm's blocks go on through the images,
    so that a raw block and the SDK block after it send the same ones), and what they measured."""

    def __init__(self, images: list[bytes], blocks: int, requests: int) -> None:
        self.images, self.plan = images, plan(blocks, requests)
        self.arms = {name: Arm() for name in ARMS}
        self.agree = Agreement()
        self.done: dict[str, int] = dict.fromkeys(ARMS, 0)

    def block(self, arm: str, calls: int) -> list[int]:
        return [(self.done[arm] + i) % len(self.images) for i in range(calls)]

    def record(self, arm: str, sent: list[int], latencies_ns: list[int], answers: list[Ids], cpu_s: float) -> None:
        self.arms[arm].record(latencies_ns, cpu_s)
        for image, ids in zip(sent, answers):
            self.agree.check(arm, image, ids)
        self.done[arm] += len(sent)


def measure_sync(search: dict[str, Callable[[bytes], Ids]], images: list[bytes], blocks: int, requests: int,
                 warmup: int) -> Run:
    run = Run(images, blocks, requests)
    for name in ARMS:
        for i in range(warmup):
            search[name](images[i % len(images)])
    for name, calls in run.plan:
        call, sent = search[name], run.block(name, calls)
        latencies: list[int] = []
        answers: list[Ids] = []
        cpu = time.process_time()
        for i in sent:
            start = time.perf_counter_ns()
            answers.append(call(images[i]))
            latencies.append(time.perf_counter_ns() - start)
        run.record(name, sent, latencies, answers, time.process_time() - cpu)
    return run


async def measure_async(protocol: str, url: str, top_k: int, images: list[bytes], blocks: int, requests: int,
                        warmup: int) -> Run:
    """measure_sync's loop on the asyncio arms, in this event loop."""
    search, close = async_arms(protocol, url, top_k)
    try:
        run = Run(images, blocks, requests)
        for name in ARMS:
            for i in range(warmup):
                await search[name](images[i % len(images)])
        for name, calls in run.plan:
            call, sent = search[name], run.block(name, calls)
            latencies: list[int] = []
            answers: list[Ids] = []
            cpu = time.process_time()
            for i in sent:
                start = time.perf_counter_ns()
                answers.append(await call(images[i]))
                latencies.append(time.perf_counter_ns() - start)
            run.record(name, sent, latencies, answers, time.process_time() - cpu)
        return run
    finally:
        await close()


def measure_case(protocol: str, mode: str, url: str, images: list[bytes], top_k: int, blocks: int, requests: int,
                 warmup: int) -> dict[str, Any]:
    if mode == "sync":
        search, close = sync_arms(protocol, url, top_k)
        try:
            run = measure_sync(search, images, blocks, requests, warmup)
        finally:
            close()
    else:
        run = asyncio.run(measure_async(protocol, url, top_k, images, blocks, requests, warmup))
    arms, agree = run.arms, run.agree
    raw, sdk = arms["raw"].summary(), arms["sdk"].summary()
    diffs = [s - r for r, s in zip(raw["block_p50_us"], sdk["block_p50_us"])]
    return {"protocol": protocol, "mode": mode, "raw": raw, "sdk": sdk,
            "sdk_minus_raw_p50_us": sdk["p50_us"] - raw["p50_us"], "sdk_over_raw_p50": sdk["p50_us"] / raw["p50_us"],
            "sdk_minus_raw_cpu_us": sdk["cpu_us_per_call"] - raw["cpu_us_per_call"],
            "paired_sdk_minus_raw_us": paired(arms["raw"], arms["sdk"]),
            "block_pair_p50_diff_us": {"min": min(diffs), "median": float(np.median(diffs)), "max": max(diffs)},
            "ids_agree": not agree.mismatches, "ids_calls_compared": agree.calls, "ids_images": len(agree.first),
            "ids_mismatches": len(agree.mismatches), "ids_mismatch_examples": agree.mismatches[:5]}


# --- the workloads ---------------------------------------------------------------------------------

def small_pngs(catalog_csv: Path, count: int, size: int) -> list[bytes]:
    """`count` catalog packshots (a fixed sample) scaled to size x size, as PNG."""
    with open(catalog_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    out: list[bytes] = []
    for row in random.Random(1).sample(rows, min(count, len(rows))):
        image = Image.open(catalog_csv.parent / row["image"]).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [f"The client SDK's overhead over raw tritonclient: visual_search, one request at a time, top_k {results['top_k']}, "
             f"{results['products']} products ({results['embedder']}), tritonserver {results['tritonserver']} at {results['url']}; "
             f"raw and SDK in alternating blocks ({results['blocks']} of each) after {results['warmup']} warm-up calls each; "
             f"{m['cpu']}, {m['cores']} cores. Client CPU: `time.process_time()` of the whole client process per call.", "",
             "| workload | protocol | API | calls | p50 raw µs | p50 SDK µs | SDK − raw µs | SDK / raw | "
             "paired SDK − raw µs, median [q25, q75] | block p50s: SDK − raw µs, min … max | "
             "CPU raw µs/call | CPU SDK µs/call | CPU SDK − raw µs | same ids |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for workload in results["workloads"].values():
        for case in workload["cases"]:
            raw, sdk, blocks, pairs = case["raw"], case["sdk"], case["block_pair_p50_diff_us"], case["paired_sdk_minus_raw_us"]
            same = f"yes ({case['ids_calls_compared']} calls)" if case["ids_agree"] else f"NO ({case['ids_mismatches']} differ)"
            lines.append(f"| {workload['name']} | {case['protocol']} | {case['mode']} | {raw['calls']} | {raw['p50_us']:,.0f} | "
                         f"{sdk['p50_us']:,.0f} | {case['sdk_minus_raw_p50_us']:+,.0f} | {case['sdk_over_raw_p50']:.3f} | "
                         f"{pairs['median_us']:+,.0f} [{pairs['q25_us']:+,.0f}, {pairs['q75_us']:+,.0f}] | "
                         f"{blocks['min']:+,.0f} … {blocks['max']:+,.0f} | {raw['cpu_us_per_call']:,.0f} | "
                         f"{sdk['cpu_us_per_call']:,.0f} | {case['sdk_minus_raw_cpu_us']:+,.0f} | {same} |")
    lines += [""] + [f"- {w['name']}: {w['description']}" for w in results["workloads"].values()]
    return "\n".join(lines) + "\n"


# --- main ------------------------------------------------------------------------------------------

def start_server(model_repository: Path, catalog: Path, work: Path) -> tuple[Any, str, str]:
    """lookalike's own tritonserver over a copy of the repository, as bench.py starts it: its newest
    index version, or the catalog indexed into the copy when there is none."""
    from lookalike.indexing.indexer import index_catalog
    from lookalike.indexing.repository import Repository, copy_repository
    from lookalike.server.launcher import ServerOptions, free_port
    from lookalike.server.serve import lookalike_server

    repo = copy_repository(model_repository, work / "model_repository",
                           with_indexes=products_in(Repository(model_repository).latest_index_dir()) > 0)
    options = ServerOptions(model_repository=repo.root, http_port=free_port(), grpc_port=free_port(),
                            metrics_port=free_port(), health_port=None)
    server = lookalike_server(options, log_file=work / "tritonserver.log").start()
    server.wait_ready()
    if products_in(repo.latest_index_dir()) == 0:
        print(f"indexing {catalog} into the benchmark's copy of the repository", flush=True)
        with LookalikeClient(options.grpc_url, timeout_s=120) as client:
            index_catalog(catalog, repo, client, progress=False)
    return server, options.grpc_url, options.http_url


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", type=Path, default=ROOT / "data" / "sample_catalog" / "catalog.csv",
                        help="the catalog the images are of (indexed when the repository has no index)")
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench" / "sdk_overhead",
                        help="writes OUT.json and OUT.md")
    parser.add_argument("--url", help="host of a running lookalike server to measure instead of starting one")
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--requests", type=int, default=400, help="calls of each arm a case, small PNG")
    parser.add_argument("--phone-requests", type=int, help="calls of each arm a case, phone JPEGs (default: --requests / 5)")
    parser.add_argument("--blocks", type=int, default=10, help="blocks of each arm, alternating")
    parser.add_argument("--warmup", type=int, default=10, help="calls of each arm before its case's blocks")
    parser.add_argument("--small-images", type=int, default=8, help="catalog packshots in the small-PNG workload")
    parser.add_argument("--small-size", type=int, default=64, help="their width and height, px")
    parser.add_argument("--photos", type=int, default=48, help="phone JPEGs of catalog products (bench.py's cache)")
    parser.add_argument("--photo-cache", type=Path, default=ROOT / "data" / "bench_photos")
    parser.add_argument("--top-k", type=int, default=10)
    args = parser.parse_args()
    phone_requests = args.phone_requests or max(args.blocks, args.requests // 5)

    small = small_pngs(args.catalog, args.small_images, args.small_size)
    print(f"phone photos: {args.photos} (cached in {args.photo_cache})", flush=True)
    phones = phone_photos(args.catalog, args.photos, args.photo_cache)
    workloads = {
        "small": {"name": f"{args.small_size}x{args.small_size} PNG", "images": small, "requests": args.requests,
                  "description": f"{len(small)} catalog packshots scaled to {args.small_size}x{args.small_size} px, PNG "
                                 f"(mean {np.mean([len(i) for i in small]) / 1e3:.1f} kB)"},
        "phone": {"name": "phone JPEG", "images": phones, "requests": phone_requests,
                  "description": f"{len(phones)} full-size phone JPEGs of catalog products (phone_photos.py, "
                                 f"mean {np.mean([len(i) for i in phones]) / 1e6:.2f} MB)"},
    }
    work = Path(tempfile.mkdtemp(prefix="lookalike-sdk-overhead-"))
    server = None
    try:
        if args.url:
            urls = {"grpc": f"{args.url}:{args.grpc_port}", "http": f"{args.url}:{args.http_port}"}
        else:
            server, grpc_url, http_url = start_server(args.model_repository, args.catalog, work)
            urls = {"grpc": grpc_url, "http": http_url}
        with LookalikeClient(urls["grpc"], timeout_s=120) as client:
            info = client.info()
        if info.products == 0:
            raise SystemExit(f"the server at {urls['grpc']} serves no products: run `make demo` (or `lookalike index`) first")
        print(f"lookalike at {urls['grpc']} (gRPC) and {urls['http']} (HTTP): {info.products} products, "
              f"index version {info.index_version}", flush=True)
        for workload in workloads.values():
            cases = []
            for protocol, mode in CASES:
                case = measure_case(protocol, mode, urls[protocol], workload["images"], args.top_k, args.blocks,
                                    workload["requests"], args.warmup)
                cases.append(case)
                print(f"  {workload['name']}, {protocol} {mode}: p50 raw {case['raw']['p50_us']:,.0f} µs, "
                      f"SDK {case['sdk']['p50_us']:,.0f} µs ({case['sdk_minus_raw_p50_us']:+,.0f}); CPU/call raw "
                      f"{case['raw']['cpu_us_per_call']:,.0f} µs, SDK {case['sdk']['cpu_us_per_call']:,.0f} µs; "
                      f"same ids: {case['ids_agree']}", flush=True)
            workload["cases"] = cases
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    results = {"machine": machine(), "url": f"{urls['grpc']} (gRPC), {urls['http']} (HTTP)",
               "tritonserver": info.server_version, "embedder": info.embedder_model, "products": info.products,
               "index_version": info.index_version, "top_k": args.top_k, "blocks": args.blocks, "warmup": args.warmup,
               "workloads": {key: {k: v for k, v in w.items() if k != "images"} for key, w in workloads.items()},
               "ids_agree": all(case["ids_agree"] for w in workloads.values() for case in w["cases"])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.out.with_name(args.out.name + ".json"), args.out.with_name(args.out.name + ".md")
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    md_path.write_text(text)
    print("\n" + text)
    print(f"wrote {json_path} and {md_path}")
    return 0 if results["ids_agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
