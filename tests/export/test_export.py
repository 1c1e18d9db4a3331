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

from lookalike.indexing.repository import Repository, copy_repository
from lookalike.serving.embedding import OnnxEmbedder
from lookalike.serving.images import encode
from lookalike.serving.preprocessing import Preprocessor
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


def test_fp16_onnx_of_each_backbone_keeps_norms_and_head_fp32(repo, images, tmp_path):
    """The FP16-typed file `lookalike engine --precision fp16` builds from: FP32 in and out, LayerNorm,
    softmax, GeM and the L2 norm in FP32, FP16 Conv/MatMul; checked in ONNX Runtime against FP32."""
    from onnx import TensorProto

    from lookalike_export.fp16 import check_fp16, convert_fp16
    from tests.unit.test_fp16 import node_types  # element types of each node's inputs

    report = convert_fp16(repo.onnx_file, tmp_path / "model.fp16.onnx")
    pixels = Preprocessor(repo.preprocessing()).batch(images)
    check = check_fp16(repo.onnx_file, tmp_path / "model.fp16.onnx", pixels, repo.manifest().model)
    assert check["mean_cosine"] >= 0.999 and report["fp16_weights"] > 10
    model, inputs = node_types(tmp_path / "model.fp16.onnx")
    first_input = {n.op_type: set() for n in model.graph.node}
    for n in model.graph.node:
        if n.input:  # Constant nodes have none
            first_input[n.op_type].add(inputs[n.name or n.op_type][0])
    assert {v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]} == {TensorProto.FLOAT}
    assert first_input["ReduceL2"] == {TensorProto.FLOAT}
    compute = first_input.get("Conv", set()) | first_input.get("MatMul", set())
    assert compute == {TensorProto.FLOAT16}
    for sensitive in ("LayerNormalization", "Softmax", "Pow", "ReduceMean"):
        assert first_input.get(sensitive, {TensorProto.FLOAT}) == {TensorProto.FLOAT}, sensitive
    out = OnnxEmbedder(tmp_path / "model.fp16.onnx")(pixels)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)  # normalised in FP32
    print(f"\n{repo.manifest().model}: FP16 ONNX {report['fp16_weights']} FP16 weights, {report['fp32_nodes']} FP32 nodes, "
          f"{report['casts_inserted']} casts; mean cosine to FP32 {check['mean_cosine']:.6f}")


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
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt_engine_from_the_exported_onnx_passes_its_gate(tmp_path, images, precision):
    from lookalike_export.engine import build_repository_engine

    repo = copy_repository(REPOSITORY, tmp_path / "model_repository")
    if precision == "int8":
        export_embedder(get_backbone("efficientnet_lite0"), repo.root, images, precision="int8",
                        calibration_images=images * 8)
    before = repo.manifest()
    manifest = build_repository_engine(repo.root, images, precision)
    engine = manifest.tensorrt_engine
    assert engine["precision"] == precision and engine["strongly_typed"] and not engine["tf32"]
    assert set(engine["parity_by_batch"]) == {"1", "16", str(before.max_batch_size)}
    assert all(g["mean_cosine"] >= g["threshold"] for g in engine["parity_by_batch"].values())
    assert manifest.fingerprint == before.fingerprint and (repo.embedder_dir / "configs" / "tensorrt.pbtxt").exists()
    assert not engine["timing_cache"]["reused"]
    again = build_repository_engine(repo.root, images, precision).tensorrt_engine
    assert again["timing_cache"]["reused"]  # kept in the embedder's tensorrt-cache/


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


def deprecated_tensorrt_apis() -> set[str]:
    """What tensorrt-stubs' docstrings mark [DEPRECATED]: classes, their enum members and methods, as
    "Class", "Class.MEMBER" and "method" (the stubs mark them in text, not with @deprecated)."""
    import re

    stub = (ROOT / ".typecheck" / "tensorrt_bindings" / "tensorrt.pyi").read_text().splitlines()
    found, cls, last = set(), "", ""
    for line in stub:
        if m := re.match(r"^class (\w+)", line):
            cls, last = m.group(1), m.group(1)
        elif m := re.match(r"^\s+def (\w+)\(", line):
            last = m.group(1)
        elif m := re.match(r"^ {6}(\w+) : ", line):
            last = f"{cls}.{m.group(1)}"
        if "[DEPRECATED]" not in line:
            continue
        if m := re.search(r":ivar (\w+):", line):  # an attribute
            found.add(f"{cls}.{m.group(1)}")
        elif line.strip().startswith("[DEPRECATED]") or re.match(r"^ {6}\w+ : \[DEPRECATED\]", line):
            found.add(last)  # the class, member or method whose text this is (not a passing mention)
    return found


