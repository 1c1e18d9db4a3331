"""ONNX embedder -> TensorRT engine (`model.plan`), gated on cosine similarity against ONNX Runtime.

Runs where TensorRT 10 and a CUDA GPU are (NGC's TensorRT image: `make engine`). Nothing here runs on
the CPU machines of this project; CI type-checks every TensorRT call against `tensorrt-stubs` with
pyright. Engines are not portable across TensorRT versions or GPU architectures, so the manifest
records the TensorRT version, the GPU name and its compute capability.

- Builder + network from the ONNX parser, one optimisation profile min 1 / opt / max = max_batch_size
  (Triton may batch up to max_batch_size), a timing cache kept beside the engine for faster rebuilds.
- FP16: for ViT, LayerNorm, softmax and the final L2 normalisation are pinned to FP32 (layer precision
  constraints, obeyed), since in FP16 they overflow and silently lose accuracy.
- INT8: entropy calibration (IInt8EntropyCalibrator2) on catalog images through our own preprocessing;
  the calibration cache is saved and reused.
- Gate: mean cosine vs the ONNX output >= 0.999 (FP16) or 0.99 (INT8), else nothing is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import tensorrt as trt
import torch

from lookalike_client import contract as c

from .parity import MIN_COSINE, ParityError, compare, gate

# Layer types kept in FP32 in reduced-precision engines of transformer models.
FP32_LAYER_TYPES = (trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX, trt.LayerType.REDUCE)


class EngineBuildError(RuntimeError):
    pass


class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
    """Feeds preprocessed catalog images to TensorRT's INT8 calibration, one batch at a time."""

    def __init__(self, batches: Iterator[np.ndarray], batch_size: int, cache_file: Path) -> None:
        trt.IInt8EntropyCalibrator2.__init__(self)
        self._batches = batches
        self._batch_size = batch_size
        self._cache_file = cache_file
        self._device: torch.Tensor | None = None

    def get_batch_size(self) -> int:
        return self._batch_size

    # TensorRT ends calibration when get_batch returns None; the stubs type the result as list[int].
    def get_batch(self, names: list[str]) -> list[int] | None:  # pyright: ignore[reportIncompatibleMethodOverride]
        batch = next(self._batches, None)
        if batch is None:
            return None
        self._device = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).cuda()
        return [int(self._device.data_ptr())]

    def read_calibration_cache(self) -> bytes:
        return self._cache_file.read_bytes() if self._cache_file.exists() else b""

    def write_calibration_cache(self, cache: memoryview | bytes) -> None:
        self._cache_file.write_bytes(bytes(cache))


def _parse(builder: trt.Builder, onnx_path: Path, logger: trt.ILogger) -> tuple[trt.INetworkDefinition, trt.OnnxParser]:
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"ONNX parser failed on {onnx_path}: {errors}")
    return network, parser


def _pin_fp32(network: trt.INetworkDefinition) -> int:
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in FP32_LAYER_TYPES:
            layer.precision = trt.DataType.FLOAT
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.DataType.FLOAT)
            pinned += 1
    return pinned


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    *,
    height: int,
    width: int,
    precision: str,
    max_batch_size: int,
    opt_batch_size: int = 16,
    keep_fp32_norms: bool = False,
    calibration: Iterator[np.ndarray] | None = None,
    calibration_batch_size: int = 16,
    workspace_bytes: int = 4 << 30,
) -> dict:
    """Builds and writes the engine; returns what the manifest records about it."""
    if precision not in MIN_COSINE:
        raise ValueError(f"precision must be one of {tuple(MIN_COSINE)}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = _parse(builder, onnx_path, logger)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)

    profile = builder.create_optimization_profile()
    opt = max(1, min(opt_batch_size, max_batch_size))
    profile.set_shape(c.PIXELS, trt.Dims([1, 3, height, width]), trt.Dims([opt, 3, height, width]),
                      trt.Dims([max_batch_size, 3, height, width]))
    config.add_optimization_profile(profile)

    cache_path = plan_path.with_suffix(".timing-cache")
    timing_cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    config.set_timing_cache(timing_cache, ignore_mismatch=False)

    pinned = 0
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
        if keep_fp32_norms:
            pinned = _pin_fp32(network)
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    calibrator: EntropyCalibrator | None = None
    if precision == "int8":
        if calibration is None:
            raise EngineBuildError("INT8 needs calibration images (--calibration CATALOG)")
        config.set_flag(trt.BuilderFlag.INT8)
        calibrator = EntropyCalibrator(calibration, calibration_batch_size, plan_path.with_suffix(".calibration-cache"))
        config.int8_calibrator = calibrator
        calibration_profile = builder.create_optimization_profile()
        shape = trt.Dims([calibration_batch_size, 3, height, width])
        calibration_profile.set_shape(c.PIXELS, shape, shape, shape)
        config.set_calibration_profile(calibration_profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT could not build a {precision} engine from {onnx_path}")
    plan_path.write_bytes(bytes(memoryview(serialized)))
    cache_path.write_bytes(bytes(memoryview(timing_cache.serialize())))
    major, minor = torch.cuda.get_device_capability()
    return {
        "precision": precision,
        "tensorrt": trt.__version__,
        "gpu": torch.cuda.get_device_name(),
        "compute_capability": f"{major}.{minor}",
        "profile": {"min": 1, "opt": opt, "max": max_batch_size},
        "fp32_layers": pinned,
        "calibration_cache": calibrator is not None,
    }


def run_engine(plan_path: Path, pixels: np.ndarray) -> np.ndarray:
    """Runs an engine on float32 [N, 3, H, W] pixels; returns [N, D]."""
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
    if engine is None:
        raise EngineBuildError(f"cannot deserialize {plan_path} (other TensorRT version or GPU?)")
    context = engine.create_execution_context()
    inputs = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).cuda()
    context.set_input_shape(c.PIXELS, tuple(inputs.shape))
    dim = int(engine.get_tensor_shape(c.EMBEDDING)[-1])
    outputs = torch.empty((inputs.shape[0], dim), dtype=torch.float32, device="cuda")
    context.set_tensor_address(c.PIXELS, int(inputs.data_ptr()))
    context.set_tensor_address(c.EMBEDDING, int(outputs.data_ptr()))
    stream = torch.cuda.Stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise EngineBuildError("TensorRT execution failed")
    stream.synchronize()
    return outputs.cpu().numpy()


def cosine_gate(reference: np.ndarray, candidate: np.ndarray, precision: str) -> dict:
    """The engine's outputs against ONNX Runtime's on the same pixels, gated at MIN_COSINE[precision]."""
    try:
        return gate(compare(reference, candidate), precision, f"the {precision} engine (vs ONNX)")
    except ParityError as exc:
        raise EngineBuildError(str(exc)) from None


def batches(pixels: Sequence[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Full batches only: the calibration profile has a fixed batch size."""
    for start in range(0, len(pixels) - batch_size + 1, batch_size):
        yield np.stack(pixels[start : start + batch_size])
