"""Export a backbone to an ONNX embedder (L2 normalisation inside the graph), check it, and write the
embedder's model directory: 1/model.onnx, preprocessing.json, manifest.json and the serving configs.

The export is gated: onnx.checker, then ONNX Runtime against torch on real images through our own
preprocessing, at batch 1 and at a larger batch (the dynamic axis). Below the cosine threshold
nothing is written.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from lookalike.indexing.model_configs import write_embedder_configs
from lookalike.indexing.repository import Repository
from lookalike.serving.artifacts import EMBEDDER_VERSION, ONNX_FILE, PLAN_FILE, PREPROCESSING_FILE, EmbedderManifest, fingerprint, utc_now
from lookalike.serving.embedding import OnnxEmbedder
from lookalike.serving.preprocessing import Preprocessor
from lookalike_client import contract as c

from .backbones import Backbone
from .engine import TENSORRT_CACHE_DIR, decodable_pixels
from .parity import ParityError, compare, gate

OPSET = 17
# The Python-backend adapter of the embedder, as committed in this checkout's model repository.
ADAPTER_SOURCE = Path(__file__).resolve().parents[1] / "model_repository" / c.EMBEDDER_MODEL / EMBEDDER_VERSION / "model.py"


class ExportError(RuntimeError):
    pass


class Embedder(nn.Module):
    """Backbone features -> L2-normalised embedding, the graph that is exported."""

    def __init__(self, features: nn.Module) -> None:
        super().__init__()
        self.features = features

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.features(pixels), p=2.0, dim=1, eps=1e-12)


def export_onnx(module: nn.Module, path: Path, height: int, width: int, dim: int) -> None:
    import onnx

    example = torch.zeros(2, 3, height, width)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # nn.MultiheadAttention's inference fast path (aten::_native_multi_head_attention) has no ONNX
    # symbolic: trace the plain path, which computes the same thing.
    torch.backends.mha.set_fastpath_enabled(False)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=[c.PIXELS],
            output_names=[c.EMBEDDING],
            dynamic_axes={c.PIXELS: {0: "batch"}, c.EMBEDDING: {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    torch.backends.mha.set_fastpath_enabled(fastpath)
    # Only the batch axis is dynamic: pin the embedding width, which the exporter can leave symbolic.
    model = onnx.load(str(path))
    output_dims = model.graph.output[0].type.tensor_type.shape.dim
    output_dims[1].Clear()
    output_dims[1].dim_value = dim
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def parity(module: nn.Module, onnx_path: Path, pixels: np.ndarray) -> dict:
    """torch vs ONNX Runtime on the same pixels, in one batch and one by one: the worse of the two."""
    embedder = OnnxEmbedder(onnx_path, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        reference = module(torch.from_numpy(pixels)).numpy()
    batched = embedder(pixels)
    single = np.concatenate([embedder(pixels[i : i + 1]) for i in range(len(pixels))])
    both = [compare(reference, batched), compare(reference, single)]
    return {
        "images": int(len(pixels)),
        "max_abs_diff": max(r["max_abs_diff"] for r in both),
        "mean_cosine": min(r["mean_cosine"] for r in both),
        "min_cosine": min(r["min_cosine"] for r in both),
        "norm_max_dev": float(np.abs(np.linalg.norm(batched, axis=1) - 1).max()),
        "dim": int(batched.shape[1]),
    }


def export_embedder(
    backbone: Backbone,
    repository: Path,
    images: Sequence[bytes],
    *,
    weights: str | None = "DEFAULT",
    max_batch_size: int = c.MAX_BATCH_SIZE,
    fmt: str = "onnx",
    precision: str = "fp32",
    calibration_images: Sequence[bytes] = (),
) -> EmbedderManifest:
    """Writes `repository/embedder/` for `backbone`; returns the manifest. Raises ExportError when a
    check fails, leaving any existing embedder untouched. fmt "tensorrt" also builds `1/model.plan`
    from the checked ONNX file (needs TensorRT and a CUDA GPU)."""
    if fmt not in ("onnx", "tensorrt"):
        raise ExportError(f"format must be onnx or tensorrt, got {fmt!r}")
    if fmt == "onnx" and precision == "fp16":
        raise ExportError("ONNX export is fp32 or int8 (Q/DQ); --precision fp16 applies to --format tensorrt")
    if precision == "int8" and not calibration_images:
        raise ExportError("--precision int8 needs --calibration CATALOG (catalog images through our preprocessing)")
    if not images:
        raise ExportError("parity needs at least one real image")
    repo = Repository(Path(repository))
    pre = backbone.preprocessing
    torch.manual_seed(0)
    started = time.perf_counter()
    module = Embedder(backbone.build(weights)).eval()
    pixels = Preprocessor(pre).batch(list(images))
    embedder_dir = repo.embedder_dir
    embedder_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=embedder_dir))
    try:
        onnx_path = staging / ONNX_FILE
        export_onnx(module, onnx_path, pre.height, pre.width, backbone.dim)
        report = parity(module, onnx_path, pixels)
        if report["dim"] != backbone.dim:
            raise ExportError(f"{backbone.name}: embedding dim {report['dim']}, expected {backbone.dim}")
        try:
            report = gate(report, "fp32", f"{backbone.name}: the ONNX export")
        except ParityError as exc:
            raise ExportError(str(exc)) from None
        quantization = None
        if precision == "int8":  # the Q/DQ file: served by ONNX Runtime, or what a strongly typed engine is built from
            quantization = _quantize(backbone, onnx_path, staging, pixels, calibration_images)
        engine = None
        if fmt == "tensorrt":
            engine = _build_tensorrt(backbone, onnx_path, staging, pixels, precision, max_batch_size,
                                     embedder_dir / TENSORRT_CACHE_DIR)
        # Checks passed: publish. The model files land first, the manifest last.
        repo.onnx_file.parent.mkdir(exist_ok=True)
        adapter = repo.onnx_file.parent / "model.py"
        if not adapter.exists() and ADAPTER_SOURCE.exists():  # a repository other than this checkout's
            shutil.copy2(ADAPTER_SOURCE, adapter)
        pre.save(embedder_dir / PREPROCESSING_FILE)
        os.replace(onnx_path, repo.onnx_file)
        if engine is not None:
            os.replace(staging / PLAN_FILE, repo.plan_file)
        elif repo.plan_file.exists():
            repo.plan_file.unlink()  # built from another ONNX file: stale
        write_embedder_configs(
            embedder_dir, height=pre.height, width=pre.width, dim=backbone.dim, max_batch_size=max_batch_size,
            tensorrt=engine is not None,
        )
        import onnx
        import onnxruntime

        manifest = EmbedderManifest(
            model=backbone.name,
            pooling=backbone.pooling,
            format="onnx",
            weights="random" if weights is None else str(weights),
            weights_source=backbone.weights_source if weights == "DEFAULT" else ("random init" if weights is None else str(weights)),
            random_weights=weights is None,
            dim=backbone.dim,
            input=(3, pre.height, pre.width),
            max_batch_size=max_batch_size,
            opset=OPSET,
            fingerprint=fingerprint(embedder_dir),
            parity_onnx_vs_torch=report,
            tensorrt_engine=engine,
            quantization=quantization,
            export_seconds=round(time.perf_counter() - started, 1),
            exported=utc_now(),
            versions={
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
                "python": platform.python_version(),
            },
        )
        manifest.save(repo.manifest_file)
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _quantize(backbone: Backbone, onnx_path: Path, staging: Path, parity_pixels: np.ndarray,
              calibration_images: Sequence[bytes]) -> dict:
    """Replaces the checked FP32 `onnx_path` by its Q/DQ INT8 file once that passes its gates: cosine
    to FP32 on held-out catalog images and the parity photos, and recall@1 on a retrieval check.
    The last third of the catalog images (at most 128) is held out; the rest (at most 256) calibrates."""
    from .quantize import QuantizationError, cosine_report, embed, gate_int8, quantize_int8, retrieval_check

    pre = backbone.preprocessing
    images = list(calibration_images)
    held_out = min(128, len(images) // 3)
    calibrate, check = images[: len(images) - held_out][:256], images[len(images) - held_out :]
    int8_path = staging / "model.int8.onnx"
    try:
        report = quantize_int8(onnx_path, int8_path, decodable_pixels(Preprocessor(pre), calibrate))
        check_pixels = np.concatenate([decodable_pixels(Preprocessor(pre), check), parity_pixels])
        cosine = cosine_report(embed(onnx_path, check_pixels), embed(int8_path, check_pixels))
        retrieval = retrieval_check(onnx_path, int8_path, check, pre, pre.for_side("query"))
        gate_int8(cosine, retrieval, backbone.name)
    except QuantizationError as exc:
        raise ExportError(str(exc)) from None
    os.replace(int8_path, onnx_path)
    return {**report.to_dict(), "parity_vs_fp32": cosine, "retrieval_check": retrieval}


def _build_tensorrt(backbone: Backbone, onnx_path: Path, staging: Path, pixels: np.ndarray, precision: str,
                    max_batch_size: int, cache_dir: Path) -> dict:
    """`staging/model.plan` of the checked `onnx_path` (for int8 already the gated Q/DQ file), the same
    build and gate as `lookalike engine` (engine.py)."""
    from .engine import EngineError, build_gated_engine

    pre = backbone.preprocessing
    try:
        return build_gated_engine(onnx_path, staging, pixels, precision, height=pre.height, width=pre.width,
                                  max_batch_size=max_batch_size, cache_dir=cache_dir, what=backbone.name)
    except EngineError as exc:
        raise ExportError(str(exc)) from None
