"""One real tritonserver for the integration tests: started through the same launcher as `lookalike
serve`, on free loopback ports, over a copy of the model repository, with a real catalog indexed."""

from pathlib import Path

import pytest

from lookalike.indexing.indexer import index_catalog
from lookalike.indexing.repository import Repository, copy_repository
from lookalike.quality.sample_data import build_sample_catalog
from lookalike.server.launcher import ServerOptions, free_port
from lookalike.server.serve import lookalike_server
from lookalike_client import LookalikeClient
from tests.conftest import REPOSITORY


@pytest.fixture(scope="session")
def sample_catalog(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("catalog") / "sample"
    build_sample_catalog(out, per_category=20, holdout=2)
    return out


@pytest.fixture(scope="session")
def catalog(sample_catalog) -> Path:
    """The session's sample catalog (a module may narrow `catalog`; `catalog_small` never sees that)."""
    return sample_catalog


@pytest.fixture(scope="session")
def catalog_small(sample_catalog, tmp_path_factory) -> Path:
    """The session catalog cut to 4 products per category (same images), for tests about processes,
    files and backends rather than search quality: each product embeds 10 images (its catalog views)."""
    import csv
    from collections import Counter

    small = tmp_path_factory.mktemp("catalog_small")
    (small / "images").symlink_to(sample_catalog / "images", target_is_directory=True)
    with open(sample_catalog / "catalog.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    kept, per_category = [], Counter()
    for row in rows:
        per_category[row["category"]] += 1
        if per_category[row["category"]] <= 4:
            kept.append(row)
    with open(small / "catalog.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    return small


@pytest.fixture(scope="session")
def milvus(tmp_path_factory):
    """One real Milvus standalone server (milvus==2.3.5) for the session, on a fresh data directory."""
    from lookalike.server.milvus import MilvusServer, milvus_server_binary

    if milvus_server_binary() is None:
        pytest.fail("no milvus-server: `make setup` installs milvus==2.3.5")
    root = tmp_path_factory.mktemp("milvus")
    server = MilvusServer(root / "data", free_port(), root / "milvus.log")
    server.start(wait_for_host_s=900)  # one Milvus standalone a host: another one (a benchmark) is waited for
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def milvus_serve(tmp_path_factory, milvus, catalog_small):
    """`lookalike serve --search-backend milvus` (the supervisor, its health port) over a copy of the model
    repository, with the small catalog indexed into Milvus (flat: exact, for the parity checks)."""
    from loadtest.benchmarks.recovery import Serve
    from lookalike.cli import main as lookalike

    serve = Serve.fresh(tmp_path_factory.mktemp("milvus_serve"), REPOSITORY)
    serve.args = ["--search-backend", "milvus", "--milvus-uri", milvus.uri]
    serve.start()
    try:
        code = lookalike(["index", str(catalog_small / "catalog.csv"), "--model-repository", str(serve.repo.root),
                          "--url", serve.grpc, "--index", "flat", "--quiet"])
        assert code == 0, serve.text()[-3000:]
        yield serve
    finally:
        serve.stop()


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
