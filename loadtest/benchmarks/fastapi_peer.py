"""The peer of `make bench`: the photo-search service a team would write in a day with FastAPI and
ONNX Runtime, doing exactly lookalike's work (the same query preprocessing, ONNX model and FAISS index
version), so that the benchmark compares serving stacks and not models.

    PEER_MODEL_REPOSITORY=model_repository uvicorn fastapi_peer:app --app-dir loadtest --port 8080

Two endpoints, the two ways such services are written (POST multipart/form-data, field `image`,
query parameter `top_k`; JSON {"product_ids": [...], "scores": [...]}, 400 for a bad image):

  /search             `async def`, the pattern of FastAPI's tutorials and most model-serving blog
                      posts: the CPU work runs on the event loop, one request at a time.
  /search_threadpool  plain `def`: FastAPI runs it in its thread pool (40 threads), so decoding (which
                      releases the GIL) and ONNX Runtime overlap across requests; no batching.

One uvicorn worker process (one model and index in memory; `--workers N` would hold N copies). ONNX
Runtime with its defaults (a thread per core), FAISS with one thread, as in lookalike's product_search.
PEER_INDEX_DIR picks the index version (default: the repository's newest).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, File, HTTPException, Query, UploadFile

from lookalike.indexing.repository import Repository
from lookalike.serving.embedding import OnnxEmbedder
from lookalike.serving.gpu import set_threads
from lookalike.serving.preprocessing import ImageError
from lookalike.serving.product_search import search_views
from lookalike.serving.query_views import ViewPreprocessor
from lookalike.serving.search import ProductIndex

_repo = Repository(Path(os.environ.get("PEER_MODEL_REPOSITORY", "model_repository")))
_index_dir = os.environ.get("PEER_INDEX_DIR") or _repo.latest_index_dir()
if _index_dir is None:
    raise SystemExit(f"no index version in {_repo.search_dir}: run `lookalike index` first")
# the served query side: its views, searched and fused as product_search does
preprocessor = ViewPreprocessor(_repo.preprocessing(), _repo.image_limits())
fusion = _repo.preprocessing().query_fusion
embedder = OnnxEmbedder(_repo.onnx_file)
set_threads(1)
index = ProductIndex.load(_index_dir)
app = FastAPI(title="FastAPI + ONNX Runtime peer of lookalike")


def _search(data: bytes, top_k: int) -> dict:
    try:
        pixels = preprocessor(data)
    except ImageError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    ids, scores = search_views(index, embedder(pixels), len(pixels), top_k, fusion)
    return {"product_ids": ids[0], "scores": scores[0].tolist()}


@app.post("/search")
async def search(image: Annotated[UploadFile, File()], top_k: Annotated[int, Query(ge=1, le=1000)] = 10) -> dict:
    return _search(await image.read(), top_k)


@app.post("/search_threadpool")
def search_threadpool(image: Annotated[UploadFile, File()], top_k: Annotated[int, Query(ge=1, le=1000)] = 10) -> dict:
    return _search(image.file.read(), top_k)


@app.get("/health")
def health() -> dict:
    return {"products": len(index)}
