"""loadtest/benchmarks/gpu_topk.py: exact top-k by numpy and by torch (on the CPU here; CUDA on a GPU host) agree,
and the script runs end to end where no GPU is visible (CPU row only, the reason printed)."""

import json
import sys

import numpy as np
import pytest

from loadtest.benchmarks import gpu_topk
from loadtest.synthetic import catalog_like


def test_numpy_topk_is_the_exact_order():
    catalog = catalog_like(3000, 64, families=20, group=5, seed=0)
    queries = catalog_like(3000, 64, families=20, group=5, seed=1, queries=17)
    got = gpu_topk.topk_numpy(catalog, queries)
    expected = np.argsort(-(queries @ catalog.T), axis=1, kind="stable")[:, : gpu_topk.K]
    assert got.shape == (17, gpu_topk.K)
    np.testing.assert_array_equal(np.sort(got, axis=1), np.sort(expected, axis=1))
    scores = np.take_along_axis(queries @ catalog.T, got, axis=1)
    assert np.all(np.diff(scores, axis=1) <= 0)  # best first


def test_torch_search_matches_numpy():
    pytest.importorskip("torch", reason="torch is not installed")
    catalog = catalog_like(3000, 64, families=20, group=5, seed=0)
    queries = catalog_like(3000, 64, families=20, group=5, seed=1, queries=33)
    search, nbytes, sync = gpu_topk.torch_search(catalog, "cpu", half=False)
    sync()
    assert nbytes == catalog.nbytes
    assert gpu_topk.recall(search(queries), gpu_topk.topk_numpy(catalog, queries)) == 1.0


def test_script_runs_without_a_gpu(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["gpu_topk.py", "--vectors", "2000", "--dim", "32", "--families", "10", "--queries", "70",
                                      "--seconds", "0.05", "--libraries", "torch", "cupy", "numpy", "--out", str(out)])
    gpu_topk.main()
    result = json.loads((out / "gpu_topk.json").read_text())
    libraries = [(r["library"], r["device"]) for r in result["rows"]]
    assert ("numpy", "cpu") in libraries
    numpy_row = next(r for r in result["rows"] if r["library"] == "numpy")
    assert numpy_row["recall_at_10"] == 1.0 and numpy_row["batch1"]["qps"] > 0 and numpy_row["batch64"]["vs_cpu"] == 1.0
    printed = capsys.readouterr().out
    if ("torch", "cuda") not in libraries:
        assert "torch: no CUDA device visible" in printed or "torch: not installed" in printed
    assert "| numpy | cpu | fp32 |" in (out / "gpu_topk.md").read_text()
