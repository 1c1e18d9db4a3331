"""lookalike.serving.adapter and lookalike.serving.product_search.ProductSearch: what every model.py does with a dynamic
batch, without Triton. One request's bad input or failure is that request's outcome only."""

import json

import numpy as np
import pytest

from lookalike.indexing.publishing import write_index_version
from lookalike.indexing.repository import Repository
from lookalike.serving.adapter import Outcome, model_parameters, required, rows_together, run_each, run_together
from lookalike.serving.artifacts import EmbedderManifest
from lookalike.serving.errors import RequestError
from lookalike.serving.index_files import Product
from lookalike.serving.preprocessing import ImageError
from lookalike.serving.product_search import IndexMismatchError, ProductSearch, instance_args
from lookalike.serving.search import ProductIndex, UnknownProductError
from lookalike_client import contract as c

DIM = 8


def test_model_parameters_reads_the_string_parameters_triton_passes():
    args = {"model_config": json.dumps({"parameters": {"side": {"string_value": "query"}, "n": {"string_value": "2"}}})}
    assert model_parameters(args) == {"side": "query", "n": "2"}
    assert model_parameters({"model_config": "{}"}) == {}


def test_run_each_refuses_a_request_error_and_fails_other_errors_for_that_request_only():
    """RequestError is the client's fault; anything else, a bare ValueError included, is the server's."""
    logged = []

    def compute(x):
        if x == "bad":
            raise RequestError("not an image")
        if x == "boom":
            raise MemoryError("out of memory")
        if x == "bug":
            raise ValueError("operands could not be broadcast together")
        return {"Y": np.array([len(x)])}

    outcomes = run_each(["ok", "bad", "boom", "bug", "fine"], compute, what="preprocess", log=logged.append)
    assert [o.outputs["Y"].tolist() if o.outputs else None for o in outcomes] == [[2], None, None, None, [4]]
    assert outcomes[1] == Outcome(error="not an image", invalid=True)
    assert outcomes[2] == Outcome(error="preprocess failed: out of memory", invalid=False)
    assert outcomes[3] == Outcome(error="preprocess failed: operands could not be broadcast together", invalid=False)
    assert logged == ["preprocess: unexpected MemoryError: out of memory",
                      "preprocess: unexpected ValueError: operands could not be broadcast together"]


def test_the_errors_that_mean_the_clients_fault_are_request_errors():
    assert issubclass(ImageError, RequestError) and issubclass(UnknownProductError, RequestError)
    assert issubclass(RequestError, ValueError)  # callers that validated with ValueError still catch them


def test_only_the_refused_kinds_are_the_clients_fault():
    def compute(x):
        if x == "image":
            raise KeyError("unsupported format")
        raise ValueError("a bug in our code")

    image, bug = run_each(["image", "bug"], compute, what="preprocess", refuse=(KeyError,))
    assert image.invalid and not bug.invalid and bug.error == "preprocess failed: a bug in our code"
    (parsed_badly,) = run_together([{"X": None}], lambda i: i["X"].shape, lambda p: p, what="search")
    assert not parsed_badly.invalid and parsed_badly.error.startswith("search failed: ")


def test_run_together_computes_the_valid_requests_in_one_call():
    calls = []

    def compute(parsed):
        calls.append(list(parsed))
        return [{"Y": np.array([p * 10])} for p in parsed]

    def parse(inputs):
        value = int(required(inputs, "X")[0])
        if value < 0:
            raise RequestError(f"X must be >= 0, got {value}")
        return value

    requests = [{"X": np.array([1])}, {"X": np.array([-1])}, {"X": None}, {"X": np.array([3])}]
    outcomes = run_together(requests, parse, compute, what="search")
    assert calls == [[1, 3]]
    assert outcomes[0].outputs["Y"].tolist() == [10] and outcomes[3].outputs["Y"].tolist() == [30]
    assert outcomes[1] == Outcome(error="X must be >= 0, got -1", invalid=True)
    assert outcomes[2] == Outcome(error="input X is missing", invalid=True)


def test_a_failing_computation_fails_only_the_requests_it_computed():
    def compute(parsed):
        raise RuntimeError("device lost")

    requests = [{"X": np.array([1])}, {"X": None}]
    outcomes = run_together(requests, lambda i: required(i, "X"), compute, what="embedder")
    assert outcomes == [Outcome(error="embedder failed: device lost"), Outcome(error="input X is missing", invalid=True)]
    wrong_count = run_together(requests[:1], lambda i: required(i, "X"), lambda parsed: [], what="embedder")
    assert wrong_count[0].error == "embedder failed: 0 results for 1 requests" and not wrong_count[0].invalid


