"""loadtest/benchmarks/bench.py end to end, small, as `make bench` runs it on a fresh clone: its own tritonserver
over a copy of a repository without an index (it indexes the catalog itself), the FastAPI peer under
uvicorn and the in-process pipeline, on a few phone JPEGs. Checks the report's shape and that the
three systems did the same work on the whole catalog (the small one: the bench indexes it itself); never
its timings."""

import csv
import json
import subprocess
import sys
from pathlib import Path

from lookalike.indexing.repository import copy_repository
from tests.conftest import REPOSITORY

ROOT = Path(__file__).resolve().parents[2]


def test_bench_measures_lookalike_the_peer_and_in_process_on_the_same_work(server, catalog_small, tmp_path):
    catalog = catalog_small
    fresh = copy_repository(REPOSITORY, tmp_path / "model_repository")  # no index version, like a fresh clone
    out = tmp_path / "bench"
    run = subprocess.run(
        [sys.executable, "-m", "loadtest.benchmarks.bench", "--catalog", str(catalog / "catalog.csv"),
         "--model-repository", str(fresh.root), "--photos", "4", "--photo-cache", str(tmp_path / "photos"),
         "--concurrency", "1", "2", "--requests", "4", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    results = json.loads((out / "bench.json").read_text())
    systems = {"lookalike grpc", "lookalike http", "lookalike grpc + shm", "lookalike http + shm", "FastAPI async def",
               "FastAPI threadpool"}
    for system in systems:
        for concurrency in (1, 2):
            row = results["rows"][f"{system} c={concurrency}"]
            assert row["errors"] == 0 and row["requests"] >= 8 * concurrency, (system, concurrency, row)
            assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
    for name in ("in process, 1 photo at a time", "in process, batches of 8"):
        assert results["rows"][name]["requests"] >= 4
    # Triton's own statistics and the CPU of each process, per lookalike point
    stages = results["rows"]["lookalike grpc c=2"]["stages"]
    assert set(stages) == {"visual_search", "preprocess_query", "embedder", "product_search"}
    assert all(s["mean_batch"] >= 1 for m, s in stages.items() if m != "visual_search")
    assert stages["preprocess_query"]["compute_infer"] > 0
    cpu = results["rows"]["lookalike http c=1"]["cpu_ms_per_image"]
    assert {"client", "tritonserver", "preprocess_query", "embedder", "product_search"} <= set(cpu)
    assert cpu["preprocess_query"] > 0 and cpu["embedder"] > 0
    # the same preprocessing, model and index: the same products for the probe photos (ONNX Runtime's
    # thread counts differ between the three, so a near-tie deep in a top 10 may swap)
    same = results["same_results"]
    assert same["FastAPI peer: same top 1"] == 1.0 and same["in process: same top 1"] == 1.0, same
    assert same["FastAPI peer: top-k overlap"] >= 0.9 and same["in process: top-k overlap"] >= 0.9, same
    with open(catalog / "catalog.csv", newline="") as handle:
        products = {row["product_id"] for row in csv.DictReader(handle)}
    assert results["catalog_products"] == len(products)  # the whole catalog, indexed by the bench
    assert results["photo_mb"] > 0.1 and results["cpu_limit"]["images_per_s"] > 0
    assert "saturation: lookalike / in process, 1 at a time" in results["ratios"]
    assert "c=2: lookalike http / FastAPI async def, throughput" in results["ratios"]
    assert (out / "bench.png").stat().st_size > 10_000
    assert "| lookalike grpc | 1 |" in (out / "bench.md").read_text()
    assert server.ready()
