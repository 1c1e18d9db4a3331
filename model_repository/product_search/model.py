"""Triton adapter of `lookalike.serving.product_search.ProductSearch`: EMBEDDING (visual_search) or PRODUCT_ID
(similar_products), + optional TOP_K, CATEGORY, EXCLUDE_IDS -> PRODUCT_IDS, SCORES.

This file is the source; `lookalike index` copies it into every version directory beside the index
it serves, so a version is self-contained. Each request is checked on its own and gets its own
error; the valid requests of a dynamic batch are searched together, and no request's result depends
on the others (`lookalike.serving.product_search`).
"""

import triton_python_backend_utils as pb_utils

from lookalike.serving.adapter import model_parameters, request_inputs, responses
from lookalike.serving.product_search import INPUTS, ProductSearch, instance_args


class TritonPythonModel:
    def initialize(self, args):
        self.search = ProductSearch.load(args["model_repository"], args["model_version"], model_parameters(args),
                                         **instance_args(args))
        pb_utils.Logger.log_info(f"product_search: version {args['model_version']}, {self.search.describe()}")

    def execute(self, requests):
        inputs = [request_inputs(pb_utils, r, INPUTS) for r in requests]
        return responses(pb_utils, self.search(inputs, log=pb_utils.Logger.log_error))

    def finalize(self):
        self.search.close()
