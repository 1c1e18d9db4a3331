"""Filters, similar_products, incremental updates and rollback on a real tritonserver, over gRPC and HTTP."""

import csv
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from lookalike.indexing.indexer import index_catalog
from lookalike.indexing.publishing import publish_index, rollback_index
from lookalike.indexing.repository import Repository
from lookalike.serving.search import ProductIndex
from lookalike_client import InvalidRequestError, LookalikeClient, NotFoundError
from lookalike_client import contract as c


def catalog_rows(catalog: Path) -> list[dict]:
    with open(catalog / "catalog.csv") as handle:
        return list(csv.DictReader(handle))


def served(server) -> ProductIndex:
    return ProductIndex.load(Repository(server.options.model_repository).latest_index_dir())


def test_category_and_exclusions_filter_and_still_fill_top_k(client, server, catalog):
    index = served(server)
    category_of = {p.product_id: p.category for p in index.products}
    rows = catalog_rows(catalog)
    row = rows[0]
    image = (catalog / row["image"]).read_bytes()
    sizes = Counter(category_of.values())
    other = next(name for name in sorted(sizes) if name != row["category"])

    top = client.search(image, top_k=5)
    assert top[0].product_id == row["product_id"]
    same = client.search(image, top_k=8, category=row["category"])
    assert len(same) == 8 and {category_of[m.product_id] for m in same} == {row["category"]}
    assert same[0].product_id == row["product_id"]
    elsewhere = client.search(image, top_k=8, category=other)  # far from the photo, still full
    assert len(elsewhere) == 8 and {category_of[m.product_id] for m in elsewhere} == {other}
    # a whole category asked for: every product of it, once each
    everything = client.search(image, top_k=c.MAX_TOP_K, category=other)
    assert sorted(m.product_id for m in everything) == sorted(p for p, cat in category_of.items() if cat == other)

    excluded = [m.product_id for m in top[:3]]
    rest = client.search(image, top_k=5, exclude_ids=excluded + ["not-in-the-catalog"])
    assert len(rest) == 5 and not set(excluded) & {m.product_id for m in rest}
    assert [m.product_id for m in rest[:2]] == [m.product_id for m in top[3:5]]  # the order of the others stays
    both = client.search(image, top_k=5, category=row["category"], exclude_ids=[row["product_id"]])
    assert row["product_id"] not in {m.product_id for m in both} and len(both) == 5

    assert client.search(image, top_k=5, category="no-such-category") == []  # unknown: empty, not an error
    assert client.search(image, top_k=5, category="") == top  # "" is no filter


def test_filters_are_per_row_of_a_request_and_ignore_padding(server, catalog):
    """A request's CATEGORY / EXCLUDE_IDS have one row per image; "" pads an EXCLUDE_IDS row."""
    import numpy as np

    rows = catalog_rows(catalog)
    a, b = rows[0], rows[-1]
    client = grpcclient.InferenceServerClient(server.options.grpc_url)
    images = np.array([[(catalog / a["image"]).read_bytes()], [(catalog / b["image"]).read_bytes()]], dtype=np.object_)
    inputs = [grpcclient.InferInput(c.IMAGE, [2, 1], "BYTES"), grpcclient.InferInput(c.CATEGORY, [2, 1], "BYTES"),
              grpcclient.InferInput(c.EXCLUDE_IDS, [2, 2], "BYTES")]
    inputs[0].set_data_from_numpy(images)
    inputs[1].set_data_from_numpy(np.array([[a["category"].encode()], [b"no-such-category"]], dtype=np.object_))
    inputs[2].set_data_from_numpy(np.array([[a["product_id"].encode(), b""], [b"", b""]], dtype=np.object_))
    result = client.infer(c.VISUAL_SEARCH_MODEL, inputs)
    ids = [[x.decode() for x in row if x] for row in result.as_numpy(c.PRODUCT_IDS)]
    assert len(ids[0]) == c.DEFAULT_TOP_K and a["product_id"] not in ids[0]
    assert ids[1] == []


