"""What `lookalike export` wrote into the model repository (make export): the embedder directory serves
every variant with the ONNX file's own tensors, and indexing embeds catalog views with it in process."""

import dataclasses

import numpy as np
import onnx
import pytest

from lookalike.indexing.catalog import CatalogItem
from lookalike.indexing.indexer import embed_items
from lookalike.indexing.model_configs import read
from lookalike.indexing.repository import Repository
from lookalike.serving.embedding import OnnxEmbedder
from lookalike.serving.preprocessing import ImageError, Preprocessor
from lookalike_client import InvalidRequestError
from lookalike_client import contract as c
from tests.conftest import REPOSITORY, encode


@pytest.fixture(scope="module")
def repo() -> Repository:
    repository = Repository(REPOSITORY)
    if not repository.manifest_file.exists():
        pytest.fail("no exported embedder: run `make export` (make test does) before these tests")
    return repository


def test_exported_embedder_directory_serves_both_variants(repo):
    """The directory `lookalike export` wrote: config.pbtxt (Python+ORT) and configs/onnxruntime.pbtxt
    (selected with --model-config-name=onnxruntime) both name the ONNX file's own tensors and dims."""
    model = onnx.load(str(repo.onnx_file), load_external_data=False)
    graph_in = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    graph_out = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    manifest = repo.manifest()
    assert graph_in == {c.PIXELS: ["batch", *manifest.input]}
    assert graph_out == {c.EMBEDDING: ["batch", manifest.dim]}
    for path in (repo.embedder_dir / "config.pbtxt", repo.embedder_dir / "configs" / "onnxruntime.pbtxt"):
        config = read(path)
        assert tuple(config.input[0].dims) == manifest.input and config.input[0].name == c.PIXELS
        assert list(config.output[0].dims) == [manifest.dim] and config.output[0].name == c.EMBEDDING
    assert (repo.onnx_file.parent / "model.py").exists() and repo.onnx_file.exists()
    assert repo.preprocessing().height == manifest.input[1]


class InProcess:
    """embed_image's pipeline (catalog-side preprocessing + the exported embedder) without a server;
    a bad image fails its whole request, as the server does."""

    def __init__(self, repo: Repository):
        self.config = repo.preprocessing().for_side("catalog")
        self.pre = Preprocessor(self.config)
        self.embedder = OnnxEmbedder(repo.onnx_file)
        self.requests = []

    def embed(self, images):
        self.requests.append(len(images))
        try:
            return self.embedder(self.pre.batch(list(images)))
        except ImageError as exc:
            raise InvalidRequestError(f"in ensemble 'embed_image', {exc}") from None


def test_each_product_gets_its_packshot_then_its_views_and_a_bad_file_costs_only_itself(tmp_path, photos, repo):
    client = InProcess(repo)
    config = dataclasses.replace(repo.preprocessing(),
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


def test_served_session_settings_change_speed_only(repo, photos):
    """The served embedder's ONNX Runtime settings (one thread, no spin-wait: model_configs) give the
    embeddings of ORT's defaults, and the generated config carries them to model.py."""
    from lookalike.indexing import model_configs

    params = model_configs.parameters(model_configs.read(repo.embedder_dir / "config.pbtxt"))
    assert params["intra_op_threads"] == str(model_configs.EMBEDDER_INTRA_OP_THREADS)
    assert params["spin_wait"] == "false"
    pixels = Preprocessor(repo.preprocessing().for_side("query")).batch([encode(p) for _, p in photos[:4]])
    served = OnnxEmbedder(repo.onnx_file, intra_op_threads=1, spin=False)(pixels)
    default = OnnxEmbedder(repo.onnx_file)(pixels)
    np.testing.assert_allclose(served, default, atol=1e-5)
