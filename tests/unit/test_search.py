"""lookalike.serving.search and lookalike.serving.product_search: build, persist, search; ids stay strings; TOP_K and embedding
rules; requests of one batch never shape each other."""

import re

import numpy as np
import pytest

from lookalike.serving.index_files import Product
from lookalike.serving.product_search import PAD_PRODUCT_ID, PAD_SCORE, SearchRequest, check_embeddings, resolve_top_k, search_requests
from lookalike.serving.search import ProductIndex


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
    np.testing.assert_allclose([row[0] for row in scores], 1.0, atol=1e-5)
    assert all(len(row) == 5 and (np.diff(row) <= 1e-6).all() for row in scores)  # descending


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
    assert [len(row) for row in ids] == [3, 3] and [len(row) for row in scores] == [3, 3]
    empty = ProductIndex.build([], np.zeros((0, 0), np.float32), dim=32)  # every catalog row was bad
    ids, scores = empty.search(vectors[:2], 10)
    assert ids == [[], []] and [len(row) for row in scores] == [0, 0]


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
    assert index.meta.factory == "IVF4,Flat" and len(index) == 50


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


def sparse_ivf(catalog):
    """An IVF index whose lists are so uneven that nprobe=1 leaves some queries short of k hits."""
    products, vectors = catalog
    index = ProductIndex.build(products, vectors, factory="IVF8,Flat")
    index.index.nprobe = 1
    sizes = index.index.invlists
    lists = [sizes.list_size(i) for i in range(index.index.nlist)]
    return index, products, vectors, lists


def test_a_row_an_approximate_index_cannot_fill_shortens_only_itself(catalog):
    index, products, vectors, lists = sparse_ivf(catalog)
    k = max(lists)  # more than most lists hold: the rows whose list is small come back short
    ids, scores = index.search(vectors, k)
    lengths = [len(row) for row in ids]
    assert min(lengths) < k == max(lengths), lengths  # the test needs both kinds of row
    for row_ids, row_scores, vector in zip(ids, scores, vectors):
        assert len(row_ids) == len(row_scores) and "" not in row_ids
        alone_ids, alone_scores = index.search(vector[None], k)  # the same row searched on its own
        assert row_ids == alone_ids[0]
        np.testing.assert_allclose(row_scores, alone_scores[0], atol=1e-6)


def test_requests_of_one_batch_never_shape_each_other(catalog):
    index, products, vectors, lists = sparse_ivf(catalog)
    k = max(lists)
    requests = [SearchRequest(vectors[i : i + 3], k) for i in range(0, 48, 3)] + [SearchRequest(vectors[48:], 2)]
    together = search_requests(index, requests)
    for request, result in zip(requests, together):
        alone = search_requests(index, [request])[0]
        assert result.product_ids.tolist() == alone.product_ids.tolist()
        np.testing.assert_allclose(result.scores, alone.scores, atol=1e-6)
        assert result.product_ids.shape[1] <= request.k
        for row_ids, row_scores in zip(result.product_ids, result.scores):
            real = [pid for pid in row_ids if pid != PAD_PRODUCT_ID]
            assert list(row_ids[: len(real)]) == real  # padding only at the end
            assert (row_scores[len(real):] == np.float32(PAD_SCORE)).all()
    assert together[-1].product_ids.shape == (2, 2)  # its own k, not the batch's largest


def test_flat_rows_are_full_whatever_their_batch_mates(catalog):
    products, vectors = catalog
    index = ProductIndex.build(products, vectors)
    result = search_requests(index, [SearchRequest(vectors[:4], 10), SearchRequest(vectors[4:5], 3)])
    assert result[0].product_ids.shape == (4, 10) and result[1].product_ids.shape == (1, 3)
    assert PAD_PRODUCT_ID not in result[0].product_ids.reshape(-1).tolist()


@pytest.mark.parametrize("value, message", [(np.nan, "row 1 of 3 is not finite (holds NaN)"),
                                            (np.inf, "row 1 of 3 is not finite (holds inf)"),
                                            (-np.inf, "row 1 of 3 is not finite (holds inf)")])
def test_non_finite_rows_are_refused_by_row(catalog, value, message):
    _, vectors = catalog
    batch = vectors[:3].copy()
    batch[1, 5] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        check_embeddings(batch, 32)


def test_wrongly_normed_rows_are_refused_by_row(catalog):
    _, vectors = catalog
    for scale, row in ((3.0, 2), (0.0, 0), (1.02, 1)):
        batch = vectors[:3].copy()
        batch[row] *= scale
        with pytest.raises(ValueError, match=rf"row {row} of 3 has L2 norm .*L2-normalised"):
            check_embeddings(batch, 32)
    almost = vectors[:3] * 1.004  # FP16 engines land within 1e-3 of 1: accepted
    assert check_embeddings(almost, 32).dtype == np.float32
    with pytest.raises(ValueError, match=r"\[N, 32\]"):
        check_embeddings(vectors[:, :16], 32)


# -- several vectors per product (catalog views) -------------------------------------------------------
def test_a_product_scores_its_best_vector_and_appears_once(tmp_path):
    rng = np.random.default_rng(3)
    products = [Product(f"p{i}") for i in range(6)]
    vectors = normalised(rng, 6 * 3, 16)  # three vectors each, consecutive
    index = ProductIndex.build(products, vectors, vectors=[3] * 6)
    assert len(index) == 6 and index.index.ntotal == 18 and index.meta.vectors == 18
    ids, scores = index.search(vectors, 4)
    for row, (found, got) in enumerate(zip(ids, scores)):
        assert found[0] == f"p{row // 3}" and got[0] == pytest.approx(1.0, abs=1e-5)  # each view finds its product
        assert len(found) == len(set(found)) == 4  # products, not vectors
        assert np.all(np.diff(got) <= 1e-7)
    # exactly the products' max-over-vectors ranking, as brute force says
    query = normalised(rng, 1, 16)
    best = (vectors @ query[0]).reshape(6, 3).max(axis=1)
    ids, scores = index.search(query, 6)
    assert ids[0] == [f"p{i}" for i in np.argsort(-best)]
    np.testing.assert_allclose(scores[0], np.sort(best)[::-1], atol=1e-5)
    index.save(tmp_path / "v")
    loaded = ProductIndex.load(tmp_path / "v")
    assert loaded.vectors.tolist() == [3] * 6 and loaded.search(query, 6)[0] == ids


def test_uneven_vector_counts_and_old_indexes_without_counts(tmp_path):
    import json

    rng = np.random.default_rng(4)
    vectors = normalised(rng, 4, 8)
    index = ProductIndex.build([Product("a"), Product("b"), Product("c")], vectors, vectors=[1, 2, 1])
    ids, _ = index.search(vectors, 3)  # rows 1 and 2 are both b's
    assert [row[0] for row in ids] == ["a", "b", "b", "c"]
    assert all(sorted(row) == ["a", "b", "c"] for row in ids)
    with pytest.raises(ValueError, match="vectors"):
        ProductIndex.build([Product("a"), Product("b")], vectors, vectors=[1, 2])
    # an index written before catalog views has no counts: one vector each
    plain = ProductIndex.build([Product("a"), Product("b"), Product("c"), Product("d")], vectors)
    plain.save(tmp_path / "old")
    columns = json.loads((tmp_path / "old" / "products.json").read_text())
    assert columns.pop("vectors") == [1, 1, 1, 1]
    assert ProductIndex(plain.index, plain.products, plain.meta).vectors.tolist() == [1, 1, 1, 1]
