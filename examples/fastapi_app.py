"""A FastAPI front for lookalike: photo search, "customers also viewed" and a health check over plain
HTTP/JSON, on one `AsyncLookalikeClient` shared by every request. Copy it and adapt it.

    pip install lookalike-client fastapi "uvicorn[standard]" python-multipart
    LOOKALIKE_URL=localhost:8001 uvicorn examples.fastapi_app:app --port 8080   # from the repository root
    python examples/fastapi_app.py                                              # the same, on HOST:PORT

    curl -F image=@shoe.jpg 'localhost:8080/search?top_k=5&category=shoes&exclude_id=sku-1'
    curl 'localhost:8080/similar/sku-1?top_k=5'
    curl localhost:8080/healthz

Settings (environment): LOOKALIKE_URL (default localhost:8001), LOOKALIKE_PROTOCOL ("grpc", the
default, or "http" with LOOKALIKE_URL=host:8000), LOOKALIKE_TIMEOUT_S (per call, retries included;
default 10), LOOKALIKE_MAX_UPLOAD_BYTES (default 20 MiB, the server's own limit), HOST and PORT.

Errors: a bad photo is 422 with the server's `reason` ("not_an_image", "truncated", ...), an unknown
product 404, another refused request 400, an upload over the limit 413, the server unreachable or its
model loading 503 with Retry-After, a timeout 504, any other failure of the server 502. Starlette
spools an upload before the handler runs, so cap request bodies at the proxy (nginx's
client_max_body_size) as well.
"""

from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Annotated, AsyncIterator

from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from lookalike_client import (
    AsyncLookalikeClient,
    InvalidImageError,
    InvalidRequestError,
    LookalikeError,
    Match,
    NotFoundError,
    RequestTimeoutError,
    ServerUnavailableError,
)
from lookalike_client.contract import MAX_TOP_K, MIN_TOP_K

LOOKALIKE_URL = os.environ.get("LOOKALIKE_URL", "localhost:8001")
LOOKALIKE_PROTOCOL = os.environ.get("LOOKALIKE_PROTOCOL", "grpc")
TIMEOUT_S = float(os.environ.get("LOOKALIKE_TIMEOUT_S", "10"))
MAX_UPLOAD_BYTES = int(os.environ.get("LOOKALIKE_MAX_UPLOAD_BYTES", str(20 * 1024 * 1024)))
RETRY_AFTER_S = "2"

log = logging.getLogger("lookalike.app")
TopK = Annotated[int, Query(ge=MIN_TOP_K, le=MAX_TOP_K)]


class Matches(BaseModel):
    matches: list[Match]  # rank, product_id, score; best first


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """One client for the app's lifetime: it opens its connection on the first call, on this loop."""
    app.state.client = AsyncLookalikeClient(LOOKALIKE_URL, protocol=LOOKALIKE_PROTOCOL, timeout_s=TIMEOUT_S)
    try:
        yield
    finally:
        await app.state.client.close()


app = FastAPI(title="lookalike search", lifespan=lifespan)


def get_client(request: Request) -> AsyncLookalikeClient:
    return request.app.state.client


Client = Annotated[AsyncLookalikeClient, Depends(get_client)]


@app.exception_handler(LookalikeError)
async def lookalike_error(request: Request, exc: LookalikeError) -> JSONResponse:
    """Every SDK error, as the HTTP status a caller can act on. The server's reason goes back for a
    refused request (the caller's fault); a failure of the server is logged, not shown."""
    headers: dict[str, str] = {}
    body: dict[str, str] = {"error": type(exc).__name__, "detail": exc.detail}
    if isinstance(exc, InvalidImageError):
        status, body["reason"] = 422, exc.reason
    elif isinstance(exc, NotFoundError):
        status = 404
    elif isinstance(exc, InvalidRequestError):
        status = 400
    elif isinstance(exc, ServerUnavailableError):  # ModelNotReadyError too: retryable
        status, headers["Retry-After"] = 503, RETRY_AFTER_S
        body["detail"] = "the search service is unavailable, retry later"
    elif isinstance(exc, RequestTimeoutError):
        status, body["detail"] = 504, "the search service did not answer in time"
    else:  # PermissionDeniedError, ServerError, any other
        status, body["detail"] = 502, "the search service failed"
    if status >= 500:
        log.warning("%s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
    return JSONResponse(body, status_code=status, headers=headers)


@app.post("/search")
async def search(
    client: Client,
    image: Annotated[UploadFile, File(description="the photo: JPEG, PNG, WebP, GIF, BMP or TIFF")],
    top_k: TopK = 10,
    category: Annotated[str | None, Query()] = None,
    exclude_id: Annotated[list[str] | None, Query()] = None,
) -> Matches:
    if image.size is not None and image.size > MAX_UPLOAD_BYTES:
        raise HTTPException(413, f"the image is over {MAX_UPLOAD_BYTES:,} bytes")
    data = await image.read(MAX_UPLOAD_BYTES + 1)  # never more than the limit in memory
    if len(data) > MAX_UPLOAD_BYTES:
        raise HTTPException(413, f"the image is over {MAX_UPLOAD_BYTES:,} bytes")
    return Matches(matches=await client.search(data, top_k, category=category, exclude_ids=exclude_id or ()))


@app.get("/similar/{product_id}")
async def similar(client: Client, product_id: str, top_k: TopK = 10) -> Matches:
    return Matches(matches=await client.similar(product_id, top_k))


@app.get("/healthz")
async def healthz(client: Client) -> JSONResponse:
    """200 when the server can answer every call, else 503 (for a load balancer's health check)."""
    health = await client.health()
    return JSONResponse({"ok": health.ok, **asdict(health)}, status_code=200 if health.ok else 503)


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host=os.environ.get("HOST", "127.0.0.1"), port=int(os.environ.get("PORT", "8080")))
