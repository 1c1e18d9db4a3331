"""lookalike.indexer without a server: a file over the server's limit is refused from its size, unread."""

import tracemalloc

from lookalike.catalog import CatalogItem
from lookalike.indexer import embed_items


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
