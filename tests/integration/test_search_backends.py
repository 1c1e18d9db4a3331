"""The same search contract on both search backends: FAISS inside product_search (the session `server`)
and a real Milvus standalone server behind `lookalike serve --search-backend milvus` (`milvus_serve`).
Same models and tensors, same filters, one row per product scored by its best vector, the same
INDEX_INFO fields and the same errors; and Milvus FLAT gives FAISS flat's ids and scores."""

import csv
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from lookalike.serving.filtering import Filter
from lookalike.serving.index_files import Product
from lookalike.serving.search import ProductIndex
from lookalike_client import InvalidRequestError, LookalikeClient, NotFoundError
from lookalike_client import contract as c

pytestmark = pytest.mark.integration


@pytest.fixture(params=["faiss", "milvus"])
def backend(request, catalog, catalog_small):
    """(grpc url, http url, catalog dir, backend name) of a server on that backend."""
    if request.param == "faiss":
        server = request.getfixturevalue("server")
        return server.options.grpc_url, server.options.http_url, catalog, "faiss"
    serve = request.getfixturevalue("milvus_serve")
    return serve.grpc, serve.http, catalog_small, "milvus"


def rows(catalog_dir: Path) -> list[dict]:
    with open(catalog_dir / "catalog.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def indexed(catalog_dir: Path, client: LookalikeClient, count: int = 6) -> list[dict]:
    """Catalog rows the served index holds (a few rows of the sample catalog are refused, e.g. too large)."""
    found = []
    for row in rows(catalog_dir):
        try:
            client.similar(row["product_id"], top_k=1)
        except NotFoundError:
            continue
        found.append(row)
        if len(found) == count:
            break
    return found


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_catalog_images_find_themselves_once_per_product(backend, protocol):
    grpc_url, http_url, catalog_dir, _ = backend
    with LookalikeClient(grpc_url if protocol == "grpc" else http_url, protocol=protocol, timeout_s=60) as client:
        for row in indexed(catalog_dir, client, 4):
            matches = client.search((catalog_dir / row["image"]).read_bytes(), top_k=10)
            assert matches[0].product_id == row["product_id"] and matches[0].score > 0.99
            ids = [m.product_id for m in matches]
            assert len(ids) == len(set(ids)) == 10, "one row per product, each scored by its best vector"
            assert [m.score for m in matches] == sorted((m.score for m in matches), reverse=True)


def test_filters_and_similar_products(backend):
    grpc_url, _, catalog_dir, _ = backend
    with LookalikeClient(grpc_url, timeout_s=60) as client:
        row = indexed(catalog_dir, client, 1)[0]
        image = (catalog_dir / row["image"]).read_bytes()
        categories = {r["product_id"]: r["category"] for r in rows(catalog_dir)}
        in_category = client.search(image, top_k=5, category=row["category"])
        assert in_category and all(categories[m.product_id] == row["category"] for m in in_category)
        assert client.search(image, top_k=5, category="no such category") == []
        assert client.search(image, top_k=5, category='line\nbreak "quoted" \\ \x00') == []  # any text is a value
        assert client.search(image, top_k=1)[0].product_id == row["product_id"]  # and harms no later request
        without = client.search(image, top_k=5, exclude_ids=[row["product_id"]])
        assert row["product_id"] not in [m.product_id for m in without] and len(without) == 5
        similar = client.similar(row["product_id"], top_k=5)
        assert len(similar) == 5 and row["product_id"] not in [m.product_id for m in similar]
        other = client.similar(row["product_id"], top_k=3, category=row["category"], exclude_ids=[similar[0].product_id])
        assert similar[0].product_id not in [m.product_id for m in other]
        assert all(categories[m.product_id] == row["category"] for m in other)


def test_index_info_names_the_backend(backend):
    grpc_url, _, _, name = backend
    with LookalikeClient(grpc_url, timeout_s=60) as client:
        info = client.info()
    assert info.backend == name and info.products > 0 and info.index_version >= 1 and info.index_id
    assert info.device in (("cpu", "gpu") if name == "faiss" else ("milvus",))
    assert info.index_kind.startswith("milvus-") == (name == "milvus")


def test_same_errors_on_both_backends(backend):
    grpc_url, _, _, _ = backend
    with LookalikeClient(grpc_url, timeout_s=60) as client:
        with pytest.raises(NotFoundError, match=f"{c.UNKNOWN_PRODUCT} 'no-such-product'"):
            client.similar("no-such-product")
        info = client.info()
    triton = grpcclient.InferenceServerClient(grpc_url)
    bad = np.full((1, info.dim), 0.5, dtype=np.float32)  # norm far from 1
    tensor = grpcclient.InferInput(c.EMBEDDING, list(bad.shape), "FP32")
    tensor.set_data_from_numpy(bad)
    with pytest.raises(Exception, match="L2 norm") as raised:
        triton.infer(c.SEARCH_MODEL, [tensor])
    assert "INVALID_ARGUMENT" in str(raised.value.status())
    with pytest.raises(InvalidRequestError, match="TOP_K must be in"):
        _raw_top_k(triton, info.dim)


def _raw_top_k(triton, dim: int) -> None:
    from lookalike_client.errors import translate

    vector = np.eye(1, dim, dtype=np.float32)
    inputs = [grpcclient.InferInput(c.EMBEDDING, [1, dim], "FP32"), grpcclient.InferInput(c.TOP_K, [1, 1], "INT32")]
    inputs[0].set_data_from_numpy(vector)
    inputs[1].set_data_from_numpy(np.array([[c.MAX_TOP_K + 1]], dtype=np.int32))
    try:
        triton.infer(c.SEARCH_MODEL, inputs)
    except Exception as exc:  # noqa: BLE001 - the SDK's translation, as its calls raise it
        raise translate(exc) from None


def product_search(triton, queries: np.ndarray, k: int, category: str = "") -> tuple[list[list[str]], np.ndarray]:
    inputs = [grpcclient.InferInput(c.EMBEDDING, list(queries.shape), "FP32"),
              grpcclient.InferInput(c.TOP_K, [len(queries), 1], "INT32")]
    inputs[0].set_data_from_numpy(queries)
    inputs[1].set_data_from_numpy(np.full((len(queries), 1), k, dtype=np.int32))
    if category:
        inputs.append(grpcclient.InferInput(c.CATEGORY, [len(queries), 1], "BYTES"))
        inputs[-1].set_data_from_numpy(np.full((len(queries), 1), category.encode(), dtype=np.object_))
    result = triton.infer(c.SEARCH_MODEL, inputs, outputs=[grpcclient.InferRequestedOutput(c.PRODUCT_IDS),
                                                           grpcclient.InferRequestedOutput(c.SCORES)])
    ids = [[v.decode() for v in row if v] for row in result.as_numpy(c.PRODUCT_IDS)]
    return ids, result.as_numpy(c.SCORES)


def test_milvus_flat_gives_faiss_flat_ids_and_scores(milvus, milvus_serve):
    """Every vector of the Milvus collection, read back and indexed by FAISS flat in process: the same
    queries through product_search on Milvus give the same ids, scores within 1e-4, filtered or not."""
    from pymilvus import MilvusClient

    client = MilvusClient(uri=milvus.uri)
    try:
        name = client.describe_alias("lookalike")["collection_name"]
        stored = list(client.query(name, filter="", output_fields=["product_id", "category", "vector", "pk"], limit=16384,
                                   consistency_level="Strong"))
    finally:
        client.close()
    stored.sort(key=lambda r: (r["product_id"], r["pk"]))
    products, blocks = {}, {}
    for r in stored:
        products.setdefault(r["product_id"], Product(r["product_id"], r["category"]))
        blocks.setdefault(r["product_id"], []).append(r["vector"])
    order = list(products)
    faiss_index = ProductIndex.build([products[p] for p in order], np.concatenate([np.asarray(blocks[p], np.float32) for p in order]),
                                     vectors=[len(blocks[p]) for p in order])
    rng = np.random.default_rng(0)
    queries = np.asarray([blocks[p][0] for p in order[:8]], np.float32) + rng.normal(0, 0.05, (8, faiss_index.dim)).astype(np.float32)
    queries = np.concatenate([queries, rng.normal(size=(8, faiss_index.dim)).astype(np.float32)])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    triton = grpcclient.InferenceServerClient(milvus_serve.grpc)
    category = products[order[0]].category
    for k, f in ((10, Filter()), (25, Filter()), (5, Filter(category))):
        expected_ids, expected_scores = faiss_index.search(queries, k, f)
        got_ids, got_scores = product_search(triton, queries, k, f.category or "")
        for row in range(len(queries)):
            assert got_ids[row] == expected_ids[row]
            np.testing.assert_allclose(got_scores[row][: len(expected_ids[row])], expected_scores[row], atol=1e-4)


def test_query_views_are_searched_each_and_fused_on_both_backends(backend):
    """product_search given one query of 3 views (EMBEDDING [1, 3 x D], as preprocess_query sends them):
    the fusion (the preprocessing file's query_fusion) of what each view alone gets from the same
    server, on either backend; each view is a catalog packshot, so its product comes out on top."""
    from lookalike.indexing.repository import Repository
    from lookalike.serving.fusion import depth, fuse

    grpc_url, _, catalog_dir, _ = backend
    fusion = Repository(Path(__file__).resolve().parents[2] / "model_repository").preprocessing().query_fusion
    with LookalikeClient(grpc_url, timeout_s=60) as client:
        found = indexed(catalog_dir, client, 3)
        views = client.embed([(catalog_dir / row["image"]).read_bytes() for row in found])
    triton = grpcclient.InferenceServerClient(grpc_url)
    alone = [product_search(triton, views[v : v + 1], depth(5, 3, fusion)) for v in range(3)]
    expected_ids, expected_scores = fuse([a[0][0] for a in alone], [a[1][0][: len(a[0][0])] for a in alone], 5, fusion)
    ids, scores = product_search(triton, views.reshape(1, -1), 5)
    assert ids[0] == expected_ids
    np.testing.assert_allclose(scores[0], expected_scores, atol=1e-5)
    if fusion == "max":
        assert set(ids[0][:3]) == {row["product_id"] for row in found}