def test_rows_together_splits_the_result_back_per_request():
    arrays = [np.ones((2, 3)), np.zeros((0, 3)), np.full((1, 3), 2.0)]
    calls = []
    parts = rows_together(arrays, lambda rows: calls.append(len(rows)) or rows.sum(axis=1, keepdims=True))
    assert calls == [3]
    assert [p.tolist() for p in parts] == [[[3.0], [3.0]], [], [[6.0]]]
    assert rows_together([], lambda rows: rows) == []
    with pytest.raises(RuntimeError, match="2 result rows for 3 input rows"):
        rows_together(arrays, lambda rows: rows[:2])


@pytest.fixture
def served(tmp_path):
    """An index version as product_search's Triton model directory holds it."""
    (tmp_path / "embedder").mkdir()
    EmbedderManifest(model="test", dim=DIM, input=(3, 32, 32), fingerprint="fp").save(tmp_path / "embedder" / "manifest.json")
    (tmp_path / "product_search").mkdir()
    (tmp_path / "product_search" / "model.py").write_text("# adapter\n")
    vectors = np.eye(4, DIM, dtype=np.float32)
    index = ProductIndex.build([Product(f"p{i}") for i in range(4)], vectors, embedder_fingerprint="fp")
    version = write_index_version(Repository(tmp_path), index.save)
    params = {"embedder_manifest": "../embedder/manifest.json", "faiss_threads": "1", "device": "auto",
              "embedding_norm_tolerance": "0.01"}
    return tmp_path / "product_search", str(version), params, vectors


def test_product_search_answers_each_request_of_a_batch_on_its_own(served):
    model_dir, version, params, vectors = served
    search = ProductSearch.load(model_dir, version, params, **instance_args({"model_instance_kind": "CPU"}))
    requests = [
        {c.EMBEDDING: vectors[:2], c.TOP_K: np.array([[1], [1]], dtype=np.int32)},
        {c.EMBEDDING: vectors[:1] * 3, c.TOP_K: None},  # not normalised
        {c.EMBEDDING: vectors[2:3], c.TOP_K: None},  # the default TOP_K
        {c.EMBEDDING: vectors[3:4], c.TOP_K: np.array([[5000]], dtype=np.int32)},
    ]
    outcomes = search(requests)
    assert outcomes[0].outputs[c.PRODUCT_IDS].tolist() == [[b"p0"], [b"p1"]]
    assert outcomes[1].invalid and "L2 norm 3" in outcomes[1].error
    assert outcomes[2].outputs[c.PRODUCT_IDS][0, 0] == b"p2" and outcomes[2].outputs[c.SCORES].shape == (1, 4)
    assert outcomes[3].invalid and "TOP_K must be in 1..1000" in outcomes[3].error


def test_product_search_refuses_an_index_of_another_embedder(served):
    model_dir, version, params, _ = served
    EmbedderManifest(model="test", dim=DIM, input=(3, 32, 32), fingerprint="other").save(
        model_dir.parent / "embedder" / "manifest.json")
    with pytest.raises(IndexMismatchError, match="built with embedder fp, but the embedder is other"):
        ProductSearch.load(model_dir, version, params)


def test_search_time_parameters_come_from_the_config_without_a_rebuild(served):
    model_dir, version, params, _ = served
    search = ProductSearch.load(model_dir, version, {**params, "ef_search": "64", "nprobe": ""})
    assert search.index.search_params == {"efSearch": 64}
    assert search.index.scan_max_vectors == 20_000  # empty or absent: the default
    wide = ProductSearch.load(model_dir, version, {**params, "filter_scan_max_vectors": "500000"})
    assert wide.index.scan_max_vectors == 500_000
    with pytest.raises(ValueError, match="filter_scan_max_vectors must be >= 0, got -5"):
        ProductSearch.load(model_dir, version, {**params, "filter_scan_max_vectors": "-5"})
    with pytest.raises(ValueError, match="parameter nprobe must be an integer or empty, got 'many'"):
        ProductSearch.load(model_dir, version, {**params, "nprobe": "many"})


def test_device_auto_falls_back_to_the_cpu_and_gpu_says_why_it_cannot(served):
    from lookalike.serving.gpu import GpuUnavailableError, gpu_unavailable

    model_dir, version, params, vectors = served
    reason = gpu_unavailable()
    if reason is None:
        pytest.skip("FAISS can use a GPU here: the GPU path is tested in test_index_types")
    assert ProductSearch.load(model_dir, version, {**params, "device": "auto"}).index.device == "cpu"
    assert ProductSearch.load(model_dir, version, {**params, "device": "cpu"}).index.device == "cpu"
    with pytest.raises(GpuUnavailableError, match=f"device gpu: {reason.split(' (')[0]}"):
        ProductSearch.load(model_dir, version, {**params, "device": "gpu"})
    with pytest.raises(ValueError, match="device must be one of auto, cpu, gpu, got 'tpu'"):
        ProductSearch.load(model_dir, version, {**params, "device": "tpu"})
    with pytest.raises(ValueError, match="gpu_temp_memory_mb must be >= 0"):
        ProductSearch.load(model_dir, version, {**params, "gpu_temp_memory_mb": "-1"})
