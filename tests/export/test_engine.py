"""`lookalike engine` (export/engine.py): the TensorRT engine of the embedder the host exported, from its
own model.onnx. What runs here: which file and precision it builds from, the refusals, and what it
publishes (the TensorRT build itself is replaced by a function that writes a plan file: TensorRT cannot
be installed on these machines; the real build runs in tests/export/test_export.py where it can)."""

import dataclasses
import hashlib
import subprocess

import numpy as np
import pytest

from lookalike.indexing.model_configs import read
from lookalike.indexing.repository import copy_repository
from lookalike.server.serve import LaunchError, check_model_config_name
from lookalike.serving.artifacts import fingerprint
from lookalike_export.engine import EngineError, build_repository_engine, engine_precision, profile_batches
from tests.conftest import REPOSITORY, ROOT

LOOKALIKE = str(ROOT / ".venv" / "bin" / "lookalike")


@pytest.fixture
def repo(tmp_path):
    return copy_repository(REPOSITORY, tmp_path / "model_repository")


@pytest.fixture(scope="module")
def images(photos):
    from lookalike.serving.images import encode

    return [encode(image) for _, image in photos[:3]]


def snapshot(embedder_dir):
    """sha256 of every file under the embedder (what a refused build must leave as it was)."""
    return {str(p.relative_to(embedder_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(embedder_dir.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


def test_without_tensorrt_the_command_says_so_and_changes_nothing(repo):
    before = snapshot(repo.embedder_dir)
    done = subprocess.run([LOOKALIKE, "engine", "--model-repository", str(repo.root), "--gate-images", "2"],
                          capture_output=True, text=True, timeout=300)
    try:
        import tensorrt

        if hasattr(tensorrt, "Builder"):
            pytest.skip("TensorRT is installed here: test_export.py builds real engines instead")
    except ImportError:
        pass
    assert done.returncode == 1, done.stdout + done.stderr
    assert "needs TensorRT" in done.stderr and "make engine" in done.stderr
    assert "building the fp16 TensorRT engine" in done.stdout  # FP32 model.onnx: fp16 by default
    assert snapshot(repo.embedder_dir) == before
    assert not list(repo.embedder_dir.glob(".engine-*"))


def test_the_precision_follows_model_onnx(repo):
    manifest = repo.manifest()
    assert manifest.quantization is None
    assert engine_precision(manifest, None) == "fp16"
    assert engine_precision(manifest, "fp32") == "fp32"
    with pytest.raises(EngineError, match="lookalike export --precision int8 --calibration"):
        engine_precision(manifest, "int8")
    qdq = dataclasses.replace(manifest, quantization={"precision": "int8", "format": "onnx-qdq"})
    assert engine_precision(qdq, None) == "int8"
    with pytest.raises(EngineError, match="Q/DQ INT8 export"):
        engine_precision(qdq, "fp16")


def test_an_onnx_changed_since_export_is_refused(repo, images):
    with open(repo.onnx_file, "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(EngineError, match="changed since it was exported"):
        build_repository_engine(repo.root, images, "fp16", build=pytest.fail, log=lambda _: None)


def plan_writer(calls):
    """The TensorRT step, as far as the publishing sees it: a plan file in staging and a record."""
    def build(onnx_path, staging, pixels, precision, **kwargs):
        calls.append((onnx_path, pixels.shape, precision, kwargs))
        (staging / "model.plan").write_bytes(b"engine bytes")
        return {"precision": precision, "tensorrt": "10.x", "built_from": {"file": onnx_path.name}}
    return build


def test_a_built_engine_is_published_with_the_fingerprint_unchanged(repo, images):
    before = repo.manifest()
    onnx_bytes = repo.onnx_file.read_bytes()
    with pytest.raises(LaunchError, match="no configs/tensorrt.pbtxt"):
        check_model_config_name(repo, "tensorrt")
    calls = []
    manifest = build_repository_engine(repo.root, images, build=plan_writer(calls), log=lambda _: None)

    (onnx_path, shape, precision, kwargs), = calls
    assert onnx_path == repo.onnx_file and precision == "fp16"  # built from the host's own file
    assert shape == (len(images), 3, before.input[1], before.input[2])
    assert kwargs["max_batch_size"] == before.max_batch_size and kwargs["allow_tf32"] is False
    assert kwargs["cache_dir"] == repo.embedder_dir / "tensorrt-cache"  # kept between builds, not in staging
    assert repo.onnx_file.read_bytes() == onnx_bytes
    assert manifest.fingerprint == before.fingerprint == fingerprint(repo.embedder_dir)
    assert repo.manifest().tensorrt_engine == {"precision": "fp16", "tensorrt": "10.x", "built_from": {"file": "model.onnx"}}
    assert dataclasses.replace(repo.manifest(), tensorrt_engine=None) == before
    assert repo.plan_file.read_bytes() == b"engine bytes"
    config = read(repo.embedder_dir / "configs" / "tensorrt.pbtxt")
    assert config.platform == "tensorrt_plan" and config.max_batch_size == before.max_batch_size
    assert list(config.output[0].dims) == [before.dim]
    check_model_config_name(repo, "tensorrt")  # now served
    assert not list(repo.embedder_dir.glob(".engine-*"))


def test_a_killed_builds_staging_is_swept_by_the_next(repo, images):
    leftover = repo.embedder_dir / ".engine-killed"
    leftover.mkdir()
    (leftover / "model.fp16.onnx").write_bytes(b"half written")
    build_repository_engine(repo.root, images, "fp16", build=plan_writer([]), log=lambda _: None)
    assert not leftover.exists() and repo.plan_file.exists()


def test_a_failed_build_publishes_nothing(repo, images):
    before = snapshot(repo.embedder_dir)

    def fails(onnx_path, staging, pixels, precision, **kwargs):
        (staging / "model.plan").write_bytes(b"half an engine")
        raise EngineError("the fp16 engine (vs ONNX) at batch 64 fails parity: mean cosine 0.9 < 0.999")

    with pytest.raises(EngineError, match="fails parity"):
        build_repository_engine(repo.root, images, "fp16", build=fails, log=lambda _: None)
    assert snapshot(repo.embedder_dir) == before
    assert not list(repo.embedder_dir.glob(".engine-*"))


def test_a_tensorrt_config_without_its_plan_is_refused(repo):
    (repo.embedder_dir / "configs" / "tensorrt.pbtxt").write_text("# left behind\n")
    with pytest.raises(LaunchError, match="model.plan is missing"):
        check_model_config_name(repo, "tensorrt")


def test_the_gate_batches_cover_the_profile_edges():
    pixels = np.arange(3 * 2, dtype=np.float32).reshape(3, 2)
    assert [len(b) for b in profile_batches(pixels, 16, 64)] == [1, 16, 64]
    assert [len(b) for b in profile_batches(pixels, 16, 8)] == [1, 8]
    np.testing.assert_array_equal(profile_batches(pixels, 16, 64)[1][3], pixels[0])  # the images repeated


def test_the_gate_skips_images_that_do_not_decode_and_needs_one_that_does(repo, images):
    calls = []
    build_repository_engine(repo.root, [b"not an image", images[0], b""], "fp32", build=plan_writer(calls),
                            log=lambda _: None)
    assert calls[0][1][0] == 1  # the one photo that decodes
    with pytest.raises(EngineError, match="none of the 2 given decodes"):
        build_repository_engine(repo.root, [b"not an image", b""], "fp32", build=pytest.fail, log=lambda _: None)
