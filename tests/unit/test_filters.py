"""Filters (CATEGORY, EXCLUDE_IDS), search by product id (similar_products), the stored embeddings and
IVF-PQ's exact re-ranking, the embedding store of incremental updates and rollback, without a server."""

import json
from pathlib import Path

import numpy as np
import pytest

from lookalike.indexing.catalog import CatalogItem
from lookalike.indexing.indexer import EmbeddingStore, IndexReport, build_index, compare_versions
from lookalike.indexing.publishing import REASON_FILE, RollbackError, rollback_index, write_index_version
from lookalike.indexing.repository import Repository
from lookalike.serving.artifacts import EmbedderManifest
from lookalike.serving.filtering import Filter
from lookalike.serving.index_files import CorruptIndexError, Product
from lookalike.serving.product_search import ProductSearch, parse_filters, parse_request
from lookalike.serving.search import ProductIndex, UnknownProductError
from lookalike_client import contract as c

DIM = 32


def unit(rng, n, d=DIM):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def catalog():
    """2,000 products, one big category (~50 %), one small (1 %), the rest spread over 20."""
    rng = np.random.default_rng(0)
    n = 2000
    vectors = unit(rng, n)
    categories = ["small" if i % 100 == 0 else "big" if i % 2 else f"c{i % 20}" for i in range(n)]
    products = [Product(f"SKU-{i:05d}", categories[i]) for i in range(n)]
    return products, vectors


def exact_filtered(products, vectors, query, k, f: Filter):
    allowed = [i for i, p in enumerate(products)
               if (not f.category or p.category == f.category) and p.product_id not in f.exclude]
    scores = vectors[allowed] @ query
    order = np.argsort(-scores)[:k]
    return [products[allowed[i]].product_id for i in order]


KINDS = {"flat": ("Flat", None), "hnsw": ("HNSW16", {"efSearch": 32}), "ivf-pq": ("IVF16,PQ16x4", {"nprobe": 2})}


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("strategy", ["auto", "selector", "scan"])
def test_a_filtered_query_returns_top_k_of_the_category_and_never_an_excluded_id(catalog, kind, strategy):
    products, vectors = catalog
    factory, search = KINDS[kind]
    index = ProductIndex.build(products, vectors, factory=factory, search=search)
    queries = unit(np.random.default_rng(1), 20)
    for f in (Filter("small"), Filter("big", frozenset({"SKU-00001", "SKU-00003"})), Filter(None, frozenset({"SKU-00000"}))):
        ids, scores = index.search(queries, 10, f, strategy=strategy)
        for row, q in zip(ids, queries):
            assert len(row) == 10  # full TOP_K: far more than 10 products match each filter
            assert all(f.category is None or products[int(pid[4:])].category == f.category for pid in row)
            assert not set(row) & f.exclude
            truth = exact_filtered(products, vectors, q, 10, f)
            if strategy == "scan" or kind == "flat":  # exact passes: the exact answer
                assert row == truth
        if strategy != "selector":  # lookalike's choice (and the scan) keep recall: checked over all rows
            recall = np.mean([len(set(r) & set(exact_filtered(products, vectors, q, 10, f))) / 10 for r, q in zip(ids, queries)])
            assert recall >= 0.95, (kind, strategy, f, recall)
        assert all((np.diff(s) <= 1e-6).all() for s in scores)


