"""FP16 by strong typing: an FP16-typed ONNX made from the checked FP32 ONNX, which TensorRT builds a
strongly typed engine from (no `BuilderFlag.FP16`, deprecated in TensorRT 10.12, and no per-layer
precision pins). The file is made where the engine is built, from the host's `model.onnx`, so that file
(and the embedder's fingerprint) never changes; it is a build input, not a served model.

The typing pass is our own, about a hundred lines over the `onnx` package, after trying both usual
tools: Model Optimizer's AutoCast (`nvidia-modelopt[onnx]`) pulls in torch, CuPy, onnxruntime-gpu and
numpy 2 (`pip install --dry-run`), which the serving venv cannot take (the Python backend's stub needs
numpy < 2); onnxconverter-common 1.16's `convert_float_to_float16`, given the head below as its block
list, cast each kept node's output back to FP16 before the next kept node and typed the graph output
FP16 despite `keep_io_types` (seen on the Lite0 export). AutoCast's idea is kept: the graph's inputs
and outputs stay FP32 (the Triton config is unchanged), weights become FP16 (clamped to its range, the
count recorded), a Cast is inserted wherever an FP16 node meets an FP32 one, and the numerically
sensitive nodes stay FP32, chosen by rule:

- normalisations, softmax, reductions, powers, square roots and exponentials (`FP32_OP_TYPES`), and
  divisions by a computed tensor (a division by a constant or a shape, like GELU's by sqrt 2 or
  attention's by sqrt(head dim), stays FP16):
  LayerNorm and attention softmax in the transformers, GeM's x^p and mean, the L2 norm of the embedding;
- every node downstream of those whose float inputs are all FP32 (`fp32_nodes`), up to the next
  Conv/MatMul/Gemm: so the whole head after pooling (flatten, the norm's clamp and expand, the
  division) stays FP32 and the embedding is unit-length in FP32.

Gated twice: here in ONNX Runtime against the FP32 file (cheap, on the CPU: ONNX Runtime's CPU
provider runs FP16 nodes that have no FP16 kernel in FP32 behind inserted casts, so this covers the
FP16 weights and the rewired graph, not FP16 arithmetic), then the engine against the FP32 ONNX at
`MIN_COSINE["fp16"]` at batch 1, opt and max on the GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .parity import ParityError, compare, gate

FP32_OP_TYPES = ("LayerNormalization", "GroupNormalization", "InstanceNormalization", "BatchNormalization",
                 "Softmax", "LogSoftmax", "ReduceMean", "ReduceSum", "ReduceL2", "ReduceMax",
                 "GlobalAveragePool", "Pow", "Sqrt", "Reciprocal", "Exp", "Log",
                 # inputs ONNX types FP32 whatever the data (scales, ranges), as onnxconverter-common blocks
                 "Resize", "Upsample", "Range", "CumSum", "TopK", "RoiAlign", "NonMaxSuppression")
# Where FP32 stops propagating downstream: the layers FP16 is for.
COMPUTE_OP_TYPES = ("Conv", "ConvTranspose", "MatMul", "Gemm")


class Fp16Error(RuntimeError):
    """The FP16 file could not be made, or failed its check."""


def name_nodes(model: Any) -> None:
    """Gives every unnamed node a unique name (the converter's block list is by name)."""
    taken = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def fp32_nodes(model: Any, types: dict[str, int] | None = None) -> list[str]:
    """Names of the nodes kept in FP32 (see the module docstring), in graph (topological) order.
    `types`: `_elem_types(model)`, when the caller has it already."""
    from onnx import TensorProto

    floating = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)
    types = _elem_types(model) if types is None else types
    integer = {name for name, elem in types.items() if elem not in floating}
    # Known without the input's values: weights, constants, shapes and what is computed from them only
    # (a transformer's 1/sqrt(head dim)); a node on those alone is not numerically sensitive.
    static = {init.name for init in model.graph.initializer}
    fp32_tensors: set[str] = set()
    keep: list[str] = []
    for node in model.graph.node:
        if node.op_type == "Shape" or all(not x or x in static for x in node.input):
            static.update(node.output)
        if node.op_type == "Constant":
            continue
        data = [x for x in node.input if x and x not in static and x not in integer]
        by_type = bool(data) and (node.op_type in FP32_OP_TYPES or (
            node.op_type == "Div" and len(node.input) > 1 and node.input[1] not in static))
        downstream = (node.op_type not in COMPUTE_OP_TYPES and bool(data)
                      and all(x in fp32_tensors for x in data))
        if by_type or downstream:
            keep.append(node.name)
            fp32_tensors.update(node.output)
    return keep


