"""ONNX embedder -> TensorRT engine (`model.plan`), gated on cosine similarity against ONNX Runtime.

Runs where TensorRT 10 and a CUDA GPU are (NGC's TensorRT image: `make engine`). Nothing here runs on
the CPU machines of this project; CI type-checks every TensorRT call against `tensorrt-stubs` with
pyright, and checks that none is one the stubs mark deprecated. Engines are not portable across
TensorRT versions or GPU architectures, so the manifest records the TensorRT version, the GPU name and
its compute capability.

- Builder + network from the ONNX parser, one optimisation profile min 1 / opt / max = max_batch_size
  (Triton may batch up to max_batch_size).
- TF32 off unless asked (`allow_tf32`): an "fp32" engine computes in FP32.
- INT8: explicit quantization. The ONNX is the Q/DQ file of `quantize.py` (gated in ONNX Runtime);
  the network is strongly typed, so TensorRT takes the precisions the file states: no calibrator
  (implicit calibration is deprecated since TensorRT 10.1) and no precision flags.
- FP16: `BuilderFlag.FP16` with LayerNorm, softmax and reductions pinned to FP32 for ViT. Deprecated in
  TensorRT 10.12 (superseded by strongly typed FP16 networks): the one deprecated path left, named in
  `DEPRECATED_ALLOWED` and in issue 13.
- The timing cache lives in `cache_dir` (the embedder's `tensorrt-cache/`, kept between builds), one
  file per TensorRT version and GPU; a cache TensorRT refuses is reported and rebuilt.
- Gate: mean cosine vs ONNX Runtime >= MIN_COSINE[precision] at batch 1, opt and max, else nothing is
  written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import tensorrt as trt
import torch

from lookalike_client import contract as c

from .parity import MIN_COSINE, ParityError, compare, gate

# Layer types kept in FP32 in reduced-precision engines of transformer models.
FP32_LAYER_TYPES = (trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX, trt.LayerType.REDUCE)


class EngineBuildError(RuntimeError):
    pass


# Deprecated TensorRT APIs this module still uses, on purpose (the test of deprecated calls allows them).
# All of them are the FP16 path's (BuilderFlag.FP16 and the FP32 pins of ViT's norms), deprecated in 10.12.
DEPRECATED_ALLOWED = ("BuilderFlag.FP16", "BuilderFlag.OBEY_PRECISION_CONSTRAINTS", "set_output_type",
                      "ILayer.precision")


def _parse(builder: trt.Builder, onnx_path: Path, logger: trt.ILogger,
           strongly_typed: bool = False) -> tuple[trt.INetworkDefinition, trt.OnnxParser]:
    # explicit batch is the only mode in TensorRT 10; strongly typed: the ONNX's types are the engine's
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
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


def timing_cache_file(cache_dir: Path) -> Path:
    """This TensorRT's and this GPU's timing cache in `cache_dir`."""
    major, minor = torch.cuda.get_device_capability()
    gpu = "".join(ch if ch.isalnum() else "-" for ch in torch.cuda.get_device_name())
    return cache_dir / f"trt-{trt.__version__}-{gpu}-sm{major}{minor}.timing-cache"


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    *,
    height: int,
    width: int,
    precision: str,
    max_batch_size: int,
    cache_dir: Path,
    opt_batch_size: int = 16,
    keep_fp32_norms: bool = False,
    allow_tf32: bool = False,
    workspace_bytes: int = 4 << 30,
    log: Callable[[str], None] = print,
) -> dict:
    """Builds and writes the engine; returns what the manifest records about it. For "int8",
    `onnx_path` must be a Q/DQ ONNX (export/quantize.py)."""
    if precision not in MIN_COSINE:
        raise ValueError(f"precision must be one of {tuple(MIN_COSINE)}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = precision == "int8"
    network, _parser = _parse(builder, onnx_path, logger, strongly_typed=strongly_typed)
    if strongly_typed and not any(network.get_layer(i).type == trt.LayerType.QUANTIZE for i in range(network.num_layers)):
        raise EngineBuildError(f"{onnx_path} has no Q/DQ layers: INT8 engines are built from quantize.py's Q/DQ ONNX")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if not allow_tf32:
        config.clear_flag(trt.BuilderFlag.TF32)

    profile = builder.create_optimization_profile()
    opt = max(1, min(opt_batch_size, max_batch_size))
    profile.set_shape(c.PIXELS, trt.Dims([1, 3, height, width]), trt.Dims([opt, 3, height, width]),
                      trt.Dims([max_batch_size, 3, height, width]))
    config.add_optimization_profile(profile)

    cache_dir.mkdir(parents=True, exist_ok=True)
    cache_path = timing_cache_file(cache_dir)
    timing_cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    cache_reused = cache_path.exists()
    if not config.set_timing_cache(timing_cache, ignore_mismatch=False):
        log(f"tensorrt: the timing cache {cache_path} does not fit this TensorRT or GPU: rebuilding it")
        timing_cache = config.create_timing_cache(b"")
        cache_reused = False
        if not config.set_timing_cache(timing_cache, ignore_mismatch=False):
            raise EngineBuildError("TensorRT refused an empty timing cache")

    pinned = 0
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
        if keep_fp32_norms:
            pinned = _pin_fp32(network)
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT could not build a {precision} engine from {onnx_path}")
    plan_path.write_bytes(bytes(memoryview(serialized)))
    staged = cache_path.with_name(cache_path.name + ".tmp")
    staged.write_bytes(bytes(memoryview(timing_cache.serialize())))
    staged.replace(cache_path)
    major, minor = torch.cuda.get_device_capability()
    return {
        "precision": precision,
        "strongly_typed": strongly_typed,
        "tf32": allow_tf32,
        "tensorrt": trt.__version__,
        "gpu": torch.cuda.get_device_name(),
        "compute_capability": f"{major}.{minor}",
        "profile": {"min": 1, "opt": opt, "max": max_batch_size},
        "fp32_layers": pinned,
        "timing_cache": {"file": cache_path.name, "reused": cache_reused},
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
    if not context.set_input_shape(c.PIXELS, tuple(inputs.shape)):
        raise EngineBuildError(f"the engine refused input shape {list(inputs.shape)} (outside its profile?)")
    dim = int(engine.get_tensor_shape(c.EMBEDDING)[-1])
    outputs = torch.empty((inputs.shape[0], dim), dtype=torch.float32, device="cuda")
    context.set_tensor_address(c.PIXELS, int(inputs.data_ptr()))
    context.set_tensor_address(c.EMBEDDING, int(outputs.data_ptr()))
    stream = torch.cuda.Stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise EngineBuildError("TensorRT execution failed")
    stream.synchronize()
    return outputs.cpu().numpy()


def profile_batches(pixels: np.ndarray, opt: int, max_batch_size: int) -> list[np.ndarray]:
    """The gate's inputs at the profile's batch sizes 1, opt and max (the images repeated to fill)."""
    sizes = sorted({1, max(1, min(opt, max_batch_size)), max_batch_size})
    return [np.resize(pixels, (size, *pixels.shape[1:])).astype(np.float32) for size in sizes]


def cosine_gate(reference: np.ndarray, candidate: np.ndarray, precision: str, what: str = "") -> dict:
    """The engine's outputs against ONNX Runtime's on the same pixels, gated at MIN_COSINE[precision]."""
    try:
        return gate(compare(reference, candidate), precision, f"the {precision} engine (vs ONNX){what}")
    except ParityError as exc:
        raise EngineBuildError(str(exc)) from None
