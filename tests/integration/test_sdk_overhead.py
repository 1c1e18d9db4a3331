"""loadtest/benchmarks/sdk_overhead.py end to end, small, against the session's server: the SDK and raw tritonclient
in each case (gRPC and HTTP, sync and asyncio, a small PNG and phone JPEGs). Checks the report's shape
and that both got the same product ids; never its timings."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CASES = {("grpc", "sync"), ("http", "sync"), ("grpc", "asyncio"), ("http", "asyncio")}


def test_sdk_overhead_measures_raw_and_sdk_in_every_case_on_the_same_ids(server, catalog, tmp_path):
    out = tmp_path / "results" / "sdk_overhead"
    run = subprocess.run(
        [sys.executable, "-m", "loadtest.benchmarks.sdk_overhead", "--url", server.options.client_host,
         "--grpc-port", str(server.options.grpc_port), "--http-port", str(server.options.http_port),
         "--catalog", str(catalog / "catalog.csv"), "--photos", "2", "--photo-cache", str(tmp_path / "photos"),
         "--small-images", "3", "--requests", "6", "--phone-requests", "2", "--blocks", "2", "--warmup", "1",
         "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    results = json.loads(out.with_name("sdk_overhead.json").read_text())
    table = out.with_name("sdk_overhead.md").read_text()
    assert results["products"] == server.index_report.products
    assert set(results["workloads"]) == {"small", "phone"}
    for key, calls in (("small", 6), ("phone", 2)):
        workload = results["workloads"][key]
        assert {(case["protocol"], case["mode"]) for case in workload["cases"]} == CASES
        for case in workload["cases"]:
            where = (key, case["protocol"], case["mode"])
            for arm in ("raw", "sdk"):
                assert case[arm]["calls"] == calls, where
                assert case[arm]["p50_us"] > 0 and case[arm]["cpu_us_per_call"] > 0, (where, arm, case[arm])
                assert len(case[arm]["block_p50_us"]) == 2, where
            assert case["sdk_over_raw_p50"] > 0 and case["paired_sdk_minus_raw_us"]["pairs"] == calls, where
            # the same request two ways: the same products for each image, on every call of both arms
            assert case["ids_agree"] and case["ids_mismatches"] == 0, (where, case["ids_mismatch_examples"])
            assert case["ids_calls_compared"] == 2 * calls, where
            assert f"| {workload['name']} | {case['protocol']} | {case['mode']} | {calls} |" in table, where
    assert results["ids_agree"]
    assert server.ready()
