"""INT8 by explicit quantization: a Q/DQ ONNX made from the checked FP32 ONNX, calibrated on catalog
images through our own preprocessing, and gated on this CPU in ONNX Runtime (cosine against FP32 and
recall on a retrieval check). The same file is what TensorRT builds a strongly typed INT8 engine from
(no calibrator), and a CPU serving option.

The quantizer is ONNX Runtime's static QDQ quantization (`onnxruntime.quantization.quantize_static`),
not NVIDIA Model Optimizer: ONNX Runtime is already what serves the model here, so the file is tested
by the runtime that serves it, with no new dependency (Model Optimizer's ONNX PTQ pulls in torch and
calibrates with ONNX Runtime underneath). Its output is what TensorRT documents for explicit
quantization: symmetric INT8 (zero point 0) for weights (per output channel) and activations, Q/DQ
pairs on the inputs of Conv/MatMul/Gemm only, so pooling, GeM and the L2 normalisation stay FP32.

Measured on EfficientNet-Lite0 with a one-off script while choosing (mean cosine to FP32 on 128
held-out catalog images, 128 calibration images): every Conv in INT8 0.896 (MinMax); the 16 depthwise
convs, the stem and the head kept FP32 0.990 (MinMax) and 0.993 (Percentile 99.999). Those layers are the
`fp32_nodes` policy below; Percentile is the calibration.
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lookalike_client import contract as c

CALIBRATION_BATCH = 16
MIN_CALIBRATION_IMAGES = CALIBRATION_BATCH  # fewer give no full batch: refused with this number
# Mean cosine of INT8 to FP32 embeddings: a sanity floor (measured 0.989 with 80 calibration images,
# 0.992 with 240); the gate that matters is recall on the retrieval check.
MIN_COSINE_INT8 = 0.98
MAX_RECALL_LOSS = 0.02  # recall@1 on the retrieval check may drop by this much (+ one query of the check)
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")


class QuantizationError(RuntimeError):
    """The INT8 file could not be made, or failed its gates."""


def fp32_nodes(model: Any) -> list[str]:
    """The nodes kept in FP32: depthwise convolutions (one filter per channel: per-tensor activation
    scales lose most there), the first Conv (the stem, on raw normalised pixels) and the last Conv or
    MatMul/Gemm (the head, whose activations GeM and the L2 norm amplify)."""
    def grouped(node: Any) -> bool:
        return any(a.name == "group" and a.i > 1 for a in node.attribute)

    compute = [n for n in model.graph.node if n.op_type in QUANTIZED_OPS]
    keep = [n.name for n in compute if n.op_type == "Conv" and grouped(n)]
    for edge in (compute[:1] + compute[-1:]) if compute else []:
        if edge.name not in keep:
            keep.append(edge.name)
    return keep


@dataclass(frozen=True)
class QuantizationReport:
    method: str
    calibration_images: int
    quantized_nodes: int
    fp32_nodes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"precision": "int8", "format": "onnx-qdq", "tool": "onnxruntime.quantization.quantize_static",
                "method": self.method, "activations": "int8 symmetric, per tensor",
                "weights": "int8 symmetric, per channel", "calibration_images": self.calibration_images,
                "quantized_nodes": self.quantized_nodes, "fp32_nodes": self.fp32_nodes}


def quantize_int8(fp32_onnx: Path, out: Path, calibration: np.ndarray) -> QuantizationReport:
    """Writes the Q/DQ INT8 ONNX of `fp32_onnx` to `out`, calibrated on `calibration` ([N, 3, H, W]
    float32 pixels of catalog images, through the embedder's preprocessing)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration) < MIN_CALIBRATION_IMAGES:
        raise QuantizationError(f"INT8 calibration needs at least {MIN_CALIBRATION_IMAGES} images that decode "
                                f"(one batch of {CALIBRATION_BATCH}), got {len(calibration)}")

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            usable = len(calibration) - len(calibration) % CALIBRATION_BATCH
            self.batches = iter([{c.PIXELS: np.ascontiguousarray(calibration[i : i + CALIBRATION_BATCH])}
                                 for i in range(0, usable, CALIBRATION_BATCH)])

        def get_next(self) -> dict[str, np.ndarray] | None:  # pyright: ignore[reportIncompatibleMethodOverride] - ORT ends on None
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(prefix="lookalike-quantize-") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(fp32_onnx), str(prepared))  # shape inference + graph clean-up, as ORT advises
        keep = fp32_nodes(onnx.load(str(prepared)))
        quantize_static(str(prepared), str(out), Batches(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                        op_types_to_quantize=list(QUANTIZED_OPS), nodes_to_exclude=keep,
                        calibrate_method=CalibrationMethod.Percentile,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    quantized = onnx.load(str(out))
    count = sum(1 for n in quantized.graph.node if n.op_type == "DequantizeLinear"
                and any(n.output[0] in m.input for m in quantized.graph.node if m.op_type in QUANTIZED_OPS))
    return QuantizationReport("percentile 99.999", len(calibration) - len(calibration) % CALIBRATION_BATCH,
                              count, keep)


def embed(onnx_path: Path, pixels: np.ndarray, batch: int = 16) -> np.ndarray:
    from lookalike.serving.embedding import OnnxEmbedder

    embedder = OnnxEmbedder(onnx_path, intra_op_threads=0)
    return np.concatenate([embedder(pixels[i : i + batch]) for i in range(0, len(pixels), batch)])


def cosine_report(reference: np.ndarray, candidate: np.ndarray) -> dict[str, Any]:
    """parity.compare's report of INT8 against FP32, with this gate's threshold."""
    from .parity import compare

    return {**compare(reference, candidate), "threshold": MIN_COSINE_INT8}


def recall_at_1(gallery: np.ndarray, queries: np.ndarray) -> float:
    """Query i is a shopper photo of gallery item i: the share whose nearest item is its own."""
    return float(np.mean(np.argmax(queries @ gallery.T, axis=1) == np.arange(len(queries))))


def retrieval_check(fp32_onnx: Path, int8_onnx: Path, packshots: Sequence[bytes], catalog_side: Any,
                    query_side: Any, seed: int = 0) -> dict[str, Any]:
    """Recall@1 of simulated shopper photos of `packshots` against the packshots themselves, with
    the FP32 and with the INT8 embedder (the same photos, the same preprocessing)."""
    import io

    from PIL import Image

    from lookalike.quality.shopper import ShopperSimulator, background_photos
    from lookalike.serving.preprocessing import ImageError, Preprocessor

    simulator = ShopperSimulator(background_photos())
    catalog, query = Preprocessor(catalog_side), Preprocessor(query_side)
    gallery, photos = [], []
    rng = random.Random(seed)
    for data in packshots:
        try:
            pixels = catalog(data)
            with Image.open(io.BytesIO(data)) as image:
                photo = simulator(image.convert("RGBA"), rng.randrange(1 << 30)).jpeg()
            photos.append(query(photo))
            gallery.append(pixels)
        except ImageError:
            continue
    if len(gallery) < 20:
        raise QuantizationError(f"the retrieval check needs at least 20 catalog images that decode, got {len(gallery)}")
    both = np.concatenate([np.stack(gallery), np.stack(photos)])  # one session and one pass per model
    fp32, int8 = (recall_at_1(*np.split(embed(path, both), 2)) for path in (fp32_onnx, int8_onnx))
    return {"products": len(gallery), "recall_at_1_fp32": fp32, "recall_at_1_int8": int8,
            "max_recall_loss": MAX_RECALL_LOSS}


def gate_int8(cosine: dict[str, Any], retrieval: dict[str, Any], what: str) -> None:
    if not cosine["mean_cosine"] >= MIN_COSINE_INT8:
        raise QuantizationError(f"{what}: INT8 fails its gate: mean cosine to FP32 {cosine['mean_cosine']:.4f} "
                                f"< {MIN_COSINE_INT8} on {cosine['images']} images")
    loss = retrieval["recall_at_1_fp32"] - retrieval["recall_at_1_int8"]
    if loss > MAX_RECALL_LOSS + 1.0 / retrieval["products"]:  # one query's worth of slack on a small check
        raise QuantizationError(f"{what}: INT8 fails its gate: recall@1 {retrieval['recall_at_1_int8']:.3f} against "
                                f"FP32's {retrieval['recall_at_1_fp32']:.3f} on {retrieval['products']} products "
                                f"(loss {loss:.3f} > {MAX_RECALL_LOSS})")
