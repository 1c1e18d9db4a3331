"""The wire contract of the lookalike model repository: model names, tensor names, dtypes, limits.

This module is the one place these names live. The server package, the Triton models and the export
step all import it, so a rename happens here or nowhere. It has no dependencies on purpose: the client
SDK is installable without numpy-heavy server packages.
"""

from __future__ import annotations

# Model names.
PREPROCESS_MODEL = "preprocess"  # catalog packshots: embed_image, indexing
PREPROCESS_QUERY_MODEL = "preprocess_query"  # shopper photos: visual_search
EMBEDDER_MODEL = "embedder"
SEARCH_MODEL = "product_search"
VISUAL_SEARCH_MODEL = "visual_search"
EMBED_IMAGE_MODEL = "embed_image"
SIMILAR_PRODUCTS_MODEL = "similar_products"  # "customers also viewed": a catalog product id, no photo

# Tensor names.
IMAGE = "IMAGE"  # TYPE_STRING [1]: the encoded image bytes (JPEG, PNG, WebP, GIF, BMP, TIFF)
PIXELS = "PIXELS"  # FP32 [3, H, W]: normalised pixels, H and W from the preprocessing file
EMBEDDING = "EMBEDDING"  # FP32 [D]: L2-normalised image embedding
TOP_K = "TOP_K"  # INT32 [1]: how many results; optional, default DEFAULT_TOP_K
PRODUCT_IDS = "PRODUCT_IDS"  # TYPE_STRING [-1]: the catalog's own product ids, best first
SCORES = "SCORES"  # FP32 [-1]: cosine similarity, descending
# Filters, optional on visual_search, similar_products and product_search, one value per row:
CATEGORY = "CATEGORY"  # TYPE_STRING [1]: only products of this category; "" = any; unknown = no results
EXCLUDE_IDS = "EXCLUDE_IDS"  # TYPE_STRING [-1]: never these product ids ("" entries pad a row)
PRODUCT_ID = "PRODUCT_ID"  # TYPE_STRING [1]: similar_products' query, a catalog product id
# product_search only (the ensembles do not pass it on): JSON of the index version that answered, one
# per row (INDEX_INFO_FIELDS); the client's `info()`. Triton sends the outputs a client names, and every
# output of the model to a client that names none: name PRODUCT_IDS and SCORES to leave it out.
INDEX_INFO = "INDEX_INFO"  # TYPE_STRING [1]
INDEX_INFO_FIELDS = ("version", "products", "kind", "dim", "embedder_model", "embedder_fingerprint", "index_id",
                     "backend", "device")
# Fields a server from before the search backends may leave out (the client assumes faiss on an unnamed device).
INDEX_INFO_OPTIONAL = ("backend", "device")
# product_search's search backends (its `search_backend` parameter): FAISS inside the model (the index
# files of the version directory), or a Milvus collection behind an alias (`version` is then the
# collection's generation, `products` its distinct product ids).
SEARCH_BACKENDS = ("faiss", "milvus")
MILVUS_TOKEN_ENV = "LOOKALIKE_MILVUS_TOKEN"  # the Milvus token: in the environment only, never in a file or argv
# An image the server cannot use is refused with INVALID_ARGUMENT and a message that starts
# "invalid image (REASON): ", REASON one of IMAGE_ERROR_REASONS; in a request of several images the
# rest names the first bad one: "image I of N: ...".
INVALID_IMAGE = "invalid image"
IMAGE_ERROR_REASONS = ("empty", "not_an_image", "truncated", "too_large", "unsupported")
# similar_products answers an id that the served index does not hold with INVALID_ARGUMENT, starting:
UNKNOWN_PRODUCT = "unknown product id"
# Rows of one request are rectangular. A row that an approximate index could not fill as far as the
# longest row of its request is padded with this id (never a catalog id) and the lowest float32 score.
NO_PRODUCT_ID = ""

# Triton datatypes of the tensors above, as the KServe v2 protocol spells them.
DATATYPES = {
    IMAGE: "BYTES",
    PIXELS: "FP32",
    EMBEDDING: "FP32",
    TOP_K: "INT32",
    PRODUCT_IDS: "BYTES",
    SCORES: "FP32",
    CATEGORY: "BYTES",
    EXCLUDE_IDS: "BYTES",
    PRODUCT_ID: "BYTES",
    INDEX_INFO: "BYTES",
}

# Limits. The server enforces them; the client checks them first to fail fast and cheaply.
DEFAULT_TOP_K = 10
MIN_TOP_K = 1
MAX_TOP_K = 1000
MAX_EXCLUDE_IDS = 1000  # per row
MAX_BATCH_SIZE = 64  # max_batch_size of every model in the repository
# Encoded bytes of one image: the server's default upload limit (`preprocess`'s max_image_bytes), and
# what the client reads of a file at most before it has even asked the server.
MAX_IMAGE_BYTES = 20 * 1024 * 1024
# Error messages quote at most this many characters of what a client sent (an id, a category, a path),
# then its full length: an answer never grows with a hostile input (gRPC carries the message in a
# header of about 16 KB at most).
MAX_QUOTED_CHARS = 200


def quoted(value: object, limit: int = MAX_QUOTED_CHARS) -> str:
    """`value` for an error message: repr() of a string, cut to `limit` characters with the full length
    said, e.g. 'SKU-1' or 'xxxx...' (1,048,576 characters)."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text):,} characters)"

# Header that carries the admin key for the restricted model-control APIs (see `lookalike serve`).
# HTTP sends it as is; gRPC clients prefix it with "triton-grpc-protocol-".
ADMIN_KEY_HEADER = "lookalike-admin-key"
ADMIN_KEY_ENV = "LOOKALIKE_ADMIN_KEY"
