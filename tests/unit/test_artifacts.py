"""lookalike.serving.artifacts: the embedder manifest and index metadata are read only through their schemas, and
a file of the wrong shape is refused naming the field."""

import json

import pytest

from lookalike.serving.artifacts import MANIFEST_FILE, ArtifactError, EmbedderManifest, IndexMeta, fingerprint, onnx_path
from lookalike_client import ServerUnavailableError, wait_for
from lookalike_client.errors import InvalidRequestError, translate

MANIFEST = {"model": "efficientnet_lite0", "dim": 1280, "input": [3, 224, 224], "fingerprint": "abc",
            "random_weights": False, "parity_onnx_vs_torch": {"mean_cosine": 1.0}, "tensorrt_engine": None,
            "some_future_field": 1}


def test_manifest_round_trip(tmp_path):
    manifest = EmbedderManifest.from_dict(MANIFEST)
    assert manifest.input == (3, 224, 224) and manifest.dim == 1280 and not manifest.random_weights
    manifest.save(tmp_path / MANIFEST_FILE)
    assert EmbedderManifest.load(tmp_path / MANIFEST_FILE) == manifest
    assert json.loads((tmp_path / MANIFEST_FILE).read_text())["input"] == [3, 224, 224]


@pytest.mark.parametrize("change, message", [
    ({"dim": "1280"}, "'dim' must be int"),
    ({"dim": True}, "'dim' must be int"),
    ({"dim": 0}, "dim must be a positive integer"),
    ({"input": [224, 224]}, "input must be [3, H, W]"),
    ({"input": [3, "224", 224]}, "input must be [3, H, W]"),
    ({"fingerprint": None}, "'fingerprint' must be str"),
    ({"random_weights": "no"}, "'random_weights' must be bool"),
])
def test_a_manifest_of_the_wrong_shape_is_refused_naming_the_field(change, message):
    with pytest.raises(ArtifactError, match=message.replace("[", r"\[")):
        EmbedderManifest.from_dict({**MANIFEST, **change})


def test_missing_and_unreadable_files_are_artifact_errors(tmp_path):
    with pytest.raises(ArtifactError, match="no manifest.json"):
        EmbedderManifest.load(tmp_path / MANIFEST_FILE)
    (tmp_path / MANIFEST_FILE).write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="not a JSON object"):
        EmbedderManifest.load(tmp_path / MANIFEST_FILE)


def test_index_meta_seals_its_files(tmp_path):
    (tmp_path / "index.faiss").write_bytes(b"x" * 10)
    (tmp_path / "products.json").write_text("{}")
    meta = IndexMeta.new(dim=8, count=2, vectors=3, factory="Flat", embedder_fingerprint="fp").sealed(tmp_path)
    meta.save(tmp_path)
    loaded = IndexMeta.load(tmp_path)
    assert loaded == meta and loaded.files["index.faiss"]["bytes"] == 10
    legacy = {k: v for k, v in meta.to_dict().items() if k not in ("files", "vectors")}
    assert IndexMeta.from_dict(legacy).files is None and IndexMeta.from_dict(legacy).vectors == 2
    with pytest.raises(ArtifactError, match="'count' must be int"):
        IndexMeta.from_dict({"dim": 8})


def test_fingerprint_covers_the_model_and_the_preprocessing_but_not_its_notes(tmp_path):
    onnx_path(tmp_path).parent.mkdir()
    onnx_path(tmp_path).write_bytes(b"model")
    (tmp_path / "preprocessing.json").write_text(json.dumps({"height": 224, "notes": {"a": 1}}))
    first = fingerprint(tmp_path)
    (tmp_path / "preprocessing.json").write_text(json.dumps({"height": 224, "notes": {"a": 2}}))
    assert fingerprint(tmp_path) == first
    # query views and their fusion are searched with, never indexed: changing them needs no re-index
    (tmp_path / "preprocessing.json").write_text(json.dumps(
        {"height": 224, "query_views": [{"name": "crop"}, {"zoom": 0.6}], "query_fusion": "mean_top2"}))
    assert fingerprint(tmp_path) == first
    # the query framing is indexed: the catalog view "as_query" embeds each packshot framed by it
    (tmp_path / "preprocessing.json").write_text(json.dumps({"height": 224, "query": {"resize_size": 300}}))
    assert fingerprint(tmp_path) != first
    (tmp_path / "preprocessing.json").write_text(json.dumps({"height": 256}))
    assert fingerprint(tmp_path) != first
    (tmp_path / "preprocessing.json").write_text(json.dumps({"height": 224}))
    onnx_path(tmp_path).write_bytes(b"model2")
    assert fingerprint(tmp_path) != first


class FakeTritonError(Exception):
    """The two methods of tritonclient's InferenceServerException that `translate` reads."""

    def __init__(self, status, message):
        super().__init__(message)
        self._status, self._message = status, message

    def status(self):
        return self._status

    def message(self):
        return self._message


def test_client_errors_keep_the_status_and_the_servers_reason():
    err = translate(FakeTritonError("StatusCode.INVALID_ARGUMENT", "in ensemble 'embed_image', image 1 of 2: truncated"))
    assert isinstance(err, InvalidRequestError) and err.status == "StatusCode.INVALID_ARGUMENT"
    assert err.detail == "image 1 of 2: truncated" and "in ensemble" in str(err)


def test_wait_for_returns_when_ready_and_stops_at_the_deadline_or_an_abort():
    answers = iter([False, False, True])
    assert wait_for(lambda: next(answers), 5, what="x", interval_s=0.01) >= 0
    with pytest.raises(ServerUnavailableError, match="x not ready after 0 s"):
        wait_for(lambda: False, 0.05, what="x", interval_s=0.01)
    with pytest.raises(ServerUnavailableError, match="exited with 1"):
        wait_for(lambda: False, 60, what="x", abort=lambda: "exited with 1")
