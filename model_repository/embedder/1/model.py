"""Triton adapter of `lookalike.embedding.OnnxEmbedder`: ONNX Runtime inside a Python-backend model.

This variant exists because the tritonserver of the nvidia-pytriton wheel has only the Python
backend. In the NGC tritonserver image the same directory is served by the `onnxruntime` backend
(configs/onnxruntime.pbtxt, selected with --model-config-name=onnxruntime) and this file is unused.
All requests of a dynamic batch run as one ONNX Runtime call.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from lookalike.embedding import OnnxEmbedder
from lookalike_client import contract as c


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.embedder = OnnxEmbedder(version_dir / params["onnx_file"], intra_op_threads=int(params["intra_op_threads"]))
        manifest = Path(args["model_repository"]) / "manifest.json"
        if manifest.exists() and json.loads(manifest.read_text()).get("random_weights"):
            pb_utils.Logger.log_warn("embedder: serving RANDOM weights (exported for tests): results are meaningless")

    def execute(self, requests):
        try:
            batches = [pb_utils.get_input_tensor_by_name(r, c.PIXELS).as_numpy() for r in requests]
            embeddings = self.embedder(np.concatenate(batches) if len(batches) > 1 else batches[0])
        except Exception as exc:
            error = pb_utils.TritonError(f"embedder failed: {exc}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        responses, start = [], 0
        for batch in batches:
            part = embeddings[start : start + len(batch)]
            start += len(batch)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(c.EMBEDDING, part)]))
        return responses
