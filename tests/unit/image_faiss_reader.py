"""Reads FAISS index files and searches them: what the serving image does with the files the host writes.

tests/unit/test_image_faiss.py runs this file twice on the same files: imported, under the host's FAISS
(.venv), and as a script under .venv-faiss-image/bin/python (faiss-cpu of the version that
docker/requirements-serve.txt pins, numpy; nothing of lookalike), and compares the two answers.

    python image_faiss_reader.py SPEC.json   # prints {"version": ..., "indexes": [read(...), ...]}

SPEC.json: {"queries": "QUERIES.npy", "k": 10, "indexes": [{"path": "...", "params": {"efSearch": 128}}]}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import faiss
import numpy as np


def read(path: str, params: dict[str, int], queries: np.ndarray, k: int) -> dict[str, Any]:
    """What faiss.read_index makes of `path`, and the positions its search returns for `queries`, with the
    version's search parameters (efSearch, nprobe) set the way FAISS's ParameterSpace sets them."""
    index = faiss.read_index(path)
    for name, value in params.items():
        faiss.ParameterSpace().set_index_parameter(index, name, value)
    _, positions = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return {"path": path, "class": type(faiss.downcast_index(index)).__name__, "metric": int(index.metric_type),
            "ntotal": int(index.ntotal), "d": int(index.d), "ids": positions.tolist()}


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    queries = np.load(spec["queries"])
    found = [read(entry["path"], entry["params"], queries, spec["k"]) for entry in spec["indexes"]]
    print(json.dumps({"version": faiss.__version__, "indexes": found}))


if __name__ == "__main__":
    main(sys.argv[1])
