"""examples/fastapi_app.py under uvicorn, in a process of its own, in front of the real server over gRPC
and HTTP: real multipart uploads, each SDK error as its HTTP status, and a dead server as 503."""

import csv
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator

import pytest
import requests

from lookalike.indexing.repository import Repository
from lookalike.server.launcher import free_port
from lookalike.serving.search import ProductIndex

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MAX_UPLOAD = 20 * 1024 * 1024  # the example's default, the server's own limit


@contextmanager
def example_app(log: Path, **env: str) -> Iterator[str]:
    """The example's base URL once /healthz answers, while it runs; then SIGTERM (the lifespan closes
    the client), and the process group killed whatever happens."""
    port = free_port()
    with open(log, "w") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "examples.fastapi_app:app", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, env={**os.environ, **env}, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                assert process.poll() is None, f"uvicorn exited with {process.returncode}:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"/healthz did not answer within 60 s:\n{log.read_text()}"
                try:
                    requests.get(f"{base}/healthz", timeout=5)
                    break  # a 503 is an answer too
                except requests.ConnectionError:
                    pass
                time.sleep(0.2)
            yield base
            process.send_signal(signal.SIGTERM)
            # uvicorn re-raises the signal once it has shut down gracefully: -SIGTERM is a clean exit
            assert process.wait(timeout=20) in (0, -signal.SIGTERM), log.read_text()
            assert "Application shutdown complete" in log.read_text(), log.read_text()
        finally:
            with suppress(ProcessLookupError):  # whatever of its group is left (none after a clean exit)
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@pytest.fixture(scope="module", params=["grpc", "http"])
def app_url(request, server, tmp_path_factory) -> Iterator[str]:
    url = server.options.grpc_url if request.param == "grpc" else server.options.http_url
    log = tmp_path_factory.mktemp(f"fastapi-{request.param}") / "uvicorn.log"
    with example_app(log, LOOKALIKE_URL=url, LOOKALIKE_PROTOCOL=request.param) as base:
        yield base


@pytest.fixture(scope="module")
def indexed_rows(server, catalog) -> list[dict[str, str]]:
    """Catalog rows of products in the served index, one per category (a few are skipped at indexing)."""
    indexed = {p.product_id for p in ProductIndex.load(Repository(server.options.model_repository).latest_index_dir()).products}
    with open(catalog / "catalog.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r["product_id"] in indexed]
    return list({r["category"]: r for r in rows}.values())


def upload(base: str, data: bytes, **params: object) -> requests.Response:
    return requests.post(f"{base}/search", files={"image": ("photo.png", data, "image/png")}, params=params, timeout=60)


def test_catalog_photo_finds_its_product(app_url, catalog, indexed_rows):
    assert len(indexed_rows) >= 3
    for row in indexed_rows:
        answer = upload(app_url, (catalog / row["image"]).read_bytes(), top_k=5)
        assert answer.status_code == 200, answer.text
        matches = answer.json()["matches"]
        assert matches[0]["product_id"] == row["product_id"], (row, matches[:2])
        assert matches[0]["score"] > 0.9999  # it meets its own catalog view
        assert [m["rank"] for m in matches] == [1, 2, 3, 4, 5]
        assert all(a["score"] >= b["score"] for a, b in zip(matches, matches[1:]))


def test_search_filters_pass_through(app_url, catalog, indexed_rows):
    row = indexed_rows[0]
    data = (catalog / row["image"]).read_bytes()
    excluded = upload(app_url, data, top_k=3, exclude_id=[row["product_id"], "no-such-id"]).json()["matches"]
    assert row["product_id"] not in [m["product_id"] for m in excluded] and len(excluded) == 3
    other = next(r["category"] for r in indexed_rows if r["category"] != row["category"])
    in_other = upload(app_url, data, top_k=3, category=other).json()["matches"]
    assert in_other and row["product_id"] not in [m["product_id"] for m in in_other]
    assert upload(app_url, data, top_k=3, category="no-such-category").json() == {"matches": []}


def test_similar_finds_neighbours_and_404s_an_unknown_product(app_url, indexed_rows):
    answer = requests.get(f"{app_url}/similar/{indexed_rows[0]['product_id']}", params={"top_k": 4}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert [m["rank"] for m in answer.json()["matches"]] == [1, 2, 3, 4]
    missing = requests.get(f"{app_url}/similar/no-such-product", timeout=60)
    assert missing.status_code == 404, missing.text
    assert missing.json()["error"] == "NotFoundError" and "unknown product id" in missing.json()["detail"]
    long_id = "y" * 20_000  # past gRPC's metadata limit, were the id echoed whole: 404, not 503
    missing = requests.get(f"{app_url}/similar/{long_id}", timeout=60)
    assert missing.status_code == 404, missing.text[:500]
    assert "(20,000 characters)" in missing.json()["detail"] and len(missing.content) < 1000


def test_bad_uploads_are_refused(app_url):
    junk = upload(app_url, b"this is not an image, just bytes")
    assert junk.status_code == 422, junk.text
    assert junk.json()["reason"] == "not_an_image" and "invalid image (not_an_image)" in junk.json()["detail"]
    assert upload(app_url, b"").json()["reason"] == "empty"
    oversized = upload(app_url, b"\0" * (MAX_UPLOAD + 1))
    assert oversized.status_code == 413, oversized.text
    assert upload(app_url, b"junk", top_k=0).status_code == 422  # FastAPI's own validation: no server call
    missing_field = requests.post(f"{app_url}/search", files={"photo": ("a.png", b"x")}, timeout=60)
    assert missing_field.status_code == 422


def test_healthz_reports_every_model(app_url):
    answer = requests.get(f"{app_url}/healthz", timeout=60)
    assert answer.status_code == 200, answer.text
    health = answer.json()
    # not health["ready"]: Triton's server readiness dips while a replaced index version unloads (Health.ok)
    assert health["ok"] and health["live"] and health["error"] is None, health
    assert health["models"] and all(health["models"].values())
    assert {"visual_search", "similar_products", "product_search"} <= set(health["models"])


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_dead_server_is_503(protocol, catalog, indexed_rows, tmp_path):
    with example_app(tmp_path / "uvicorn.log", LOOKALIKE_URL=f"127.0.0.1:{free_port()}", LOOKALIKE_PROTOCOL=protocol) as base:
        started = time.monotonic()
        answer = upload(base, (catalog / indexed_rows[0]["image"]).read_bytes())
        assert answer.status_code == 503, answer.text
        assert answer.headers["Retry-After"] and answer.json()["error"] == "ServerUnavailableError"
        assert time.monotonic() - started < 8  # the retries gave up well within the 10 s budget
        health = requests.get(f"{base}/healthz", timeout=60)
        assert health.status_code == 503, health.text
        assert health.json()["ok"] is False and not any(health.json()["models"].values())
