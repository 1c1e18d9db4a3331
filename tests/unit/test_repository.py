"""The model repository: configs parse as Triton ModelConfig protos, tensor names follow the contract,
and the embedder's serving variants (Python+ORT here, `onnxruntime` backend in NGC) agree with the ONNX
file they serve."""

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from lookalike.indexing import model_configs
from lookalike.indexing.model_configs import embedder_config, parse, render_embedder_config
from lookalike.indexing.publishing import prune_index_versions, write_index_version
from lookalike.indexing.repository import Repository
from lookalike_client import contract as c
from tests.conftest import REPOSITORY

TYPE = model_config_pb2.DataType


def load(model: str):
    return model_configs.read(REPOSITORY / model / "config.pbtxt")


def tensors(entries):
    return {t.name: (TYPE.Name(t.data_type), list(t.dims), getattr(t, "optional", False)) for t in entries}


def test_contract_tensors():
    for model in (c.PREPROCESS_MODEL, c.PREPROCESS_QUERY_MODEL):
        assert tensors(load(model).input) == {c.IMAGE: ("TYPE_STRING", [1], False)}
    assert tensors(load(c.PREPROCESS_MODEL).output) == {c.PIXELS: ("TYPE_FP32", [3, -1, -1], False)}
    # the query views of a photo, embedded: [V x D], which product_search's EMBEDDING [-1] takes as it is
    assert tensors(load(c.PREPROCESS_QUERY_MODEL).output) == {c.EMBEDDING: ("TYPE_FP32", [-1], False)}
    filters = {c.TOP_K: ("TYPE_INT32", [1], True), c.CATEGORY: ("TYPE_STRING", [1], True),
               c.EXCLUDE_IDS: ("TYPE_STRING", [-1], True)}
    results = {c.PRODUCT_IDS: ("TYPE_STRING", [-1], False), c.SCORES: ("TYPE_FP32", [-1], False)}
    search = load("product_search")
    assert tensors(search.input) == {c.EMBEDDING: ("TYPE_FP32", [-1], True), c.PRODUCT_ID: ("TYPE_STRING", [1], True),
                                     **filters}
    assert tensors(search.output) == {**results, c.INDEX_INFO: ("TYPE_STRING", [1], False)}
    visual = load("visual_search")
    assert visual.platform == "ensemble"
    assert tensors(visual.input) == {c.IMAGE: ("TYPE_STRING", [1], False), **filters}
    assert tensors(visual.output) == results
    assert [s.model_name for s in visual.ensemble_scheduling.step] == [c.PREPROCESS_QUERY_MODEL, c.SEARCH_MODEL]
    assert set(visual.ensemble_scheduling.step[1].input_map) == {c.EMBEDDING, *filters}
    similar = load(c.SIMILAR_PRODUCTS_MODEL)
    assert similar.platform == "ensemble"
    assert tensors(similar.input) == {c.PRODUCT_ID: ("TYPE_STRING", [1], False), **filters}
    assert tensors(similar.output) == results
    assert [(s.model_name, set(s.input_map)) for s in similar.ensemble_scheduling.step] == [
        (c.SEARCH_MODEL, {c.PRODUCT_ID, *filters})]
    embed = load("embed_image")
    assert [s.model_name for s in embed.ensemble_scheduling.step] == [c.PREPROCESS_MODEL, c.EMBEDDER_MODEL]
    for model in ("preprocess", "preprocess_query", "product_search", "visual_search", "embed_image", "similar_products"):
        assert load(model).max_batch_size == c.MAX_BATCH_SIZE  # composing models >= ensembles


def test_query_and_catalog_preprocess_share_the_preprocessing_file_and_limits():
    """preprocess_query reads the same preprocessing file with the same limits as preprocess; its views
    are on by default, and each BLS call fits the embedder's batch."""
    params = {m: model_configs.parameters(load(m)) for m in (c.PREPROCESS_MODEL, c.PREPROCESS_QUERY_MODEL)}
    assert params[c.PREPROCESS_MODEL].pop("side") == "catalog"
    query = params[c.PREPROCESS_QUERY_MODEL]
    assert query.pop("query_views") == "on"
    assert int(query.pop("embedder_max_batch_size")) == c.MAX_BATCH_SIZE
    assert params[c.PREPROCESS_MODEL] == query


@pytest.mark.parametrize("variant", ["python", "onnxruntime", "tensorrt"])
def test_embedder_variants_parse_and_share_tensors(variant):
    config = parse(render_embedder_config(variant, height=224, width=224, dim=1280, max_batch_size=64))
    assert config.name == c.EMBEDDER_MODEL and config.max_batch_size == 64
    if variant == "tensorrt":
        assert config.platform == "tensorrt_plan" and config.default_model_filename == "model.plan"
        assert model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == "KIND_GPU"
        # the engine's optimisation profile goes up to max_batch_size (Triton may batch that far)
        assert list(config.dynamic_batching.preferred_batch_size)[-1] <= config.max_batch_size
    else:
        assert config.backend == variant
    assert tensors(config.input) == {c.PIXELS: ("TYPE_FP32", [3, 224, 224], False)}
    assert tensors(config.output) == {c.EMBEDDING: ("TYPE_FP32", [1280], False)}
    if variant == "onnxruntime":
        assert config.default_model_filename == "model.onnx"
        assert not config.parameters  # nothing the onnxruntime backend would not understand
    assert config == embedder_config(variant, height=224, width=224, dim=1280, max_batch_size=64)  # text round trip


def test_generated_configs_fail_at_generation_not_at_load():
    """Configs are ModelConfig messages: a field Triton's schema does not have fails when it is built."""
    with pytest.raises((AttributeError, ValueError)):
        model_configs.new_config(name="embedder", max_batch_szie=8)
    config = embedder_config("python", height=224, width=224, dim=1280, max_batch_size=64)
    with pytest.raises(TypeError):
        config.max_batch_size = "64"
    with pytest.raises(ValueError):
        embedder_config("openvino", height=224, width=224, dim=1280, max_batch_size=64)
    with pytest.raises(text_format.ParseError):
        parse('name: "x" max_batch_sise: 8')


def test_serving_path_does_not_import_torch():
    code = (
        "import sys; import lookalike.serving.preprocessing, lookalike.serving.search, lookalike.serving.embedding, "
        "lookalike.server.launcher, lookalike.server.serve, lookalike.serving.adapter, lookalike.serving.product_search, "
        "lookalike.indexing.model_configs, lookalike.serving.artifacts, "
        "lookalike.indexing.indexer, lookalike.cli, lookalike_client; "
        "bad = [m for m in ('torch', 'torchvision', 'lookalike_export') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_write_index_version_is_atomic_and_prunes(tmp_path):
    search_dir = tmp_path / "product_search"
    search_dir.mkdir()
    (search_dir / "model.py").write_text("# adapter")
    repo = Repository(tmp_path)

    def failing(path: Path):
        (path / "partial").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_index_version(repo, failing)
    assert repo.index_versions() == [] and list(search_dir.iterdir()) == [search_dir / "model.py"]
    for _ in range(3):
        write_index_version(repo, lambda path: (path / "index.json").write_text("{}"))
    assert repo.index_versions() == [1, 2, 3]
    assert (search_dir / "3" / "model.py").read_text() == "# adapter"
    assert prune_index_versions(repo, keep=2) == [1]
    assert repo.index_versions() == [2, 3]
