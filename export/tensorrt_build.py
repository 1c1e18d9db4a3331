"""ONNX embedder -> TensorRT engine (`model.plan`), gated on cosine similarity against ONNX Runtime.

Runs where TensorRT 10 and a CUDA GPU are (NGC's TensorRT image: `make engine`). Nothing here runs on
the CPU machines of this project; CI type-checks every TensorRT call against `tensorrt-stubs` with
pyright, and checks that none is one the stubs mark deprecated. Engines are not portable across
TensorRT versions or GPU architectures, so the manifest records the TensorRT version, the GPU name and
its compute capability.

- Builder + network from the ONNX parser, one optimisation profile min 1 / opt / max = max_batch_size
  (Triton may batch up to max_batch_size).
- Every network is strongly typed: TensorRT takes the precisions the ONNX states, with no precision
  flags (`BuilderFlag.FP16`/`INT8` are deprecated since 10.12/10.1) and no per-layer pins.
  - fp32: the FP32 ONNX; TF32 off unless asked (`allow_tf32`), so an "fp32" engine computes in FP32.
  - fp16: the FP16-typed ONNX of `fp16.py` (normalisations, softmax, reductions and the head FP32).
  - int8: the Q/DQ ONNX of `quantize.py` (gated in ONNX Runtime); no calibrator (implicit calibration
    is deprecated since 10.1).
  The parsed network is checked against the precision asked for (Q/DQ layers for int8, FP16 tensors
  for fp16, neither for fp32).
- The timing cache lives in `cache_dir` (the embedder's `tensorrt-cache/`, kept between builds), one
  file per TensorRT version and GPU; a cache TensorRT refuses is reported and rebuilt.
- Gate (`engine.py`): mean cosine vs ONNX Runtime >= MIN_COSINE[precision] at batch 1, opt and max,
  else nothing is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import tensorrt as trt
import torch

from lookalike_client import contract as c

from .parity import MIN_COSINE, ParityError, compare, gate


class EngineBuildError(RuntimeError):
    pass


# Deprecated TensorRT APIs this module still uses (the test of deprecated calls allows them): none.
DEPRECATED_ALLOWED = ()


def cuda_available() -> bool:
    return torch.cuda.is_available()


def _parse(builder: trt.Builder, onnx_path: Path, logger: trt.ILogger) -> tuple[trt.INetworkDefinition, trt.OnnxParser]:
    # explicit batch is the only mode in TensorRT 10; strongly typed: the ONNX's types are the engine's
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"ONNX parser failed on {onnx_path}: {errors}")
    return network, parser


def network_precision(network: trt.INetworkDefinition) -> str:
    """int8 when the network has Q/DQ layers, fp16 when a layer computes an FP16 tensor, else fp32."""
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    if any(layer.type == trt.LayerType.QUANTIZE for layer in layers):
        return "int8"
    if any(layer.get_output(j).dtype == trt.DataType.HALF for layer in layers for j in range(layer.num_outputs)):
        return "fp16"
    return "fp32"


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
    allow_tf32: bool = False,
    workspace_bytes: int = 4 << 30,
    log: Callable[[str], None] = print,
) -> dict:
    """Builds and writes the engine; returns what the manifest records about it. `onnx_path` states the
    precision: FP32, FP16-typed (export/fp16.py) or Q/DQ INT8 (export/quantize.py)."""
    if precision not in MIN_COSINE:
        raise ValueError(f"precision must be one of {tuple(MIN_COSINE)}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = _parse(builder, onnx_path, logger)
    stated = network_precision(network)
    if stated != precision:
        source = {"int8": "quantize.py's Q/DQ ONNX", "fp16": "fp16.py's FP16-typed ONNX", "fp32": "the FP32 ONNX"}
        raise EngineBuildError(f"{onnx_path} is a {stated} network: {precision} engines are built from {source[precision]}")
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
        "strongly_typed": True,
        "tf32": allow_tf32,
        "tensorrt": trt.__version__,
        "gpu": torch.cuda.get_device_name(),
        "compute_capability": f"{major}.{minor}",
        "profile": {"min": 1, "opt": opt, "max": max_batch_size},
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


def cosine_gate(reference: np.ndarray, candidate: np.ndarray, precision: str, what: str = "") -> dict:
    """The engine's outputs against ONNX Runtime's on the same pixels, gated at MIN_COSINE[precision]."""
    try:
        return gate(compare(reference, candidate), precision, f"the {precision} engine (vs ONNX){what}")
    except ParityError as exc:
        raise EngineBuildError(str(exc)) from None
