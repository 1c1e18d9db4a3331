"""Triton adapter of `lookalike.search.ProductIndex`: EMBEDDING (+ optional TOP_K) -> PRODUCT_IDS, SCORES.

This file is the source; `lookalike index` copies it into every version directory beside the index
it serves, so a version is self-contained. All requests of a dynamic batch share one FAISS search.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from lookalike.search import ProductIndex, set_threads
from lookalike.serving import resolve_top_k
from lookalike_client import contract as c


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        model_dir = Path(args["model_repository"])
        set_threads(int(params.get("faiss_threads", "0")))
        use_gpu = params.get("faiss_device", "auto") in ("auto", "gpu") and args.get("model_instance_kind") != "CPU"
        self.index = ProductIndex.load(
            model_dir / args["model_version"], use_gpu=use_gpu, gpu_device=int(args.get("model_instance_device_id", 0))
        )
        manifest_path = (model_dir / params["embedder_manifest"]).resolve()
        expected = json.loads(manifest_path.read_text())["fingerprint"]
        if self.index.fingerprint != expected:
            raise pb_utils.TritonModelException(
                f"index version {args['model_version']} was built with embedder {self.index.fingerprint or '?'}, "
                f"but the embedder is {expected}: run `lookalike index` again"
            )
        pb_utils.Logger.log_info(f"product_search: version {args['model_version']}, {len(self.index)} products")

    def execute(self, requests):
        responses = [None] * len(requests)
        queries, spans, ks = [], [], []
        for i, request in enumerate(requests):
            try:
                embedding = pb_utils.get_input_tensor_by_name(request, c.EMBEDDING).as_numpy()
                if embedding.ndim != 2 or embedding.shape[1] != self.index.dim:
                    raise ValueError(f"EMBEDDING must be [N, {self.index.dim}], got {list(embedding.shape)}")
                top_k = pb_utils.get_input_tensor_by_name(request, c.TOP_K)
                k = resolve_top_k(None if top_k is None else top_k.as_numpy(), len(embedding))
            except ValueError as exc:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG))
                continue
            spans.append((i, sum(len(q) for q in queries), len(embedding)))
            queries.append(embedding)
            ks.append(k)
        if queries:
            try:
                ids, scores = self.index.search(np.concatenate(queries), max(ks))
            except Exception as exc:
                ids, scores = None, exc
            for (i, start, count), k in zip(spans, ks):
                if ids is None:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"search failed: {scores}"))
                    continue
                rows = ids[start : start + count]
                out_ids = np.array([[pid.encode() for pid in row[:k]] for row in rows], dtype=np.object_)
                out_ids = out_ids.reshape(count, -1)
                out_scores = np.ascontiguousarray(scores[start : start + count, :k])
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(c.PRODUCT_IDS, out_ids), pb_utils.Tensor(c.SCORES, out_scores)]
                )
        return responses
