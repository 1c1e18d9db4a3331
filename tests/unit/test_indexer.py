"""lookalike.indexing.indexer without a server: a file over the server's limit is refused from its size, unread."""

import tracemalloc

from lookalike.indexing.catalog import CatalogItem
from lookalike.indexing.indexer import embed_items
from tests.conftest import finishes


class NoServer:
    def embed(self, images):
        raise AssertionError("nothing should be sent: every file is over the limit")


def test_an_oversized_file_is_reported_without_being_read(tmp_path):
    huge = tmp_path / "huge.jpg"
    with open(huge, "wb") as handle:  # sparse: 300 MB on paper, nothing on disk
        handle.truncate(300 * 1024 * 1024)
    items = [CatalogItem("p1", huge, "", "catalog.csv:2")]
    tracemalloc.start()
    good, vectors, problems = embed_items(NoServer(), items, progress=False, max_bytes=20 * 1024 * 1024)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert good == [] and len(vectors) == 0
    (problem,) = problems
    assert problem.where == "catalog.csv:2"
    assert problem.reason == "huge.jpg: image too large: 314,572,800 bytes, the limit is 20,971,520 bytes"
    assert peak < 10 * 1024 * 1024  # the file was never read into memory


def test_several_images_of_a_product_make_one_product_scored_by_its_best_image(tmp_path):
    from pathlib import Path

    import numpy as np

    from lookalike.indexing.indexer import build_index
    from lookalike.serving.artifacts import EmbedderManifest

    rng = np.random.default_rng(0)
    blocks = [rng.standard_normal((n, 16)).astype(np.float32) for n in (3, 3, 2)]
    blocks = [b / np.linalg.norm(b, axis=1, keepdims=True) for b in blocks]
    items = [CatalogItem("A", Path("a1.png"), "shoes", "c.csv:2"), CatalogItem("B", Path("b.png"), "bags", "c.csv:3"),
             CatalogItem("A", Path("a2.png"), "shoes", "c.csv:4")]
    manifest = EmbedderManifest(model="test", dim=16, input=(3, 8, 8), fingerprint="fp")
    index = build_index(items, blocks, manifest)
    assert [(p.product_id, p.image) for p in index.products] == [("A", "a1.png"), ("B", "b.png")]
    assert index.vectors.tolist() == [5, 3] and index.meta.count == 2 and index.meta.vectors == 8
    ids, scores = index.search(blocks[2][:1], 10)  # a view of A's second image
    assert ids[0] == ["A", "B"] and scores[0][0] > 0.999  # A once, by its best vector


def test_a_fifo_or_device_in_the_catalog_is_a_problem_not_a_hang(tmp_path):
    import hashlib
    import os

    import pytest

    from lookalike.indexing.indexer import content_hash
    from lookalike_client import FileRefusedError

    os.mkfifo(tmp_path / "pipe.jpg")
    os.symlink("/dev/zero", tmp_path / "zero.jpg")
    items = [CatalogItem("p1", tmp_path / "pipe.jpg", "", "c.csv:2"), CatalogItem("p2", tmp_path / "zero.jpg", "", "c.csv:3")]
    good, _, problems = finishes(lambda: embed_items(NoServer(), items, progress=False, max_bytes=20 * 1024 * 1024))
    assert good == [] and [str(p) for p in problems] == [
        "c.csv:2: pipe.jpg: not a regular file (a FIFO)", "c.csv:3: zero.jpg: not a regular file (a character device)"]
    for item in items:  # refused before a byte is read (a FIFO's open does not wait for a writer)
        with pytest.raises(FileRefusedError, match="not a regular file"):
            finishes(lambda item=item: content_hash(item.image))
    (tmp_path / "a.jpg").write_bytes(b"abc" * 1000)
    assert content_hash(tmp_path / "a.jpg") == hashlib.sha256(b"abc" * 1000).hexdigest()
