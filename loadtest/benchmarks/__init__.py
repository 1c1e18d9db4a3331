"""Benchmarks: each measures lookalike against the same work done another way in the same run (in process,
a FastAPI peer, raw tritonclient, FAISS vs Milvus, one server vs two), and writes a table and a plot."""
