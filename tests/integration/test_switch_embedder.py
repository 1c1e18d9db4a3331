"""ResNet-50 and ViT-B/16 (random weights: this checks the export and serving machinery, not retrieval
quality) served through visual_search end to end, and the fingerprint rule when the embedder changes:
an index built by another embedder is never searched with the new one."""

import csv

import numpy as np
import pytest

from lookalike.indexing.indexer import index_catalog
from lookalike.indexing.publishing import write_index_version
from lookalike.indexing.repository import copy_repository
from lookalike.quality.sample_data import real_photos
from lookalike.server.launcher import ServerOptions, free_port
from lookalike.server.serve import lookalike_server
from lookalike.serving.images import encode
from lookalike.serving.index_files import Product
from lookalike.serving.search import ProductIndex
from lookalike_client import LookalikeClient
from lookalike_export.backbones import get_backbone
from lookalike_export.onnx_export import export_embedder
from tests.conftest import REPOSITORY

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("model", ["resnet50", "vit_b_16"])
def test_new_embedder_serves_end_to_end_and_never_searches_an_old_index(tmp_path, model):
    repo = copy_repository(REPOSITORY, tmp_path / "model_repository")
    old = repo.manifest()
    # An index built with the current (Lite0) embedder.
    stale = ProductIndex.build([Product("OLD-1"), Product("OLD-2")], np.eye(2, old.dim, dtype=np.float32),
                               embedder_fingerprint=old.fingerprint)
    write_index_version(repo, stale.save)

    photos = [(name, encode(image, "JPEG", quality=90)) for name, image in list(real_photos())[:12]]
    manifest = export_embedder(get_backbone(model), repo.root, [data for _, data in photos[:4]], weights=None)
    assert manifest.fingerprint != old.fingerprint and manifest.random_weights

    catalog = tmp_path / "catalog"
    catalog.mkdir()
    with open(catalog / "catalog.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        for name, data in photos:
            (catalog / f"{name}.jpg").write_bytes(data)
            writer.writerow((name, f"{name}.jpg", "photos"))

    options = ServerOptions(model_repository=repo.root, http_port=free_port(), grpc_port=free_port(),
                            metrics_port=free_port())
    log = tmp_path / "tritonserver.log"
    with lookalike_server(options, log_file=log):
        with LookalikeClient(options.grpc_url, timeout_s=120) as client:
            # The Lite0 index was not served with the new embedder: an empty one was published instead.
            assert client.search(photos[0][1], top_k=5) == []
            assert client.embed([photos[0][1]]).shape == (1, manifest.dim)
            report = index_catalog(catalog / "catalog.csv", repo, client, progress=False)
            assert report.products == len(photos) and not report.problems
            for name, data in photos[:4]:
                best = client.search(data, top_k=3)[0]
                assert best.product_id == name and best.score > 0.99
    assert "RANDOM weights" in log.read_text()
