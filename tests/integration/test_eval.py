"""`lookalike eval` against the real server, and the query/catalog sides of preprocessing as served."""

import json
import os
import threading
from pathlib import Path

import numpy as np

from lookalike.cli import main
from lookalike.indexing.repository import Repository
from lookalike.quality.evaluation import query_views
from lookalike.serving.embedding import OnnxEmbedder
from lookalike.serving.preprocessing import Preprocessor
from lookalike.serving.product_search import SearchRequest, search_requests
from lookalike.serving.query_views import ViewPreprocessor
from lookalike.serving.search import ProductIndex
from lookalike_client import LookalikeClient
from lookalike_client import contract as c
from tests.conftest import encode


def _files(directory: Path) -> list[tuple[str, int, int]]:
    """Every file of the index versions, with its size and modification time (the supervisor's own
    `.serving` record aside)."""
    return sorted((str(p.relative_to(directory)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in directory.rglob("*") if p.is_file() and ".serving" not in p.parts)


def test_visual_search_scores_the_query_views_fused_and_embed_image_the_catalog_side(server, photos):
    """A tall phone-shaped photo: visual_search's results are the query views of the preprocessing file,
    each embedded, searched and fused as the server's code does in process (lookalike.serving.query_views,
    lookalike.serving.fusion); embed_image's embedding is the catalog side's (they differ when the settings do)."""
    repo = Repository(server.options.model_repository)
    config = repo.preprocessing()
    embedder = OnnxEmbedder(repo.embedder_dir / "1" / "model.onnx")
    _, photo = photos[0]
    tall = encode(photo.resize((300, 650)), "JPEG", quality=90)
    views = ViewPreprocessor(config)
    query = embedder(views.batch([tall])[0])
    catalog = embedder(Preprocessor(config.for_side("catalog")).batch([tall]))
    index = ProductIndex.load(repo.latest_index_dir())
    expected = search_requests(index, [SearchRequest(query, 5, views=len(views))], config.query_fusion)[0]
    assert not isinstance(expected, Exception)
    with LookalikeClient(server.options.grpc_url) as client:
        served = client.search(tall, top_k=5)
        embedded = client.embed([tall])
        served_views = query_views(client, tall, index.dim)
    assert len(served_views) == len(views) == max(1, len(config.query_views))
    np.testing.assert_allclose(served_views, query, atol=1e-4)
    assert [m.product_id for m in served][:3] == [pid.decode() for pid in expected.product_ids[0][:3]]
    np.testing.assert_allclose([m.score for m in served], expected.scores[0], atol=1e-4)
    np.testing.assert_allclose(embedded, catalog, atol=1e-4)
    if config.query:
        assert float(query[0] @ catalog[0]) < 0.999  # the sides really differ on a tall frame


def test_eval_runs_over_the_server_and_counts_what_fails(server, catalog, tmp_path, photos, capsys):
    queries = tmp_path / "shoppers"
    queries.mkdir()
    with open(catalog / "catalog.csv") as handle:
        first = handle.readlines()[1].split(",")
    product_id, image = first[0], first[1]
    (queries / "good.jpg").write_bytes((catalog / image).read_bytes())
    (queries / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (queries / "stranger.jpg").write_bytes((catalog / image).read_bytes())
    os.mkfifo(queries / "pipe.jpg")  # a FIFO once hung eval for ever; /dev/zero was read until MemoryError
    os.symlink("/dev/zero", queries / "zero.jpg")
    (queries / "q.csv").write_text(f"image,product_id\ngood.jpg,{product_id}\nmissing.jpg,{product_id}\n"
                                   f"corrupt.jpg,{product_id}\nstranger.jpg,not-in-the-catalog\n"
                                   f"pipe.jpg,{product_id}\nzero.jpg,{product_id}\n")
    out = tmp_path / "eval"
    before = server.index_report.products
    repository = Repository(server.options.model_repository)
    versions_before = _files(repository.search_dir)
    with LookalikeClient(server.options.grpc_url) as client:
        served_before = client.info()
    every_id = [p.product_id for p in ProductIndex.load(repository.latest_index_dir()).products]  # what is served
    assert len(every_id) == before
    # Another client of the same server, all through the run: it must see the whole catalog each time.
    seen: list[tuple[int, int, int]] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def other_client() -> None:
        try:
            with LookalikeClient(server.options.grpc_url) as client:
                while not stop.is_set():
                    info = client.info()
                    found = 0
                    for start in range(0, len(every_id), c.MAX_BATCH_SIZE):  # NotFoundError for a product not served
                        found += len(client.similar_batch(every_id[start : start + c.MAX_BATCH_SIZE], top_k=1))
                    seen.append((info.index_version, info.products, found))
        except BaseException as exc:  # noqa: BLE001 - reported by the test, not lost in the thread
            failures.append(exc)

    watcher = threading.Thread(target=other_client)
    watcher.start()
    try:
        code = main(["eval", str(catalog / "catalog.csv"), "--queries", str(queries / "q.csv"), "--simulate", "1",
                     "--sample", "6", "--leave-out", "1", "--throughput-clients", "2", "--near-duplicates", "4",
                     "--url", server.options.grpc_url,
                     "--model-repository", str(server.options.model_repository), "--out", str(out)])
    finally:
        stop.set()
        watcher.join()
    assert code == 0
    assert not failures, failures
    assert len(seen) >= 3 and set(seen) == {(served_before.index_version, before, len(every_id))}
    report = json.loads((out / "eval.json").read_text())
    served = report["served"]
    left_out = report["products"]["left_out"]
    assert left_out and report["products"]["indexed"] == report["products"]["embedded"] - len(left_out)
    # 6 real photos (5 of them unusable) + 6 simulated ones: every one counted; near-duplicates apart
    assert served["overall"]["queries"] == 12
    assert served["by_source"]["photo"]["queries"] == 6
    assert served["near_duplicates"]["queries"] == served["by_source"]["near_duplicate"]["queries"] == 4
    assert served["near_duplicates"]["recall@10"] >= 0.5  # a re-shot packshot finds its product
    failed = {f["query"].split("/")[-1].split(" ")[-1]: f["error"] for f in served["failed"]}
    assert set(failed) == {"missing.jpg", "corrupt.jpg", "stranger.jpg", "pipe.jpg", "zero.jpg"}
    assert "not a regular file (a FIFO)" in failed["pipe.jpg"]
    assert "not a regular file (a character device)" in failed["zero.jpg"]
    assert "cannot read" in failed["missing.jpg"]
    assert "InvalidImageError" in failed["corrupt.jpg"] and "invalid image (truncated)" in failed["corrupt.jpg"]
    assert "not among the catalog" in failed["stranger.jpg"]
    assert product_id not in left_out  # a real photo's product is never left out of the index
    assert served["overall"]["recall@10"] is not None and served["overall"]["recall@10"] <= 7 / 10
    assert set(served["breakdown"]) == {"frame", "scale", "occlusion", "rotation"}
    assert served["category_relevance_left_out"]["queries"] == len(left_out)
    assert report["colour_histogram_baseline"]["overall"]["queries"] == 12
    # visual_search, one at a time: every query that has a readable photo, refused ones (corrupt.jpg) aside
    usable = 12 - len(failed) + 4 + len(left_out)
    assert report["timing"]["latency_ms_concurrency_1"]["samples"] == usable
    assert report["query_views"]["views"] == max(1, len(repository.preprocessing().query_views))
    assert report["backgrounds"]["used"]
    markdown = (out / "eval.md").read_text()
    assert "| served `visual_search` | 12 |" in markdown and "**By frame**" in markdown
    assert "missing.jpg" in markdown
    assert (out / "failures.html").read_text().count("<section>") >= 2
    # nothing was published: the server and the repository are as they were
    assert report["served_index"]["before"] == report["served_index"]["after"]
    assert report["served_index"]["before"]["version"] == served_before.index_version
    assert _files(repository.search_dir) == versions_before  # index versions and their stored embeddings
    assert len(ProductIndex.load(repository.latest_index_dir())) == before
    assert "recall@1" in capsys.readouterr().out


def test_query_views_switched_off_by_the_parameter_leave_one_view_and_no_reindex(server, photos):
    """preprocess_query's query_views parameter "off": one embedding a photo (the query side's own
    framing), on the index already served; the server's own config back afterwards."""
    import tritonclient.grpc as grpcclient

    from lookalike.indexing import model_configs

    repo = Repository(server.options.model_repository)
    config = repo.preprocessing()
    views = ViewPreprocessor(config, enabled=False)
    embedder = OnnxEmbedder(repo.embedder_dir / "1" / "model.onnx")
    _, photo = photos[1]
    data = encode(photo, "JPEG", quality=90)
    admin = grpcclient.InferenceServerClient(server.options.grpc_url)
    served = admin.get_model_config(c.PREPROCESS_QUERY_MODEL, as_json=True)["config"]
    assert model_configs.parameters(model_configs.read(repo.root / c.PREPROCESS_QUERY_MODEL / "config.pbtxt"))[
        "query_views"] == "on"
    off = {**served, "parameters": {**served["parameters"], "query_views": {"string_value": "off"}}}
    with LookalikeClient(server.options.grpc_url) as client:
        version = client.info().index_version
        try:
            admin.load_model(c.PREPROCESS_QUERY_MODEL, config=json.dumps(off))
            one = query_views(client, data, repo.manifest().dim)
            assert one.shape[0] == 1
            np.testing.assert_allclose(one, embedder(views.batch([data])[0]), atol=1e-4)
            assert client.search(data, top_k=3) and client.info().index_version == version
        finally:
            admin.load_model(c.PREPROCESS_QUERY_MODEL, config=json.dumps(served))  # the server's own config again
        assert query_views(client, data, one.shape[1]).shape[0] == max(1, len(config.query_views))
