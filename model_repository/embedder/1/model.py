"""Triton adapter of `lookalike.serving.embedding.OnnxEmbedder`: ONNX Runtime inside a Python-backend model.

This variant exists because the tritonserver of the nvidia-pytriton wheel has only the Python
backend. In the NGC tritonserver image the same directory is served by the `onnxruntime` backend
(configs/onnxruntime.pbtxt, selected with --model-config-name=onnxruntime) and this file is unused.
All requests of a dynamic batch run as one ONNX Runtime call (`lookalike.serving.adapter`).
"""

from pathlib import Path

import triton_python_backend_utils as pb_utils

from lookalike.serving.adapter import model_parameters, request_inputs, required, responses, rows_together, run_together
from lookalike.serving.artifacts import MANIFEST_FILE, EmbedderManifest
from lookalike.serving.embedding import OnnxEmbedder
from lookalike_client import contract as c


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        model_dir = Path(args["model_repository"])
        self.embedder = OnnxEmbedder(model_dir / args["model_version"] / params["onnx_file"],
                                     intra_op_threads=int(params["intra_op_threads"]),
                                     spin=params.get("spin_wait", "false").lower() == "true")
        if (model_dir / MANIFEST_FILE).exists() and EmbedderManifest.load(model_dir / MANIFEST_FILE).random_weights:
            pb_utils.Logger.log_warn("embedder: serving RANDOM weights (exported for tests): results are meaningless")

    def execute(self, requests):
        outcomes = run_together(
            [request_inputs(pb_utils, r, [c.PIXELS]) for r in requests],
            parse=lambda inputs: required(inputs, c.PIXELS),
            compute=lambda batches: [{c.EMBEDDING: e} for e in rows_together(batches, self.embedder)],
            what="embedder", log=pb_utils.Logger.log_error,
        )
        return responses(pb_utils, outcomes)
