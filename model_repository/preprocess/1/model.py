"""Triton adapter of `lookalike.preprocessing`: IMAGE bytes -> PIXELS, one response per request.

Serves both `preprocess` (catalog side: `embed_image`, indexing) and `preprocess_query` (shopper
photos: `visual_search`, whose 1/model.py links here); the `side` parameter picks the settings.

A bad image fails its own request (INVALID_ARG), never the other requests of the dynamic batch, and
no exception escapes `execute`, so the stub cannot be brought down by an upload.
"""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from lookalike.preprocessing import ImageError, ImageLimits, PreprocessConfig, Preprocessor
from lookalike_client import contract as c


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        model_dir = Path(args["model_repository"])
        preprocessing_file = (model_dir / params["preprocessing_file"]).resolve()
        limits = ImageLimits.from_parameters(params)
        side = params.get("side", "catalog")
        self.preprocessor = Preprocessor(PreprocessConfig.load(preprocessing_file).for_side(side), limits)
        self.logger = pb_utils.Logger
        settings = {k: v for k, v in self.preprocessor.config.to_dict().items() if k not in ("notes", "query")}
        self.logger.log_info(f"{args['model_name']}: {side} side of {preprocessing_file} {settings} {limits}")

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                images = pb_utils.get_input_tensor_by_name(request, c.IMAGE).as_numpy()
                pixels = self.preprocessor.batch(images.reshape(-1).tolist())
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(c.PIXELS, pixels)]))
            except ImageError as exc:
                error = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
            except Exception as exc:  # never let one request take down the batch or the stub
                self.logger.log_error(f"preprocess: unexpected {type(exc).__name__}: {exc}")
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"preprocess failed: {exc}")))
        return responses
