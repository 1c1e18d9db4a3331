"""`lookalike eval` against the real server, and the query/catalog sides of preprocessing as served."""

import json
import os

import numpy as np

from lookalike.cli import main
from lookalike.embedding import OnnxEmbedder
from lookalike.preprocessing import Preprocessor
from lookalike.repository import Repository
from lookalike.search import ProductIndex
from lookalike_client import LookalikeClient
from tests.conftest import encode


def test_visual_search_uses_query_side_and_embed_image_catalog_side(server, photos):
    """A tall phone-shaped photo: visual_search's scores are those of the query-side pixels, and
    embed_image's embedding is the catalog side's (they differ when the settings differ)."""
    repo = Repository(server.options.model_repository)
    config = repo.preprocessing()
    embedder = OnnxEmbedder(repo.embedder_dir / "1" / "model.onnx")
    _, photo = photos[0]
    tall = encode(photo.resize((300, 650)), "JPEG", quality=90)
    query = embedder(Preprocessor(config.for_side("query")).batch([tall]))
    catalog = embedder(Preprocessor(config.for_side("catalog")).batch([tall]))
    index = ProductIndex.load(repo.latest_index_dir())
    ids, scores = index.search(query, 5)
    with LookalikeClient(server.options.grpc_url) as client:
        served = client.search(tall, top_k=5)
        embedded = client.embed([tall])
    assert [m.product_id for m in served][:3] == ids[0][:3]
    np.testing.assert_allclose([m.score for m in served], scores[0], atol=1e-4)
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
    code = main(["eval", str(catalog / "catalog.csv"), "--queries", str(queries / "q.csv"), "--simulate", "1",
                 "--sample", "6", "--leave-out", "1", "--concurrency", "2", "--url", server.options.grpc_url,
                 "--model-repository", str(server.options.model_repository), "--out", str(out)])
    assert code == 0
    report = json.loads((out / "eval.json").read_text())
    served = report["served"]
    left_out = report["products"]["left_out"]
    assert left_out and report["products"]["indexed"] == report["products"]["embedded"] - len(left_out)
    # 6 real photos (5 of them unusable) + 6 simulated ones: every one counted
    assert served["overall"]["queries"] == 12
    assert served["by_source"]["photo"]["queries"] == 6
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
    assert report["timing"]["latency_ms_concurrency_1"]["samples"] == 8 + len(left_out)  # + category queries
    assert report["backgrounds"]["used"]
    markdown = (out / "eval.md").read_text()
    assert "| served `visual_search` | 12 |" in markdown and "**By frame**" in markdown
    assert "missing.jpg" in markdown
    assert (out / "failures.html").read_text().count("<section>") >= 2
    # afterwards the server serves the whole catalog again
    with LookalikeClient(server.options.grpc_url) as client:
        assert client.served_index_versions() == [report["index_versions"]["restored_full_catalog"]]
    index = ProductIndex.load(Repository(server.options.model_repository).latest_index_dir())
    assert len(index) == before
    assert "recall@1" in capsys.readouterr().out