def test_the_tensorrt_build_uses_no_deprecated_api_but_the_named_ones():
    import ast
    import re

    deprecated = deprecated_tensorrt_apis()
    assert {"BuilderFlag.FP16", "IInt8EntropyCalibrator2", "CalibrationAlgoType"} <= deprecated  # the parser works
    source = (ROOT / "export" / "tensorrt_build.py").read_text()  # not imported: TensorRT is not installed here
    around = "".join((ROOT / "export" / name).read_text() for name in ("engine.py", "fp16.py", "onnx_export.py"))
    allowed = next(ast.literal_eval(node.value) for node in ast.parse(source).body if isinstance(node, ast.Assign)
                   and any(getattr(t, "id", "") == "DEPRECATED_ALLOWED" for t in node.targets))
    def offending(code: str) -> list[str]:
        used = set(re.findall(r"trt\.(\w+(?:\.\w+)?)", code)) | set(re.findall(r"\.(\w+)\(", code))
        used |= {name.split(".")[0] for name in used}
        return sorted(u for u in used if u in deprecated and u not in allowed)

    assert allowed == ()  # FP16 is strongly typed now: nothing deprecated is left
    assert not offending(source), f"deprecated TensorRT APIs in export/tensorrt_build.py: {offending(source)}"
    assert not offending(around), f"deprecated TensorRT APIs around it: {offending(around)}"
    # negative control: the implicit INT8 calibration this module used before is caught
    old = "class C(trt.IInt8EntropyCalibrator2): pass\nconfig.set_flag(trt.BuilderFlag.INT8)\nconfig.set_calibration_profile(p)"
    assert {"IInt8EntropyCalibrator2", "BuilderFlag.INT8", "set_calibration_profile"} <= set(offending(old)), offending(old)
    # and the FP16 path it used until the strongly typed FP16 network
    old = "config.set_flag(trt.BuilderFlag.FP16)\nlayer.set_output_type(0, trt.DataType.FLOAT)"
    assert {"BuilderFlag.FP16", "set_output_type"} <= set(offending(old)), offending(old)


# -- INT8 by explicit quantization (Q/DQ ONNX, gated in ONNX Runtime) ------------------------------
@pytest.fixture(scope="module")
def int8_repo(tmp_path_factory, images):
    from lookalike.indexing.catalog import read_catalog
    from lookalike.quality.sample_data import build_sample_catalog

    root = tmp_path_factory.mktemp("int8")
    build_sample_catalog(root / "catalog", per_category=6, holdout=0)  # 96 images: 64 calibrate, 32 held out
    items, _ = read_catalog(root / "catalog" / "catalog.csv")
    repo = copy_repository(REPOSITORY, root / "model_repository")
    export_embedder(get_backbone("efficientnet_lite0"), repo.root, images, precision="int8",
                    calibration_images=[item.image.read_bytes() for item in items])
    return repo, root / "catalog" / "catalog.csv"


def test_int8_export_is_a_qdq_onnx_that_passed_its_gates(int8_repo, images):
    import onnx

    int8_repo, _ = int8_repo
    from lookalike_export.quantize import MIN_COSINE_INT8

    manifest = int8_repo.manifest()
    q = manifest.quantization
    assert q["precision"] == "int8" and q["format"] == "onnx-qdq" and q["calibration_images"] >= 16
    assert q["parity_vs_fp32"]["mean_cosine"] >= MIN_COSINE_INT8 and q["retrieval_check"]["products"] >= 20
    graph = onnx.load(str(int8_repo.onnx_file)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 10
    zero_points = [i for i in graph.initializer if i.name.endswith("_zero_point")]
    assert zero_points and all(not onnx.numpy_helper.to_array(z).any() for z in zero_points)  # symmetric
    kinds = {onnx.numpy_helper.to_array(z).dtype for z in zero_points}
    assert kinds <= {np.dtype(np.int8), np.dtype(np.int32)} and np.dtype(np.int8) in kinds  # INT8 (biases INT32)
    kept = set(q["fp32_nodes"])
    assert kept and not any(n.name in kept for n in graph.node if n.op_type == "QuantizeLinear")
    pixels = Preprocessor(get_backbone("efficientnet_lite0").preprocessing).batch(images)
    out = OnnxEmbedder(int8_repo.onnx_file)(pixels)
    assert out.shape == (len(images), manifest.dim) and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-3)


def test_the_int8_embedder_serves_through_visual_search(int8_repo):
    int8_repo, catalog = int8_repo
    from lookalike.indexing.catalog import read_catalog
    from lookalike.indexing.indexer import index_catalog
    from lookalike.server.launcher import ServerOptions, free_port
    from lookalike.server.serve import lookalike_server
    from lookalike_client import LookalikeClient

    options = ServerOptions(model_repository=int8_repo.root, http_port=free_port(), grpc_port=free_port(),
                            metrics_port=free_port())
    with lookalike_server(options, log_file=int8_repo.root.parent / "tritonserver.log"):
        with LookalikeClient(options.grpc_url, timeout_s=120) as client:
            report = index_catalog(catalog, int8_repo, client, progress=False)
            info = client.info()
            assert (info.embedder_fingerprint, info.products) == (int8_repo.manifest().fingerprint, report.products)
            items, _ = read_catalog(catalog)
            hits = sum(client.search(item.image, top_k=1)[0].product_id == item.product_id for item in items[:12])
    assert hits >= 11, f"{hits} of 12 catalog images found themselves with the INT8 embedder"


def test_int8_needs_a_calibration_catalog_of_16_images(tmp_path, images):
    from lookalike_export.quantize import QuantizationError, quantize_int8

    with pytest.raises(ExportError, match="--calibration"):
        export_embedder(get_backbone("efficientnet_lite0"), tmp_path, images, precision="int8")
    with pytest.raises(QuantizationError, match="at least 16 images"):
        quantize_int8(tmp_path / "unused.onnx", tmp_path / "out.onnx", np.zeros((8, 3, 224, 224), np.float32))