def test_similar_products_uses_the_stored_embeddings_and_never_returns_the_product(client, server, catalog):
    index = served(server)
    category_of = {p.product_id: p.category for p in index.products}
    rows = catalog_rows(catalog)
    for row in rows[:: max(1, len(rows) // 6)]:
        matches = client.similar(row["product_id"], top_k=6)
        assert len(matches) == 6 and row["product_id"] not in {m.product_id for m in matches}
        want_ids, want_scores = index.similar([row["product_id"]], 6)  # the same work in-process
        assert [m.product_id for m in matches] == want_ids[0]
        assert [m.score for m in matches] == pytest.approx(want_scores[0].tolist(), abs=1e-5)
    pid, category = rows[0]["product_id"], rows[0]["category"]
    same = client.similar(pid, top_k=4, category=category, exclude_ids=[client.similar(pid, top_k=1)[0].product_id])
    assert len(same) == 4 and {category_of[m.product_id] for m in same} == {category}
    assert client.similar(pid, top_k=4, category="no-such-category") == []
    batch = client.similar_batch([rows[1]["product_id"], rows[2]["product_id"]], top_k=3)
    assert [len(r) for r in batch] == [3, 3] and batch[0] == client.similar(rows[1]["product_id"], top_k=3)


def test_an_unknown_product_id_is_invalid_argument_naming_it(client, server):
    with pytest.raises(NotFoundError) as info:
        client.similar("no-such-product-42")
    assert info.value.status in ("StatusCode.INVALID_ARGUMENT", "400")
    assert "unknown product id 'no-such-product-42'" in info.value.detail
    assert isinstance(info.value, InvalidRequestError)
    assert server.ready()


@pytest.mark.parametrize("length", [20_000, 1 << 20])
def test_a_long_unknown_id_is_not_found_with_a_short_message(client, server, length):
    """Past gRPC's metadata limit (~16 KB) a message that echoed the id became RESOURCE_EXHAUSTED, which
    the SDK retried as "unavailable": the message quotes 200 characters and says the length."""
    product_id = "x" * length
    started = time.monotonic()
    with pytest.raises(NotFoundError) as info:
        client.similar(product_id)
    assert info.value.status in ("StatusCode.INVALID_ARGUMENT", "400")
    assert info.value.detail.startswith(f"{c.UNKNOWN_PRODUCT} 'xxxx") and f"({length:,} characters)" in info.value.detail
    assert len(str(info.value)) < 600
    assert time.monotonic() - started < 30  # one answer, not retries
    assert server.ready()


def infer_outputs(server, protocol: str, model: str, outputs: list[str] | None) -> list[str]:
    """The output names the server sends for one request naming `outputs` (None: naming none)."""
    import numpy as np

    if protocol == "grpc":
        module, url = grpcclient, server.options.grpc_url
    else:
        import tritonclient.http as module  # type: ignore[no-redef]

        url = server.options.http_url
    with LookalikeClient(url, protocol=protocol) as sdk:
        dim = sdk.info().dim
    if model == c.SEARCH_MODEL:
        tensor = np.zeros((1, dim), np.float32)
        tensor[0, 0] = 1.0
        inp = module.InferInput(c.EMBEDDING, [1, dim], "FP32")
    else:
        served = ProductIndex.load(Repository(server.options.model_repository).latest_index_dir())
        tensor = np.array([[served.products[0].product_id.encode()]], dtype=np.object_)
        inp = module.InferInput(c.PRODUCT_ID, [1, 1], "BYTES")
    inp.set_data_from_numpy(tensor)
    requested = None if outputs is None else [module.InferRequestedOutput(name) for name in outputs]
    client = module.InferenceServerClient(url)
    try:
        result = client.infer(model, [inp], outputs=requested)
        answer = result.get_response()
        names = [o.name for o in answer.outputs] if protocol == "grpc" else [o["name"] for o in answer["outputs"]]
    finally:
        client.close()
    return sorted(names)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_index_info_goes_to_whoever_names_it_or_names_no_output(server, protocol):
    """What the README says: Triton sends the outputs a request names, and every output of the model to a
    request that names none (INDEX_INFO included); the ensembles never pass INDEX_INFO on."""
    everything = sorted([c.PRODUCT_IDS, c.SCORES, c.INDEX_INFO])
    assert infer_outputs(server, protocol, c.SEARCH_MODEL, None) == everything
    assert infer_outputs(server, protocol, c.SEARCH_MODEL, [c.PRODUCT_IDS, c.SCORES]) == sorted([c.PRODUCT_IDS, c.SCORES])
    assert infer_outputs(server, protocol, c.SEARCH_MODEL, [c.INDEX_INFO]) == [c.INDEX_INFO]
    assert infer_outputs(server, protocol, c.SIMILAR_PRODUCTS_MODEL, None) == sorted([c.PRODUCT_IDS, c.SCORES])


def test_lookalike_similar_prints_results_and_names_an_unknown_id(server, catalog):
    """The CLI: results per id; an unknown id is reported by the server's reason (no ensemble prefix) and
    the exit status is 1, the other ids still answered."""
    known = catalog_rows(catalog)[0]["product_id"]
    lookalike = Path(sys.executable).with_name("lookalike")
    run = subprocess.run([str(lookalike), "similar", known, "no-such-product-7", "--top-k", "3", "--url",
                          server.options.grpc_url, "--model-repository", str(server.options.model_repository)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr
    assert run.stdout.count("\n    1  ") == 1 and "    3  " in run.stdout
    assert "error: NotFoundError: unknown product id 'no-such-product-7'" in run.stdout
    assert "in ensemble" not in run.stdout


def embedded_images(server) -> int:
    stats = grpcclient.InferenceServerClient(server.options.grpc_url).get_inference_statistics("embed_image")
    return sum(m.inference_count for m in stats.model_stats)


def test_incremental_update_and_rollback_hot_swap_under_steady_traffic(server, catalog, tmp_path):
    """A changed catalog re-embeds only its new and changed images, drops removed products, keeps a
    category change without embedding, and hot-swaps in while gRPC and HTTP clients search and ask
    for similar products without one failed request; --rollback then serves the previous version."""
    repo = Repository(server.options.model_repository)
    full = served(server)
    rows = catalog_rows(catalog)
    queries = [q["query"] for q in csv.DictReader(open(catalog / "queries.csv"))]
    removed, recategorized, changed, kept = rows[1:4], rows[4:6], rows[6], rows[7:]
    new = [{"product_id": f"NEW-{i}", "image": queries[i], "category": "new"} for i in range(2)]
    edited = tmp_path / "changed.png"
    shutil.copy(catalog / queries[2], edited)
    lines = ["product_id,image,category", f"{rows[0]['product_id']},{catalog / rows[0]['image']},{rows[0]['category']}"]
    lines += [f"{r['product_id']},{catalog / r['image']},renamed" for r in recategorized]
    lines += [f"{changed['product_id']},{edited},{changed['category']}"]
    lines += [f"{r['product_id']},{catalog / r['image']},{r['category']}" for r in kept + new]
    (tmp_path / "catalog.csv").write_text("\n".join(lines) + "\n")

    probe = (catalog / rows[0]["image"]).read_bytes()
    stop = threading.Event()
    counts = Counter()
    failures: list[str] = []

    def traffic(protocol: str) -> None:
        url = server.options.grpc_url if protocol == "grpc" else server.options.http_url
        with LookalikeClient(url, protocol=protocol, timeout_s=60) as client:
            while not stop.is_set():
                try:
                    assert client.search(probe, top_k=3)[0].product_id == rows[0]["product_id"]
                    assert len(client.similar(rows[0]["product_id"], top_k=3)) == 3
                    counts[protocol] += 1
                except Exception as exc:  # noqa: BLE001
                    failures.append(f"{protocol}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=traffic, args=(p,)) for p in ("grpc", "grpc", "http", "http")]
    for t in threads:
        t.start()
    try:
        with LookalikeClient(server.options.grpc_url) as client:
            before = embedded_images(server)
            report = index_catalog(tmp_path / "catalog.csv", repo, client, progress=False)
            views = 1 + len(repo.preprocessing().catalog_views)
            assert embedded_images(server) - before == 3 * views  # two new images and one changed, nothing else
            assert (report.added, report.changed, report.removed, report.recategorized) == (2, 1, 3, 2)
            known = {p.product_id for p in full.products}  # the sample catalog's unusable files fail again
            failing = sum(1 for line in lines[1:] if line.split(",")[0] not in known and not line.startswith("NEW-"))
            assert (report.embedded, report.failed, report.reused) == (3, failing, len(lines) - 1 - 3 - failing)
            assert client.served_index_versions() == [report.version]
            for r in removed:
                with pytest.raises(NotFoundError):
                    client.similar(r["product_id"])
            renamed = client.search((catalog / recategorized[0]["image"]).read_bytes(), top_k=2, category="renamed")
            assert {m.product_id for m in renamed} == {r["product_id"] for r in recategorized}
            assert client.search(edited.read_bytes(), top_k=1)[0].product_id == changed["product_id"]

            old, now = rollback_index(repo, client)
            assert (old, now) == (report.version, report.version - 1)
            assert client.served_index_versions() == [now]
            assert len(client.similar(removed[0]["product_id"], top_k=2)) == 2  # known again
    finally:
        stop.set()
        for t in threads:
            t.join()
        with LookalikeClient(server.options.grpc_url) as client:
            publish_index(repo, full, client)  # the session's catalog again, for the other tests
    print(f"\n{dict(counts)} search+similar rounds during an incremental update and a rollback, {len(failures)} failed")
    assert not failures, failures[:5]
    assert counts["grpc"] > 5 and counts["http"] > 5