def test_a_graph_index_gets_sub_indexes_for_categories_too_large_to_scan(catalog, tmp_path, monkeypatch):
    """HNSW + selector loses recall for photos far from a large category; such categories get their own
    graph, saved with the version, and exclusions still apply inside it."""
    import lookalike.serving.filtering as filtering

    monkeypatch.setattr(filtering, "FILTER_SCAN_MAX_VECTORS", 100)  # "big" (1,000 of 2,000 vectors) is "large" here
    products, vectors = catalog
    index = ProductIndex.build(products, vectors, factory="HNSW16", search={"efSearch": 32})
    assert set(index.subindexes) == {"big"} and index.meta.subindexes == {"big": "category-0.faiss"}  # c0..c19: 50 each
    index.save(tmp_path)
    loaded = ProductIndex.load(tmp_path)
    assert set(loaded.subindexes) == {"big"} and (tmp_path / "category-0.faiss").is_file()
    f = Filter("big", frozenset({"SKU-00001", "SKU-00003"}))
    assert loaded.filter_path(f) == "subindex" and loaded.filter_path(Filter("c2")) == "scan"
    queries = unit(np.random.default_rng(5), 30)
    ids, scores = loaded.search(queries, 10, f)
    truth = [exact_filtered(products, vectors, q, 10, f) for q in queries]
    assert all(len(r) == 10 and not set(r) & f.exclude for r in ids)
    assert all(products[int(p[4:])].category == "big" for r in ids for p in r)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)]) >= 0.95
    loaded.set_search_params(filter_scan_max_vectors=2000)  # product_search's parameter: exact up to 2,000 vectors
    assert loaded.filter_path(f) == "scan"
    assert loaded.search(queries, 10, f)[0] == truth
    (tmp_path / "category-0.faiss").write_bytes(b"garbage")
    with pytest.raises(CorruptIndexError, match="category-0.faiss"):
        ProductIndex.load(tmp_path)


def test_unknown_category_is_empty_and_small_categories_give_all_they_have(catalog):
    products, vectors = catalog
    index = ProductIndex.build(products, vectors, factory="HNSW16")
    ids, _ = index.search(vectors[:2], 10, Filter("no-such-category"))
    assert ids == [[], []]
    small = [p.product_id for p in products if p.category == "small"]
    ids, _ = index.search(vectors[:1], 1000, Filter("small"))
    assert sorted(ids[0]) == sorted(small)
    ids, _ = index.search(vectors[:1], 10, Filter("small", frozenset(small)))
    assert ids == [[]]
    assert index.categories["small"] == len(small)


def test_rows_of_one_call_keep_their_own_filters(catalog):
    products, vectors = catalog
    index = ProductIndex.build(products, vectors)
    ids, _ = index.search(vectors[:3], 5, [Filter("small"), Filter(), Filter(None, frozenset({products[2].product_id}))])
    assert all(products[int(p[4:])].category == "small" for p in ids[0])
    assert ids[1][0] == products[1].product_id
    assert products[2].product_id not in ids[2]


def test_ivf_pq_reranks_with_the_stored_embeddings(catalog, tmp_path):
    """PQ codes rank approximately; the stored (memory-mapped) embeddings re-rank exactly: scores are
    true cosines and recall against exact search is high where PQ alone is not."""
    products, vectors = catalog
    index = ProductIndex.build(products, vectors, factory="IVF16,PQ16x4", search={"nprobe": 16})  # every cell: PQ alone
    index.save(tmp_path)
    loaded = ProductIndex.load(tmp_path)
    assert loaded.reranks and isinstance(loaded.stored, np.memmap)
    exact = ProductIndex.build(products, vectors)
    queries = unit(np.random.default_rng(2), 50)
    got, scores = loaded.search(queries, 10)
    truth, _ = exact.search(queries, 10)
    for row, row_scores, q in zip(got, scores, queries):
        np.testing.assert_allclose(row_scores, vectors[[int(p[4:]) for p in row]] @ q, atol=1e-5)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, truth)])
    no_store = ProductIndex.build(products, vectors, factory="IVF16,PQ16x4", search={"nprobe": 16}, keep_embeddings=False)
    pq_only = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(no_store.search(queries, 10)[0], truth)])
    assert recall >= 0.9 and recall > pq_only, (recall, pq_only)


