"""The export machinery: ONNX for all three backbones (ResNet-50 and ViT-B/16 with random weights, only
to test the machinery), parity, dynamic batch, manifest; --weights FILE; the TensorRT module
type-checked with pyright against tensorrt-stubs."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from lookalike.embedding import OnnxEmbedder
from lookalike.images import encode
from lookalike.preprocessing import Preprocessor
from lookalike.repository import Repository, copy_repository
from lookalike_export.backbones import BACKBONES, get_backbone
from lookalike_export.onnx_export import ExportError, export_embedder
from tests.conftest import REPOSITORY, ROOT


@pytest.fixture(scope="module")
def images(photos):
    return [encode(image) for _, image in photos[:4]]


def exported(tmp_path_factory, images, name) -> Repository:
    repo = copy_repository(REPOSITORY, tmp_path_factory.mktemp(name) / "model_repository")
    shutil.rmtree(repo.embedder_dir / "1")  # export writes 1/model.onnx and the adapter model.py
    (repo.embedder_dir / "1").mkdir()
    for leftover in ("config.pbtxt", "manifest.json", "preprocessing.json"):
        (repo.embedder_dir / leftover).unlink(missing_ok=True)
    weights = "DEFAULT" if name == "efficientnet_lite0" else None
    export_embedder(get_backbone(name), repo.root, images, weights=weights, max_batch_size=8)
    return repo


@pytest.fixture(scope="module", params=["efficientnet_lite0", "resnet50", "vit_b_16"])
def repo(request, tmp_path_factory, images):
    return exported(tmp_path_factory, images, request.param)


def test_onnx_export_passes_parity_and_records_it(repo):
    manifest = repo.manifest()
    backbone = BACKBONES[manifest.model]
    parity = manifest.parity_onnx_vs_torch
    assert parity["mean_cosine"] >= 0.9999 and parity["min_cosine"] >= 0.999
    assert manifest.dim == backbone.dim and manifest.input == (3, 224, 224)
    assert manifest.random_weights is (manifest.model != "efficientnet_lite0")
    assert manifest.opset >= 17 and manifest.max_batch_size == 8
    assert repo.preprocessing() == backbone.preprocessing
    assert (repo.embedder_dir / "1" / "model.py").exists()  # the Python-backend adapter
    assert (repo.embedder_dir / "configs" / "onnxruntime.pbtxt").exists()
    assert not (repo.embedder_dir / "configs" / "tensorrt.pbtxt").exists()  # no engine was built
    print(f"\n{manifest.model}: ONNX {repo.onnx_file.stat().st_size / 1e6:.1f} MB, "
          f"mean cosine {parity['mean_cosine']:.7f}, max abs diff {parity['max_abs_diff']:.2e}")


def test_dynamic_batch_gives_the_same_embeddings(repo, images):
    embedder = OnnxEmbedder(repo.embedder_dir / "1" / "model.onnx")
    pixels = Preprocessor(repo.preprocessing()).batch(images * 2)  # 8 = max batch
    together = embedder(pixels)
    for size in (1, 3):
        np.testing.assert_allclose(embedder(pixels[:size]), together[:size], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)


def test_weights_file_loads_a_state_dict(tmp_path):
    from torchvision.models import resnet50

    reference = resnet50(weights=None).eval()
    torch.save(reference.state_dict(), tmp_path / "resnet50.pth")
    loaded = get_backbone("resnet50").build(str(tmp_path / "resnet50.pth"))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        reference.fc = torch.nn.Identity()
        torch.testing.assert_close(loaded(x), reference(x))
        assert loaded(x).shape == (2, 2048)


def test_vit_head_is_the_class_token_after_the_final_norm():
    net = get_backbone("vit_b_16").build(None)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tokens = net.encoder(torch.cat([net.class_token.expand(1, -1, -1), net._process_input(x)], dim=1))
        torch.testing.assert_close(net(x), tokens[:, 0])  # encoder ends with its LayerNorm (ln)
    assert isinstance(net.encoder.ln, torch.nn.LayerNorm)


def test_export_refuses_reduced_precision_onnx(tmp_path, images):
    with pytest.raises(ExportError, match="fp32"):
        export_embedder(get_backbone("efficientnet_lite0"), tmp_path, images, precision="fp16")


def test_tensorrt_format_without_tensorrt_is_a_clear_error(tmp_path, images):
    try:
        import tensorrt  # noqa: F401
        if not hasattr(tensorrt, "Builder"):
            raise ImportError("tensorrt is only a namespace (stubs), not TensorRT")
    except ImportError:
        with pytest.raises(ExportError, match="needs TensorRT"):
            export_embedder(get_backbone("efficientnet_lite0"), tmp_path, images, fmt="tensorrt", precision="fp16")
        assert not (tmp_path / "embedder" / "manifest.json").exists()
    else:
        pytest.skip("TensorRT is installed here: the engine tests below run instead")


def _tensorrt_missing_reason() -> str | None:
    try:
        import tensorrt
    except ImportError as exc:
        return f"import tensorrt failed ({exc}): TensorRT cannot be installed on these CPU machines; use make engine on a GPU host"
    if not hasattr(tensorrt, "Builder"):
        return "import tensorrt found only type stubs, not TensorRT"
    if not torch.cuda.is_available():
        return "TensorRT is installed but torch sees no CUDA GPU"
    return None


@pytest.mark.skipif(_tensorrt_missing_reason() is not None, reason=str(_tensorrt_missing_reason()))
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_tensorrt_engine_passes_its_gate(tmp_path, images, precision):
    repo = copy_repository(REPOSITORY, tmp_path / "model_repository")
    calibration = images * 8 if precision == "int8" else ()
    manifest = export_embedder(get_backbone("efficientnet_lite0"), repo.root, images, fmt="tensorrt",
                               precision=precision, calibration_images=calibration)
    engine = manifest.tensorrt_engine
    assert engine["parity_vs_onnx"]["mean_cosine"] >= engine["parity_vs_onnx"]["threshold"]
    assert (repo.embedder_dir / "1" / "model.plan").exists()
    assert (repo.embedder_dir / "configs" / "tensorrt.pbtxt").exists()


# -- TensorRT API calls, type-checked against tensorrt-stubs -----------------------------------------
PYRIGHT = ROOT / "node_modules" / ".bin" / "pyright"


def run_pyright(*paths: Path) -> subprocess.CompletedProcess:
    if not PYRIGHT.exists() or not (ROOT / ".typecheck" / "tensorrt_bindings").exists():
        pytest.fail("pyright or tensorrt-stubs missing: run `make setup`")
    return subprocess.run([str(PYRIGHT), "--outputjson", *map(str, paths)], cwd=ROOT, capture_output=True, text=True)


def test_tensorrt_build_type_checks_against_the_stubs():
    result = run_pyright(ROOT / "export" / "tensorrt_build.py")
    report = json.loads(result.stdout)
    errors = [f"{d['file']}:{d['range']['start']['line'] + 1}: {d['message']}" for d in report["generalDiagnostics"]
              if d["severity"] == "error"]
    assert not errors, "\n".join(errors)
    assert report["summary"]["filesAnalyzed"] >= 1


def test_pyright_catches_a_misspelt_flag_and_a_wrong_argument(tmp_path):
    """Negative control: the check above would fail on a real API mistake."""
    bad = ROOT / "export" / "_pyright_negative_control.py"
    bad.write_text(
        "import tensorrt as trt\n"
        "config = trt.Builder(trt.Logger()).create_builder_config()\n"
        "config.set_flag(trt.BuilderFlag.FP61)\n"
        "config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 'four gigabytes')\n"
    )
    try:
        report = json.loads(run_pyright(bad).stdout)
    finally:
        bad.unlink()
    messages = " | ".join(d["message"] for d in report["generalDiagnostics"] if d["severity"] == "error")
    assert "FP61" in messages and "pool_size" in messages, messages
