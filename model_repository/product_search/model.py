"""Triton adapter of `lookalike.search.ProductIndex`: EMBEDDING (+ optional TOP_K) -> PRODUCT_IDS, SCORES.

This file is the source; `lookalike index` copies it into every version directory beside the index
it serves, so a version is self-contained. Each request is checked on its own and gets its own
error; the valid requests of a dynamic batch are searched together by `lookalike.serving`, which
keeps every request's result independent of the others.
"""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from lookalike.search import ProductIndex, set_threads
from lookalike.serving import DEFAULT_NORM_TOLERANCE, SearchRequest, check_embeddings, resolve_top_k, search_requests
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
        self.norm_tolerance = float(params.get("embedding_norm_tolerance", DEFAULT_NORM_TOLERANCE))
        pb_utils.Logger.log_info(f"product_search: version {args['model_version']}, {len(self.index)} products")

    def execute(self, requests):
        responses = [None] * len(requests)
        valid, searches = [], []
        for i, request in enumerate(requests):
            try:
                embedding = check_embeddings(pb_utils.get_input_tensor_by_name(request, c.EMBEDDING).as_numpy(),
                                             self.index.dim, self.norm_tolerance)
                top_k = pb_utils.get_input_tensor_by_name(request, c.TOP_K)
                k = resolve_top_k(None if top_k is None else top_k.as_numpy(), len(embedding))
            except ValueError as exc:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG))
                continue
            valid.append(i)
            searches.append(SearchRequest(embedding, k))
        try:
            results = search_requests(self.index, searches)
        except Exception as exc:  # never let an exception take the batch or the stub down
            pb_utils.Logger.log_error(f"product_search: search failed: {type(exc).__name__}: {exc}")
            for i in valid:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"search failed: {exc}"))
            return responses
        for i, result in zip(valid, results):
            responses[i] = pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(c.PRODUCT_IDS, result.product_ids), pb_utils.Tensor(c.SCORES, result.scores)])
        return responses
