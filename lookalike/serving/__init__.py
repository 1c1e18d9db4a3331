"""What runs inside tritonserver's Python-backend stubs: the model_repository/*/model.py files import only
this package (and lookalike_client's contract). Plain Python, unit-tested without a server: request
adaptation (adapter), decoding (decode), preprocessing and query views, the ONNX embedder, and the
product search over FAISS or Milvus. Nothing here imports the operator's tooling (indexing, server, quality)."""