def convert_fp16(fp32_onnx: Path, out: Path) -> dict[str, Any]:
    """Writes the FP16-typed ONNX of `fp32_onnx` to `out` (FP32 inputs and outputs, `fp32_nodes` kept
    FP32); returns what the manifest records about it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(fp32_onnx))
    graph = model.graph
    name_nodes(model)
    _constants_to_initializers(graph)
    types = _elem_types(model)
    keep = set(fp32_nodes(model, types))
    original_nodes = len(graph.node)
    original_casts = sum(n.op_type == "Cast" for n in graph.node)
    FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
    initializers = {init.name: init for init in graph.initializer}
    outputs = {o.name for o in graph.output}
    typed: dict[str, int] = {i.name: FLOAT for i in graph.input}  # float tensors: their type in the new graph
    half_copies: dict[str, str] = {}
    casts: dict[tuple[str, int], str] = {}
    renamed: dict[str, str] = {}
    nodes: list[Any] = []
    clamped = 0

    def half_copy(name: str) -> str:
        nonlocal clamped
        if name not in half_copies:
            values = numpy_helper.to_array(initializers[name])
            finite = np.finfo(np.float16).max
            clamped += int(np.count_nonzero(np.abs(values) > finite))
            half = numpy_helper.from_array(np.clip(values, -finite, finite).astype(np.float16), f"{name}_fp16")
            graph.initializer.append(half)
            half_copies[name] = half.name
        return half_copies[name]

    def cast(name: str, to: int) -> str:
        if (name, to) not in casts:
            target = f"{name}_as_{'fp16' if to == HALF else 'fp32'}"
            nodes.append(helper.make_node("Cast", [name], [target], name=f"{target}_cast", to=to))
            casts[(name, to)] = target
        return casts[(name, to)]

    for node in graph.node:
        want = FLOAT if node.name in keep else HALF
        for i, name in enumerate(node.input):
            name = renamed.get(name, name)
            node.input[i] = name
            if not name or types.get(name) != FLOAT:
                continue  # absent, or not a float tensor (shapes, indices)
            if name in initializers:
                if want == HALF:
                    node.input[i] = half_copy(name)
            elif typed[name] != want:
                node.input[i] = cast(name, want)
        if want == HALF:
            for attribute in node.attribute:
                if node.op_type == "Cast" and attribute.name == "to" and attribute.i == FLOAT:
                    attribute.i = HALF
                elif attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == FLOAT:
                    attribute.t.CopyFrom(numpy_helper.from_array(
                        numpy_helper.to_array(attribute.t).astype(np.float16), attribute.t.name))
        nodes.append(node)
        for j, name in enumerate(node.output):
            if types.get(name) != FLOAT:
                continue
            typed[name] = want
            if name in outputs and want == HALF:  # a graph output stays FP32: cast it back
                node.output[j] = renamed[name] = f"{name}_fp16"
                typed[renamed[name]] = HALF
                nodes.append(helper.make_node("Cast", [renamed[name]], [name], name=f"{name}_to_fp32", to=FLOAT))
    del graph.node[:]
    graph.node.extend(nodes)
    used = {x for n in graph.node for x in n.input}
    kept_initializers = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept_initializers)
    del graph.value_info[:]  # the FP32 types are stale: the checker infers them again
    onnx.save(model, str(out))
    try:
        onnx.checker.check_model(str(out), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise Fp16Error(f"the FP16 ONNX of {fp32_onnx} is invalid: {exc}") from None
    if not half_copies:
        raise Fp16Error(f"{fp32_onnx}: no weight became FP16 (nothing for an FP16 engine to run)")
    if any(v.type.tensor_type.elem_type != FLOAT for v in [*graph.input, *graph.output]):
        raise Fp16Error(f"{fp32_onnx}: the FP16 file's inputs and outputs must stay FP32")
    return {
        "format": "onnx-fp16",
        "tool": "lookalike_export.fp16 (FP32 inputs, outputs and sensitive nodes; FP16 elsewhere)",
        "nodes": original_nodes,
        "fp32_nodes": len(keep),
        "casts_inserted": sum(n.op_type == "Cast" for n in graph.node) - original_casts,
        "fp16_weights": len(half_copies),
        "weights_clamped_to_fp16_range": clamped,
    }


def _constants_to_initializers(graph: Any) -> None:
    """Float `Constant` nodes become initializers, so weights are handled in one place."""
    from onnx import TensorProto

    nodes = []
    for node in graph.node:
        value = [a for a in node.attribute if a.name == "value"]
        if node.op_type == "Constant" and value and value[0].t.data_type == TensorProto.FLOAT:
            tensor = graph.initializer.add()
            tensor.CopyFrom(value[0].t)
            tensor.name = node.output[0]
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def _elem_types(model: Any) -> dict[str, int]:
    """Element type of every tensor of `model` (ONNX shape inference, initializers, inputs)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    types.update({init.name: init.data_type for init in model.graph.initializer})
    return types


def check_fp16(fp32_onnx: Path, fp16_onnx: Path, pixels: np.ndarray, what: str) -> dict[str, Any]:
    """The FP16 file against the FP32 one in ONNX Runtime on `pixels`, gated at MIN_COSINE["fp16"]."""
    from lookalike.serving.embedding import OnnxEmbedder

    reference = OnnxEmbedder(fp32_onnx, providers=["CPUExecutionProvider"])(pixels)
    candidate = OnnxEmbedder(fp16_onnx, providers=["CPUExecutionProvider"])(pixels)
    try:
        return gate(compare(reference, candidate), "fp16", f"{what}: the FP16 ONNX (vs FP32, ONNX Runtime)")
    except ParityError as exc:
        raise Fp16Error(str(exc)) from None
