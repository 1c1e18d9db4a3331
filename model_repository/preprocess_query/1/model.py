"""Triton adapter of `lookalike.serving.query_views`: IMAGE bytes -> EMBEDDING [V x D], the query views of each
shopper photo embedded (visual_search's first step).

Each request's photos are decoded and cut into their views on their own (a bad image fails its own
request with INVALID_ARG, never the other requests of the dynamic batch); then the views of all valid
requests go to `embedder` together, as one BLS request per `embedder_max_batch_size` rows, which the
embedder's dynamic batcher batches further with the other instances' calls. An embedder that does not
answer (unloaded, reloading, the server shutting down) is UNAVAILABLE for that batch, which clients retry.
No exception escapes `execute` (`lookalike.serving.adapter`).
"""

from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from lookalike.serving.adapter import model_parameters, request_inputs, required, responses, run_together
from lookalike.serving.preprocessing import ImageError, ImageLimits, PreprocessConfig
from lookalike.serving.query_views import EmbedderUnavailableError, ViewPreprocessor, embed_views, views_enabled
from lookalike_client import contract as c


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        preprocessing_file = (Path(args["model_repository"]) / params["preprocessing_file"]).resolve()
        limits = ImageLimits.from_parameters(params)
        self.views = ViewPreprocessor(PreprocessConfig.load(preprocessing_file), limits,
                                      enabled=views_enabled(params.get("query_views", "on")))
        self.max_batch = int(params["embedder_max_batch_size"])
        pb_utils.Logger.log_info(f"{args['model_name']}: {self.views.describe()} ({preprocessing_file}), "
                                 f"{self.views.fusion} fusion in product_search, {limits}")

    def _embed(self, pixels: np.ndarray) -> np.ndarray:
        request = pb_utils.InferenceRequest(model_name=c.EMBEDDER_MODEL, requested_output_names=[c.EMBEDDING],
                                            inputs=[pb_utils.Tensor(c.PIXELS, pixels)])
        response = request.exec()
        error = response.error() if response.has_error() else None
        if error is not None:
            raise EmbedderUnavailableError(f"{c.EMBEDDER_MODEL}: {error.message()}")
        embedding = pb_utils.get_output_tensor_by_name(response, c.EMBEDDING)
        if embedding is None:
            raise RuntimeError(f"{c.EMBEDDER_MODEL}: no {c.EMBEDDING} in its answer")
        return embedding.as_numpy()

    def execute(self, requests):
        outcomes = run_together(
            [request_inputs(pb_utils, r, [c.IMAGE]) for r in requests],
            parse=lambda inputs: self.views.batch(required(inputs, c.IMAGE).reshape(-1).tolist()),
            compute=lambda pixels: [{c.EMBEDDING: e} for e in embed_views(pixels, self._embed, self.max_batch)],
            what="preprocess_query", log=pb_utils.Logger.log_error, refuse=(ImageError,),
            unavailable=(EmbedderUnavailableError,),
        )
        return responses(pb_utils, outcomes)
