"""lookalike.indexing.index_types and the approximate indexes in lookalike.serving.search: what auto picks and why, the
settings refused before any embedding, and recall of hnsw and ivf-pq against exact search."""

import numpy as np
import pytest

from lookalike.indexing.index_types import AUTO_FLAT_MAX, AUTO_HNSW_MAX, choose, default_ef_search, default_m, default_nlist
from lookalike.serving.gpu import GpuUnavailableError, gpu_unavailable
from lookalike.serving.index_files import Product
from lookalike.serving.search import ProductIndex


def test_auto_picks_by_vector_count_and_says_why():
    small, middle, large = choose("auto", 5_000, 1280), choose("auto", 600_000, 1280), choose("auto", 5_000_000, 1280)
    assert (small.kind, small.factory) == ("flat", "Flat") and "exact" in small.reason
    assert (middle.kind, middle.factory, middle.search) == ("hnsw", "HNSW32", {"efSearch": default_ef_search(600_000)})
    assert f"> {AUTO_FLAT_MAX:,}" in middle.reason
    assert large.kind == "ivf-pq" and large.factory == f"IVF{default_nlist(5_000_000)},PQ80" and f"> {AUTO_HNSW_MAX:,}" in large.reason
    assert large.search == {"nprobe": 32}
    assert choose("flat", 10**7, 1280).reason == "asked for"


def test_the_default_ef_search_grows_with_the_graph():
    assert [default_ef_search(n) for n in (1, 100_000, 250_000, 1_000_000, 2_000_000, 10**8)] == [128, 128, 128, 256, 352, 512]
    assert choose("auto", 1_000_000, 1280).search == {"efSearch": 256}
    assert choose("hnsw", 1_000_000, 1280, ef_search=64).search == {"efSearch": 64}  # asked for: as asked


def test_explicit_settings_and_the_ones_refused():
    assert choose("hnsw", 10, 64, hnsw_m=16, ef_search=40).factory == "HNSW16"
    assert choose("hnsw", 10, 64, hnsw_m=16, ef_search=40).search == {"efSearch": 40}
    assert choose("ivf-pq", 100_000, 1280, nlist=256, m=160, nprobe=8).factory == "IVF256,PQ160"
    assert default_m(1280) == 80 and default_m(384) == 24 and default_m(100) == 5
    with pytest.raises(ValueError, match="--index must be one of"):
        choose("annoy", 10, 64)
    with pytest.raises(ValueError, match="--ivfpq-m must divide the embedding dim 1280"):
        choose("ivf-pq", 100_000, 1280, m=100)
    with pytest.raises(ValueError, match="ivf-pq needs training data"):
        choose("ivf-pq", 1_000, 1280)
    with pytest.raises(ValueError, match="--hnsw-m must be >= 4"):
        choose("hnsw", 10, 64, hnsw_m=2)


def clustered(n: int, dim: int, clusters: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def recall_at_10(index: ProductIndex, exact: ProductIndex, queries: np.ndarray) -> float:
    got, _ = index.search(queries, 10)
    want, _ = exact.search(queries, 10)
    return float(np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want)]))


@pytest.mark.parametrize("kind", ["hnsw", "ivf-pq"])
def test_approximate_indexes_keep_recall_and_their_search_parameters(kind, tmp_path):
    dim, n = 32, 12_000  # 32-d, 8 codes of 4-d: FAISS trains 8-bit PQ codebooks slowly on 2 cores (~1 s each)
    vectors = clustered(n, dim, 50)
    products = [Product(f"p{i}") for i in range(n)]
    queries = clustered(100, dim, 50, seed=1)
    exact = ProductIndex.build(products, vectors, factory="Flat")
    choice = choose(kind, n, dim, m=8)
    index = ProductIndex.build(products, vectors, factory=choice.factory, search=choice.search)
    assert index.kind == kind and index.meta.search == choice.search
    index.save(tmp_path)
    loaded = ProductIndex.load(tmp_path)
    assert loaded.kind == kind and loaded.search_params == choice.search
    recall = recall_at_10(loaded, exact, queries)  # a hard set: 50 wide clusters in 32-d
    assert recall >= 0.6, recall
    # fewer candidates or cells: recall drops; the config's override applies without a rebuild
    loaded.set_search_params(ef_search=10, nprobe=1)
    assert recall_at_10(loaded, exact, queries) < recall - 0.2
    if kind == "hnsw":  # explored widely enough, the graph finds the exact neighbours
        loaded.set_search_params(ef_search=2000)
        assert recall_at_10(loaded, exact, queries) >= 0.99
    with pytest.raises(ValueError, match="must be >= 1"):
        loaded.set_search_params(nprobe=0)


def test_hnsw_with_several_vectors_per_product_returns_k_distinct_products():
    dim, n, views = 32, 2_000, 4
    vectors = clustered(n * views, dim, 20)
    index = ProductIndex.build([Product(f"p{i}") for i in range(n)], vectors, factory="HNSW16",
                               vectors=[views] * n, search={"efSearch": 16})
    ids, scores = index.search(vectors[:5], 10)
    assert all(len(row) == 10 == len(set(row)) for row in ids)
    assert [row[0] for row in ids] == ["p0", "p0", "p0", "p0", "p1"]  # each view finds its product first
    assert all(np.all(np.diff(s) <= 1e-6) for s in scores)


GPU_REASON = gpu_unavailable()


@pytest.mark.skipif(GPU_REASON is not None, reason=f"no FAISS GPU here: {GPU_REASON}")
@pytest.mark.parametrize("kind", ["flat", "ivf-pq", "hnsw"])
def test_on_a_gpu_flat_and_ivf_pq_search_like_on_the_cpu_and_hnsw_is_refused(kind, tmp_path):
    dim, n = 32, 12_000  # 32-d, 8 codes of 4-d: FAISS trains 8-bit PQ codebooks slowly on 2 cores (~1 s each)
    vectors = clustered(n, dim, 50)
    choice = choose(kind, n, dim, m=16)
    ProductIndex.build([Product(f"p{i}") for i in range(n)], vectors, factory=choice.factory,
                       search=choice.search).save(tmp_path)
    cpu = ProductIndex.load(tmp_path, device="cpu")
    if kind == "hnsw":
        with pytest.raises(GpuUnavailableError, match="no GPU version of a IndexHNSWFlat"):
            ProductIndex.load(tmp_path, device="gpu")
        assert ProductIndex.load(tmp_path, device="auto").device == "cpu"
        return
    gpu = ProductIndex.load(tmp_path, device="gpu", gpu_temp_memory_bytes=64 << 20)
    assert gpu.device == "gpu"
    queries = clustered(50, dim, 50, seed=1)
    assert recall_at_10(gpu, cpu, queries) >= 0.95