def test_similar_never_returns_the_product_and_scores_its_best_image_pair(tmp_path):
    rng = np.random.default_rng(3)
    blocks = [unit(rng, n, 16) for n in (2, 1, 1, 3)]
    near = blocks[0][1] + 0.05 * unit(rng, 1, 16)[0]  # close to A's second image only
    blocks[1] = (near / np.linalg.norm(near))[None, :].astype(np.float32)
    items = [CatalogItem(pid, tmp_path / f"{pid}.png", cat) for pid, cat in (("A", "x"), ("B", "x"), ("C", "y"), ("D", "y"))]
    manifest = EmbedderManifest(model="test", dim=16, input=(3, 8, 8), fingerprint="fp")
    index = build_index(items, blocks, manifest, hashes=["ha", "hb", "hc", "hd"])
    index.save(tmp_path / "v")
    loaded = ProductIndex.load(tmp_path / "v")
    ids, scores = loaded.similar(["A"], 10)
    assert ids[0][0] == "B" and "A" not in ids[0] and len(ids[0]) == 3
    assert scores[0][0] == pytest.approx(float(blocks[1][0] @ blocks[0][1]), abs=1e-5)  # the best pair
    assert loaded.similar(["A"], 10, Filter("y"))[0] == [[p for p in ids[0] if p in ("C", "D")]]
    with pytest.raises(UnknownProductError, match="unknown product id 'Z'"):
        loaded.similar(["Z"], 3)
    assert [p.sources for p in loaded.products][0] == ((str(tmp_path / "A.png"), "ha", 2),)


def request(**tensors):
    return {name: value for name, value in tensors.items()}


def strings(rows):
    return np.array([[v.encode() for v in row] for row in rows], dtype=np.object_)


