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


class InProcess:
    """embed_image's pipeline (catalog-side preprocessing + the exported embedder) without a server;
    a bad image fails its whole request, as the server does."""

    def __init__(self):
        from lookalike.embedding import OnnxEmbedder
        from lookalike.preprocessing import Preprocessor
        from lookalike.repository import Repository
        from tests.conftest import REPOSITORY

        repo = Repository(REPOSITORY)
        self.config = repo.preprocessing().for_side("catalog")
        self.pre = Preprocessor(self.config)
        self.embedder = OnnxEmbedder(repo.embedder_dir / "1" / "model.onnx")
        self.requests = []

    def embed(self, images):
        from lookalike.preprocessing import ImageError
        from lookalike_client import InvalidRequestError

        self.requests.append(len(images))
        try:
            return self.embedder(self.pre.batch(list(images)))
        except ImageError as exc:
            raise InvalidRequestError(f"in ensemble 'embed_image', {exc}") from None


def test_each_product_gets_its_packshot_then_its_views_and_a_bad_file_costs_only_itself(tmp_path, photos):
    import numpy as np
    import pytest

    from tests.conftest import encode

    from lookalike.preprocessing import Preprocessor
    from tests.conftest import REPOSITORY

    if not (REPOSITORY / "embedder" / "manifest.json").exists():
        pytest.skip("no exported embedder: run `make export` (make test does)")
    import dataclasses

    from lookalike.repository import Repository

    client = InProcess()
    config = dataclasses.replace(Repository(REPOSITORY).preprocessing(),
                                 catalog_views=[{"scale": 0.6, "background": [128, 128, 128]}, {"as_query": True}])
    items = []
    for i, (_, photo) in enumerate(photos[:5]):
        path = tmp_path / f"p{i}.png"
        path.write_bytes(encode(photo.resize((160, 120))))
        items.append(CatalogItem(f"p{i}", path, "", f"catalog.csv:{i + 2}"))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    items.insert(2, CatalogItem("bad", tmp_path / "bad.png", "", "catalog.csv:9"))
    good, vectors, problems = embed_items(client, items, batch_size=4, concurrency=1, progress=False,
                                          config=config)
    assert [item.product_id for item in good] == ["p0", "p1", "p2", "p3", "p4"]
    assert all(block.shape == (3, client.embedder.dim) for block in vectors)
    assert max(client.requests) <= 4  # requests never exceed the batch size, views included
    (problem,) = problems
    assert problem.where == "catalog.csv:9" and "bad.png" in problem.reason
    first = client.embedder(client.pre.batch([items[0].image.read_bytes()]))[0]
    np.testing.assert_allclose(vectors[0][0], first, atol=1e-5)  # the packshot itself comes first
    assert float(vectors[0][0] @ vectors[0][1]) < 0.99  # a view is another picture of it
    query = client.embedder(Preprocessor(config.for_side("query")).batch([items[0].image.read_bytes()]))[0]
    assert float(vectors[0][2] @ query) > 0.9999  # the as_query view is what a query of it gets
