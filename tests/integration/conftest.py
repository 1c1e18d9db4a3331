"""One real tritonserver for the integration tests: started through the same launcher as `lookalike
serve`, on free loopback ports, over a copy of the model repository, with a real catalog indexed."""

from pathlib import Path

import pytest

from lookalike.indexer import index_catalog
from lookalike.repository import Repository, copy_repository
from lookalike.sample_data import build_sample_catalog
from lookalike.serve import lookalike_server
from lookalike.server import ServerOptions, free_port
from lookalike_client import LookalikeClient
from tests.conftest import REPOSITORY


@pytest.fixture(scope="session")
def catalog(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("catalog") / "sample"
    build_sample_catalog(out, per_category=20, holdout=2)
    return out


@pytest.fixture(scope="session")
def server(tmp_path_factory, catalog):
    root = tmp_path_factory.mktemp("server")
    if not (REPOSITORY / "embedder" / "manifest.json").exists():
        pytest.fail("no exported embedder: run `make export` (make test does) before the integration tests")
    repo = copy_repository(REPOSITORY, root / "model_repository").root  # no index yet, like a fresh clone
    options = ServerOptions(model_repository=repo, http_port=free_port(), grpc_port=free_port(),
                            metrics_port=free_port())
    triton = lookalike_server(options, log_file=root / "tritonserver.log")
    with triton:
        with LookalikeClient(options.grpc_url, timeout_s=120) as client:
            report = index_catalog(catalog / "catalog.csv", Repository(repo), client, progress=False)
        triton.index_report = report
        yield triton
        # The server must still be healthy after everything the tests threw at it.
        assert triton.ready(), "visual_search is no longer ready after the tests"
    assert triton.process.returncode == 0, f"tritonserver exited with {triton.process.returncode}"


@pytest.fixture(params=["grpc", "http"])
def client(request, server):
    url = server.options.grpc_url if request.param == "grpc" else server.options.http_url
    with LookalikeClient(url, protocol=request.param, timeout_s=60) as c:
        yield c