def test_parse_request_takes_an_embedding_or_a_product_id_and_per_row_filters(catalog):
    products, vectors = catalog
    index = ProductIndex.build(products, vectors)
    r = parse_request({c.EMBEDDING: vectors[:2], c.CATEGORY: strings([["big"], [""]]),
                       c.EXCLUDE_IDS: strings([["SKU-00001", ""], ["", ""]])}, DIM, index=index)
    assert r.filters == (Filter("big", frozenset({"SKU-00001"})), Filter())
    r = parse_request({c.PRODUCT_ID: strings([["SKU-00002"]]), c.TOP_K: np.array([[3]], np.int32),
                       c.CATEGORY: np.zeros((0, 1), np.object_)}, DIM, index=index)  # empty: through an ensemble
    assert r.embeddings is None and r.product_ids == ("SKU-00002",) and r.k == 3 and r.filters == (Filter(),)
    for inputs, message in [
        ({}, "send either EMBEDDING or PRODUCT_ID"),
        ({c.EMBEDDING: vectors[:1], c.PRODUCT_ID: strings([["SKU-00002"]])}, "not both"),
        ({c.PRODUCT_ID: strings([["nope"]])}, "unknown product id 'nope'"),
        ({c.EMBEDDING: vectors[:3], c.CATEGORY: strings([["a"], ["b"]])}, "CATEGORY has 2 rows for 3 queries"),
        ({c.EMBEDDING: vectors[:1], c.CATEGORY: np.array([[b"\xff"]], dtype=np.object_)}, "utf-8"),
        ({c.EMBEDDING: vectors[:1], c.EXCLUDE_IDS: strings([["x"] * (c.MAX_EXCLUDE_IDS + 1)])}, "at most"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_request(inputs, DIM, index=index)
    assert parse_filters({c.CATEGORY: strings([["big"]])}, 3) == (Filter("big"),) * 3  # one row for all


def test_a_bad_request_of_a_batch_fails_alone(catalog):
    products, vectors = catalog
    search = ProductSearch(ProductIndex.build(products, vectors))
    outcomes = search([
        {c.PRODUCT_ID: strings([["SKU-00004"]]), c.CATEGORY: strings([["big"]])},
        {c.PRODUCT_ID: strings([["missing"]])},
        {c.EMBEDDING: vectors[5:6], c.EXCLUDE_IDS: strings([["SKU-00005"]])},
        {c.EMBEDDING: vectors[6:7], c.CATEGORY: strings([["no-such"]])},
    ])
    assert [o.error is None for o in outcomes] == [True, False, True, True]
    ids = [[v.decode() for v in o.outputs[c.PRODUCT_IDS][0]] if o.outputs else None for o in outcomes]
    assert len(ids[0]) == 10 and "SKU-00004" not in ids[0] and all(int(p[4:]) % 2 for p in ids[0])
    assert "unknown product id 'missing'" in str(outcomes[1].error)
    assert "SKU-00005" not in ids[2] and len(ids[2]) == 10
    assert outcomes[3].outputs[c.PRODUCT_IDS].shape == (1, 0)


def test_every_answer_carries_the_index_info(catalog):
    products, vectors = catalog
    search = ProductSearch(ProductIndex.build(products, vectors), version=7, embedder_model="lite")
    outcome, = search([{c.EMBEDDING: vectors[:3]}])
    info = outcome.outputs[c.INDEX_INFO]
    assert info.shape == (3, 1) and len(set(info.reshape(-1).tolist())) == 1
    assert json.loads(info[0, 0]) == {"version": 7, "products": len(products), "kind": "flat", "dim": DIM,
                                      "embedder_model": "lite", "embedder_fingerprint": search.index.fingerprint,
                                      "index_id": search.index.meta.index_id, "backend": "faiss", "device": "cpu"}
    assert len(search.index.meta.index_id) == 32  # given when built: which index, beyond its version number


# -- the embedding store and rollback --------------------------------------------------------------

@pytest.fixture
def repo(tmp_path) -> Repository:
    (tmp_path / "embedder").mkdir()
    EmbedderManifest(model="test", dim=16, input=(3, 8, 8), fingerprint="fp-now").save(tmp_path / "embedder" / "manifest.json")
    (tmp_path / "product_search").mkdir()
    (tmp_path / "product_search" / "model.py").write_text("# adapter\n")
    return Repository(tmp_path)


def publish(repo, rows, fingerprint="fp-now", seed=0):
    """rows: (product id, category, image sha) -> a version whose vectors are a function of the sha."""
    items = [CatalogItem(pid, repo.root / f"{sha}.png", cat) for pid, cat, sha in rows]
    blocks = [unit(np.random.default_rng(abs(hash(sha)) % 2**32), 2, 16) for _, _, sha in rows]
    manifest = EmbedderManifest(model="test", dim=16, input=(3, 8, 8), fingerprint=fingerprint)
    index = build_index(items, blocks, manifest, hashes=[sha for _, _, sha in rows])
    return write_index_version(repo, index.save), dict(zip((sha for _, _, sha in rows), blocks))


def test_the_store_holds_the_kept_versions_of_the_current_embedder_by_content_hash(repo):
    _, first = publish(repo, [("A", "x", "h1"), ("B", "x", "h2")])
    publish(repo, [("C", "y", "h3")], fingerprint="fp-other")
    store = EmbeddingStore.from_repository(repo, "fp-now")
    assert len(store) == 2 and store.get("h3") is None and store.get("unknown") is None
    np.testing.assert_array_equal(store.get("h2"), first["h2"])


def test_compare_versions_counts_added_changed_removed_and_recategorized(repo):
    publish(repo, [("A", "x", "h1"), ("B", "x", "h2"), ("C", "x", "h3"), ("D", "x", "h4")])
    items = [("A", "x", "h1"), ("B", "x", "h2-new"), ("C", "z", "h3"), ("E", "x", "h5")]
    manifest = EmbedderManifest(model="test", dim=16, input=(3, 8, 8), fingerprint="fp-now")
    built = build_index([CatalogItem(p, repo.root / f"{s}.png", cat) for p, cat, s in items],
                        [unit(np.random.default_rng(0), 1, 16)] * 4, manifest, hashes=[s for _, _, s in items])
    report = IndexReport(0, 4)
    compare_versions(repo, built, report)
    assert (report.added, report.changed, report.removed, report.recategorized, report.previous) == (1, 1, 1, 1, 1)


class Server:
    """Stands in for the running server's model control: serves the newest version on reload, and says
    which in its INDEX_INFO (`info()`) as product_search does, read from the version's own files."""

    url = "127.0.0.1:8001"
    server_id = "lookalike:test-host:1"

    def __init__(self, repo, refuse=False):
        self.repo, self.refuse, self.served = repo, refuse, repo.index_versions()[-1:]

    def reload_index(self):
        from lookalike_client import ServerError

        if self.refuse:
            raise ServerError("load failed")
        self.served = self.repo.index_versions()[-1:]

    def served_index_versions(self):
        return self.served

    def info(self):
        from types import SimpleNamespace

        from lookalike.serving.artifacts import IndexMeta

        meta = IndexMeta.load(self.repo.search_dir / str(self.served[-1]))
        return SimpleNamespace(index_version=self.served[-1], index_id=meta.index_id, products=meta.count,
                               embedder_model="test", embedder_fingerprint=meta.embedder_fingerprint,
                               server_id=self.server_id)


def test_rollback_sets_the_newest_aside_and_serves_the_previous(repo):
    v1, _ = publish(repo, [("A", "x", "h1")])
    v2, _ = publish(repo, [("B", "x", "h2")])
    server = Server(repo)
    assert rollback_index(repo, server) == (v2, v1)
    assert repo.index_versions() == [v1] and server.served == [v1]
    (aside,) = repo.rejected_dir.iterdir()
    assert aside.name.startswith(f"{v2}-") and "rolled back" in (aside / REASON_FILE).read_text()
    with pytest.raises(RollbackError, match="no earlier index version"):
        rollback_index(repo, server)
    v3, _ = publish(repo, [("C", "x", "h3")])
    assert v3 == v2 + 1  # a number never names two indexes


def test_a_rollback_the_server_refuses_puts_the_newest_back(repo):
    v1, _ = publish(repo, [("A", "x", "h1")])
    v2, _ = publish(repo, [("B", "x", "h2")])
    with pytest.raises(RollbackError, match=f"version {v2} was put back"):
        rollback_index(repo, Server(repo, refuse=True))
    assert repo.index_versions() == [v1, v2] and not (repo.search_dir / str(v2) / REASON_FILE).exists()


def built(rows, fingerprint="fp-now"):
    items = [CatalogItem(pid, Path(f"/x/{sha}.png"), cat) for pid, cat, sha in rows]
    blocks = [unit(np.random.default_rng(abs(hash(sha)) % 2**32), 2, 16) for _, _, sha in rows]
    manifest = EmbedderManifest(model="test", dim=16, input=(3, 8, 8), fingerprint=fingerprint)
    return build_index(items, blocks, manifest, hashes=[sha for _, _, sha in rows])


class Elsewhere(Server):
    """A server that serves another repository: a reload leaves it on what it served."""

    def __init__(self, repo, other):
        super().__init__(other)
        self.local = repo

    def reload_index(self):
        pass


def test_publish_confirms_the_version_through_index_info_or_sets_it_aside(repo, tmp_path):
    from lookalike.indexing.publishing import PublishError, publish_index

    v1, _ = publish(repo, [("A", "x", "h1")])
    server = Server(repo)
    published = publish_index(repo, built([("B", "x", "h2")]), server)
    assert published.version == v1 + 1 and published.served.index_version == v1 + 1 and published.pruned == []
    # a server on a copy of this repository (same history, same ids): the reload changes nothing there
    import shutil

    shutil.copytree(repo.root, tmp_path / "copy")
    elsewhere = Elsewhere(repo, Repository(tmp_path / "copy"))
    with pytest.raises(PublishError, match=f"serves index version {v1 + 1} .*not index version {v1 + 2}.*set aside"):
        publish_index(repo, built([("C", "x", "h3")]), elsewhere)
    assert repo.index_versions() == [v1, v1 + 1]  # nothing a restart would serve instead
    (aside,) = repo.rejected_dir.iterdir()
    assert aside.name.startswith(f"{v1 + 2}-") and "not index version" in (aside / REASON_FILE).read_text()


def test_index_checks_the_server_before_anything_is_embedded(repo, tmp_path):
    import shutil

    from lookalike.indexing.publishing import ServerMismatchError, check_server, write_empty_index

    v1, _ = publish(repo, [("A", "x", "h1")])
    assert check_server(repo, Server(repo)).index_version == v1
    shutil.copytree(repo.root, tmp_path / "copy")
    assert check_server(repo, Server(Repository(tmp_path / "copy"))).index_version == v1  # the same files
    other = Repository(tmp_path / "other")  # another repository, its own history
    shutil.copytree(repo.root, other.root)
    shutil.rmtree(other.search_dir / str(v1))
    write_empty_index(other)
    with pytest.raises(ServerMismatchError, match=f"serves index version {v1} .*holds another index under that number"):
        check_server(repo, Server(other))
    write_empty_index(other)
    with pytest.raises(ServerMismatchError, match=f"serves index version {v1 + 1} .*has no such version"):
        check_server(repo, Server(other))
    foreign = Repository(tmp_path / "foreign")  # a server of another embedder
    shutil.copytree(repo.root, foreign.root)
    publish(foreign, [("A", "x", "h1")], fingerprint="fp-other")
    with pytest.raises(ServerMismatchError, match="fp-other.*fp-now.*nothing was embedded or written"):
        check_server(repo, Server(foreign))


def write_record(repo, host, pid, version, updated, server_id=""):
    repo.serving_dir.mkdir(exist_ok=True)
    (repo.serving_dir / f"{host}-{pid}.json").write_text(json.dumps(
        {"host": host, "pid": pid, "version": version, "server_id": server_id or f"lookalike:{host}:{pid}",
         "urls": ["10.0.0.7:8001"], "updated": updated}))


def test_pruning_keeps_and_names_a_version_another_server_still_serves(repo):
    import os
    import socket
    import subprocess
    import sys
    import time

    from lookalike.indexing.publishing import publish_index, serving_records

    versions = [publish(repo, [(f"P{i}", "x", f"h{i}")])[0] for i in range(3)]
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        here = socket.gethostname()
        write_record(repo, here, other.pid, versions[0], time.time())  # a second server on this host
        write_record(repo, here, 2**22 + 5, versions[1], time.time())  # one that is gone: no protection
        write_record(repo, "remote-a", 7, versions[1], time.time() - 3600)  # silent for an hour: stale
        write_record(repo, "remote-b", 8, versions[2], time.time())
        me = os.getpid()  # stands for the server this test reloads (its id), whose record still lags
        write_record(repo, here, me, versions[2], time.time(), server_id=Server.server_id)
        assert {(r.host, r.pid, r.version) for r in serving_records(repo)} == {
            (here, other.pid, versions[0]), ("remote-b", 8, versions[2]), (here, me, versions[2])}
        published = publish_index(repo, built([("Q", "x", "q")]), Server(repo), keep_versions=1)
        assert published.pruned == [versions[1]]  # served by nobody alive
        assert sorted(published.kept_for) == [versions[0], versions[2]]
        assert str(published.kept_for[versions[0]][0]).startswith(f"lookalike serve pid {other.pid} on {here}")
        assert [r.host for r in published.kept_for[versions[2]]] == ["remote-b"]  # not the server we reloaded
        assert repo.index_versions() == [versions[0], versions[2], published.version]
        assert not (repo.serving_dir / f"{here}-{2**22 + 5}.json").exists()  # a dead server's record is removed
    finally:
        other.kill()
        other.wait()


def test_a_serving_record_is_written_atomically_and_removed(repo):
    import os

    from lookalike.indexing.publishing import clear_serving, record_serving, serving_records

    path = record_serving(repo, 4, "lookalike:h:1", ("127.0.0.1:8001", "127.0.0.1:8000"))
    (record,) = serving_records(repo)
    assert (record.pid, record.version, record.server_id) == (os.getpid(), 4, "lookalike:h:1")
    assert str(record).endswith("(127.0.0.1:8001, 127.0.0.1:8000)")
    assert [p.name for p in repo.serving_dir.iterdir()] == [path.name]  # no temporary file left
    clear_serving(repo)
    assert serving_records(repo) == []


def grouped_catalog(products=400, per=5, seed=3):
    """Products of `per` vectors each, close together (a packshot and its views), in 20 families."""
    rng = np.random.default_rng(seed)
    families = unit(rng, 20)
    centres = families[rng.integers(0, 20, products)] + 0.25 * unit(rng, products)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    vectors = np.repeat(centres, per, axis=0) + 0.15 * unit(rng, products * per)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    items = [Product(f"P{i}", "even" if i % 2 == 0 else "odd") for i in range(products)]
    return items, vectors.astype(np.float32), per


def best_vector_score(index, pid, query):
    return float(np.max(index.product_vectors(pid) @ query))


@pytest.mark.parametrize("kind", ["hnsw", "ivf-pq"])
def test_approximate_results_score_each_product_by_its_best_stored_vector(kind):
    """An approximate search may reach a product by one of its images but not its best: every product
    it returns is scored exactly by its best vector, so the ranking is the exact ranking of the
    candidates, whatever path (unfiltered, selector, sub-index, scan) found them."""
    products, vectors, per = grouped_catalog()
    factory, search = {"hnsw": ("HNSW8", {"efSearch": 16}), "ivf-pq": ("IVF8,PQ8x4", {"nprobe": 1})}[kind]
    index = ProductIndex.build(products, vectors, vectors=[per] * len(products), factory=factory, search=search)
    assert index.rescores
    queries = unit(np.random.default_rng(4), 30)
    for f in (None, Filter("even"), Filter(None, frozenset({"P1", "P2"}))):
        for strategy in ("auto", "selector", "scan") if f else ("auto",):
            ids, scores = index.search(queries, 10, f, strategy=strategy)
            for row, row_scores, q in zip(ids, scores, queries):
                assert len(row) == 10 and len(set(row)) == 10
                assert row_scores.tolist() == pytest.approx([best_vector_score(index, pid, q) for pid in row], abs=1e-5)
                assert np.all(np.diff(row_scores) <= 1e-6)


def test_rescoring_finds_a_product_by_any_of_its_vectors():
    """Only a product's weakest vector among the found positions: it is listed with its best score."""
    products, vectors, per = grouped_catalog(products=50)
    index = ProductIndex.build(products, vectors, vectors=[per] * len(products), factory="HNSW8")
    query = vectors[7 * per + 2]  # one of P7's vectors
    own = vectors[7 * per : 8 * per] @ query
    weakest = 7 * per + int(np.argmin(own))
    other = 3 * per  # and one vector of P3
    positions = np.array([[other, weakest, -1]])
    scores = np.array([[float(vectors[other] @ query), float(own.min()), -3.4e38]], dtype=np.float32)
    (ids, got), = index._by_product(scores, positions, 2, query[None, :])
    assert ids[0] == "P7" and got[0] == pytest.approx(1.0, abs=1e-5)  # its best vector is the query itself
    assert ids[1] == "P3" and got[1] == pytest.approx(best_vector_score(index, "P3", query), abs=1e-5)
    (plain_ids, plain), = index._by_product(scores, positions, 2)  # without queries: FAISS's own scores
    assert plain_ids == ["P3", "P7"] and plain[1] == pytest.approx(float(own.min()))  # P7 under its best score


def test_flat_and_single_vector_indexes_do_not_rescore(catalog):
    products, vectors = catalog
    assert not ProductIndex.build(products, vectors, factory="HNSW16").rescores  # one vector a product
    grouped, gvectors, per = grouped_catalog(products=50)
    assert not ProductIndex.build(grouped, gvectors, vectors=[per] * 50).rescores  # exact already
    # a graph scores from its own vectors; a compressed index needs the stored embeddings
    assert ProductIndex.build(grouped, gvectors, vectors=[per] * 50, factory="HNSW8", keep_embeddings=False).rescores
    many, mvectors, per = grouped_catalog(products=2000, per=5)
    assert not ProductIndex.build(many, mvectors, vectors=[per] * 2000, factory="IVF8,PQ8x4", keep_embeddings=False).rescores
