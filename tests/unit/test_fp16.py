"""The FP16 typing pass (export/fp16.py) on small hand-made graphs: which nodes stay FP32, where casts
go, and that the file computes what the FP32 one does. The exported backbones are covered in
tests/export/test_export.py."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lookalike_export.fp16 import Fp16Error, convert_fp16, fp32_nodes, name_nodes


def head_graph(path, *, dim: int = 8) -> None:
    """x [N, 3, 8, 8] -> Conv -> Relu -> Div by a constant -> GlobalAveragePool -> Flatten -> the L2 norm
    (ReduceL2, Clip, Expand, Div) -> y [N, dim]: the shape of our embedders' heads."""
    rng = np.random.default_rng(0)
    init = [
        numpy_helper.from_array(rng.normal(size=(dim, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(size=(dim,)).astype(np.float32), "b"),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array(1e-12, np.float32), "eps"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("Div", ["relu", "two"], ["half"], name="scale"),  # by a constant: stays FP16
        helper.make_node("GlobalAveragePool", ["half"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("ReduceL2", ["flat"], ["norm"], keepdims=1, axes=[1]),
        helper.make_node("Clip", ["norm", "eps"], ["clamped"]),
        helper.make_node("Shape", ["flat"], ["shape"]),
        helper.make_node("Expand", ["clamped", "shape"], ["denominator"]),
        helper.make_node("Div", ["flat", "denominator"], ["y"], name="normalise"),
    ]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", dim])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, str(path))


def node_types(path):
    """op type -> [element type of each input] of a converted file, from ONNX shape inference."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input]}
    types |= {i.name: i.data_type for i in model.graph.initializer}
    return model, {n.name or n.op_type: [types.get(x) for x in n.input if x] for n in model.graph.node}


def test_the_head_after_pooling_stays_fp32_and_the_body_becomes_fp16(tmp_path):
    head_graph(tmp_path / "fp32.onnx")
    model = onnx.load(str(tmp_path / "fp32.onnx"))
    name_nodes(model)
    kept = {next(n.op_type for n in model.graph.node if n.name == name) for name in fp32_nodes(model)}
    assert kept == {"GlobalAveragePool", "Flatten", "ReduceL2", "Clip", "Shape", "Expand", "Div"}
    assert "scale" not in fp32_nodes(model)  # Div by a constant is not the norm's division

    report = convert_fp16(tmp_path / "fp32.onnx", tmp_path / "fp16.onnx")
    converted, inputs = node_types(tmp_path / "fp16.onnx")
    FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
    assert [v.type.tensor_type.elem_type for v in [*converted.graph.input, *converted.graph.output]] == [FLOAT, FLOAT]
    conv = next(n for n in converted.graph.node if n.op_type == "Conv")
    assert inputs[conv.name] == [HALF, HALF, HALF]  # activations and weights
    assert inputs["normalise"] == [FLOAT, FLOAT] and inputs["scale"] == [HALF, HALF]
    # one cast in (x to FP16), one where the FP16 body meets the FP32 head; none back and forth
    assert report["casts_inserted"] == 2 and sum(n.op_type == "Cast" for n in converted.graph.node) == 2
    assert report["fp16_weights"] == 3 and report["fp32_nodes"] == 7

    x = np.random.default_rng(1).normal(size=(4, 3, 8, 8)).astype(np.float32)
    want = ort.InferenceSession(str(tmp_path / "fp32.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(tmp_path / "fp16.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)  # normalised in FP32


def test_weights_beyond_fp16_are_clamped_and_counted(tmp_path):
    head_graph(tmp_path / "fp32.onnx")
    model = onnx.load(str(tmp_path / "fp32.onnx"))
    w = next(i for i in model.graph.initializer if i.name == "w")
    values = numpy_helper.to_array(w).copy()
    values.flat[:3] = [1e6, -1e6, 7e4]
    w.CopyFrom(numpy_helper.from_array(values, "w"))
    onnx.save(model, str(tmp_path / "fp32.onnx"))
    report = convert_fp16(tmp_path / "fp32.onnx", tmp_path / "fp16.onnx")
    assert report["weights_clamped_to_fp16_range"] == 3
    half = next(i for i in onnx.load(str(tmp_path / "fp16.onnx")).graph.initializer if i.name == "w_fp16")
    assert np.isfinite(numpy_helper.to_array(half)).all()


def test_a_graph_with_nothing_to_run_in_fp16_is_refused(tmp_path):
    graph = helper.make_graph([helper.make_node("ReduceL2", ["x"], ["y"], keepdims=0)], "only_a_norm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(tmp_path / "norm.onnx"))
    with pytest.raises(Fp16Error, match="no weight became FP16"):
        convert_fp16(tmp_path / "norm.onnx", tmp_path / "out.onnx")
