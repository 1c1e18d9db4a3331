"""Triton adapter of `lookalike.serving.preprocessing`: IMAGE bytes -> PIXELS, one response per request.

Serves both `preprocess` (catalog side: `embed_image`, indexing) and `preprocess_query` (shopper
photos: `visual_search`, whose 1/model.py links here); the `side` parameter picks the settings.

A bad image fails its own request (INVALID_ARG), never the other requests of the dynamic batch, and
no exception escapes `execute` (`lookalike.serving.adapter`), so the stub cannot be brought down by an upload.
"""

from pathlib import Path

import triton_python_backend_utils as pb_utils

from lookalike.serving.adapter import model_parameters, request_inputs, required, responses, run_each
from lookalike.serving.preprocessing import ImageError, ImageLimits, PreprocessConfig, Preprocessor
from lookalike_client import contract as c


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        preprocessing_file = (Path(args["model_repository"]) / params["preprocessing_file"]).resolve()
        limits = ImageLimits.from_parameters(params)
        side = params.get("side", "catalog")
        self.preprocessor = Preprocessor(PreprocessConfig.load(preprocessing_file).for_side(side), limits)
        settings = {k: v for k, v in self.preprocessor.config.to_dict().items() if k not in ("notes", "query")}
        pb_utils.Logger.log_info(f"{args['model_name']}: {side} side of {preprocessing_file} {settings} {limits}")

    def execute(self, requests):
        outcomes = run_each(
            [request_inputs(pb_utils, r, [c.IMAGE]) for r in requests],
            lambda inputs: {c.PIXELS: self.preprocessor.batch(required(inputs, c.IMAGE).reshape(-1).tolist())},
            what="preprocess", log=pb_utils.Logger.log_error, refuse=(ImageError,),
        )
        return responses(pb_utils, outcomes)
