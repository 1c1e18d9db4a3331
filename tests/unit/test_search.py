"""lookalike.search: build, persist, search; ids stay strings; TOP_K rules."""

import numpy as np
import pytest

from lookalike.search import Product, ProductIndex
from lookalike.serving import resolve_top_k


def normalised(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def catalog():
    rng = np.random.default_rng(0)
    vectors = normalised(rng, 50, 32)
    # ids that are not positions and would not survive int32 or float conversion
    products = [Product(f"SKU-{10**12 + i:013d}", f"cat{i % 5}", f"/img/{i}.png") for i in range(50)]
    return products, vectors


def test_each_vector_finds_itself_first_with_cosine_one(catalog):
    products, vectors = catalog
    index = ProductIndex.build(products, vectors, embedder_fingerprint="fp")
    ids, scores = index.search(vectors, 5)
    assert [row[0] for row in ids] == [p.product_id for p in products]
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # descending


def test_scores_are_cosine_similarities(catalog):
    products, vectors = catalog
    index = ProductIndex.build(products, vectors)
    query = vectors[:1] * 0.6 + vectors[1:2] * 0.8
    query /= np.linalg.norm(query)
    ids, scores = index.search(query, 50)
    expected = {p.product_id: float(v @ query[0]) for p, v in zip(products, vectors)}
    for pid, score in zip(ids[0], scores[0]):
        assert score == pytest.approx(expected[pid], abs=1e-5)


def test_k_larger_than_catalog_and_empty_catalog(catalog):
    products, vectors = catalog
    index = ProductIndex.build(products[:3], vectors[:3])
    ids, scores = index.search(vectors[:2], 10)
    assert len(ids[0]) == 3 and scores.shape == (2, 3)
    empty = ProductIndex.build([], np.zeros((0, 0), np.float32), dim=32)  # every catalog row was bad
    ids, scores = empty.search(vectors[:2], 10)
    assert ids == [[], []] and scores.shape == (2, 0)


def test_save_load_round_trip(tmp_path, catalog):
    products, vectors = catalog
    ProductIndex.build(products, vectors, embedder_fingerprint="abc").save(tmp_path / "v")
    loaded = ProductIndex.load(tmp_path / "v")
    assert loaded.fingerprint == "abc" and loaded.dim == 32 and len(loaded) == 50
    assert loaded.products[7] == products[7]
    ids, _ = loaded.search(vectors[7:8], 1)
    assert ids == [[products[7].product_id]]


def test_approximate_factory_trains(catalog):
    products, vectors = catalog
    index = ProductIndex.build(products, vectors, factory="IVF4,Flat")
    assert index.meta["factory"] == "IVF4,Flat" and len(index) == 50


def test_rejects_bad_input(catalog):
    products, vectors = catalog
    with pytest.raises(ValueError, match="unique"):
        ProductIndex.build(products[:2] + products[:1], vectors[:3])
    index = ProductIndex.build(products, vectors)
    with pytest.raises(ValueError, match=r"\[N, 32\]"):
        index.search(vectors[:, :16], 3)


def test_resolve_top_k():
    assert resolve_top_k(None, 1) == 10
    assert resolve_top_k(np.zeros((0,), np.int32), 1) == 10  # an ensemble's missing optional input
    assert resolve_top_k(np.array([[3], [3]], np.int32), 2) == 3
    for bad in (0, -1, 1001):
        with pytest.raises(ValueError, match=r"1\.\.1000"):
            resolve_top_k(np.array([[bad]], np.int32), 1)
    with pytest.raises(ValueError, match="same"):
        resolve_top_k(np.array([[3], [4]], np.int32), 2)
