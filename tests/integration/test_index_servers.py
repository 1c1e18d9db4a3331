"""Several servers, one catalog: `lookalike index --url A --url B` on two real tritonservers over one model
repository (a shared volume): the embedding requests go to both, both serve the new version (each one's
INDEX_INFO), `--rollback` rolls both back, and a server killed mid-embedding leaves its batches to the
other and loads the new version once its supervisor has restarted it; a server on another repository
is refused before a single image is embedded. A 20-product catalog keeps it cheap; the three servers
start together."""

import csv
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import tritonclient.grpc as grpcclient

from loadtest.benchmarks.recovery import Serve
from lookalike.indexing.indexer import index_catalog
from lookalike.indexing.repository import Repository, copy_repository
from lookalike.server.launcher import ServerOptions, free_port
from lookalike.server.serve import lookalike_server
from lookalike.serving.artifacts import IndexMeta
from lookalike_client import LookalikeClient
from lookalike_client import contract as c
from tests.conftest import REPOSITORY

pytestmark = pytest.mark.integration

PRODUCTS = 20


def ports(name: str, **more) -> dict:
    return dict(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(), server_id=f"lookalike-test-{name}",
                **more)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """`a` (a tritonserver) and `b` (`lookalike serve`, whose supervisor restarts its tritonserver) over one
    repository; `other` over a copy of its own (its own empty index: the same version number, another
    index id), serving visual_search only (all that the check asks) and the embedder it calls."""
    if not (REPOSITORY / "embedder" / "manifest.json").exists():
        pytest.fail("no exported embedder: run `make export` (make test does) before the integration tests")
    root = tmp_path_factory.mktemp("index_servers")
    shared = copy_repository(REPOSITORY, root / "shared")
    other = copy_repository(REPOSITORY, root / "other")
    # In turn, each makes its repository servable first (the first on `shared` publishes its empty index).
    a = lookalike_server(ServerOptions(model_repository=shared.root, **ports("a", health_port=None)),
                         log_file=root / "tritonserver-a.log").start()
    b = other_server = None
    try:
        b = Serve(shared, ServerOptions(model_repository=shared.root, **ports("b", health_port=free_port())),
                  root / "serve-b.log").start(wait=False)
        other_server = lookalike_server(ServerOptions(model_repository=other.root, **ports("other", health_port=None)),
                                        log_file=root / "tritonserver-other.log").start(
            [c.VISUAL_SEARCH_MODEL, c.EMBEDDER_MODEL])  # preprocess_query calls the embedder through BLS, not as a step
        a.wait_ready()
        b.wait_ready()
        other_server.wait_ready()
        yield SimpleNamespace(a=a, b=b, other=other_server, repo=shared)
        assert a.ready() and b.health()[0] == 200
    finally:
        a.stop()
        if other_server is not None:
            other_server.stop()
        if b is not None and b.process is not None:
            assert b.stop() == 0, b.text()[-3000:]


@pytest.fixture
def small(catalog, tmp_path) -> Path:
    with open(catalog / "catalog.csv") as handle:
        rows = list(csv.DictReader(handle))[:PRODUCTS]
    path = tmp_path / "catalog.csv"
    path.write_text("product_id,image,category\n" + "".join(
        f"{r['product_id']},{catalog / r['image']},{r['category']}\n" for r in rows))
    return path


def embedded_images(server) -> int:
    """Images that `embed_image` answered on this server, from its own statistics."""
    client = grpcclient.InferenceServerClient(server.options.grpc_url)
    try:
        stats = client.get_inference_statistics(c.EMBED_IMAGE_MODEL)
        return sum(m.inference_count for m in stats.model_stats)
    finally:
        client.close()


def lookalike_index(repo: Repository, *args: str) -> subprocess.CompletedProcess:
    lookalike = Path(sys.executable).with_name("lookalike")
    return subprocess.run([str(lookalike), "index", *args, "--model-repository", str(repo.root), "--quiet"],
                          capture_output=True, text=True, timeout=600)


def test_a_second_url_on_another_repository_is_refused_before_anything_is_embedded(servers, small):
    a, other, repo = servers.a, servers.other, servers.repo
    versions = repo.index_versions()
    before = embedded_images(a)
    out = lookalike_index(repo, str(small), "--url", a.options.grpc_url, "--url", other.options.grpc_url)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"the server at {other.options.grpc_url} serves index version" in out.stderr
    assert "holds another index under that number" in out.stderr and "nothing was embedded or written" in out.stderr
    assert embedded_images(a) == before  # not one image sent to the first (the other has no embed_image loaded)
    assert repo.index_versions() == versions and not repo.rejected_dir.exists()


def test_index_through_two_servers_embeds_on_both_and_both_serve_it_then_both_roll_back(servers, small):
    a, b, repo = servers.a, servers.b, servers.repo
    before = [embedded_images(a), embedded_images(b)]
    previous = repo.index_versions()[-1]
    out = lookalike_index(repo, str(small), "--url", a.options.grpc_url, "--url", b.options.grpc_url,
                          "--full", "--concurrency", "2", "--batch-size", "4")
    assert out.returncode == 0, out.stdout + out.stderr
    version = int(re.search(r"as index version (\d+)", out.stdout).group(1))
    assert version > previous
    assert f"now serves version {version} on 2 servers ({a.options.grpc_url}, {b.options.grpc_url})" in out.stdout
    sent = [embedded_images(a) - before[0], embedded_images(b) - before[1]]
    views = 1 + len(repo.preprocessing().catalog_views)
    assert sent[0] > 0 and sent[1] > 0, sent  # the batches went to both
    per_server = re.search(r"embedded per server: (\S+) (\d+), (\S+) (\d+)", out.stdout)
    assert per_server is not None, out.stdout
    counts = {per_server.group(1): int(per_server.group(2)), per_server.group(3): int(per_server.group(4))}
    assert [counts[a.options.grpc_url] * views, counts[b.options.grpc_url] * views] == sent
    embedded = sum(counts.values())
    assert f"{embedded} embedded" in out.stdout and embedded > PRODUCTS // 2
    meta = IndexMeta.load(repo.search_dir / str(version))
    for server in (a, b):  # each one's own INDEX_INFO
        with LookalikeClient(server.options.grpc_url) as client:
            info = client.info()
            assert (info.index_version, info.index_id, info.products) == (version, meta.index_id, meta.count)
            assert client.served_index_versions() == [version]

    back = lookalike_index(repo, "--rollback", "--url", a.options.grpc_url, "--url", b.options.grpc_url)
    assert back.returncode == 0, back.stdout + back.stderr
    assert f"serves version {previous} again on 2 servers" in back.stdout
    for server in (a, b):
        with LookalikeClient(server.options.grpc_url) as client:
            assert client.info().index_version == previous and client.served_index_versions() == [previous]
    assert repo.index_versions()[-1] == previous
    assert a.ready() and b.health()[0] == 200


def test_a_server_killed_mid_embedding_leaves_its_batches_to_the_other_and_must_be_back_to_publish(servers, small):
    """B's tritonserver is killed (SIGKILL) on B's second embedding request: its batches go to A; B's
    supervisor restarts it, and once it serves this repository again, B loads the new version with A."""
    a, b, repo = servers.a, servers.b, servers.repo
    killed = []

    class KillsB(LookalikeClient):
        calls = 0

        def embed(self, images):
            KillsB.calls += 1
            if KillsB.calls == 2:
                killed.append(b.tritonserver_pid())
                os.kill(killed[0], signal.SIGKILL)
            return super().embed(images)

    before = embedded_images(a)
    with LookalikeClient(a.options.grpc_url, timeout_s=60) as first, KillsB(b.options.grpc_url, timeout_s=60) as second:
        report = index_catalog(small, repo, [first, second], reuse=False, progress=False, concurrency=1, batch_size=2)
    assert killed and b.tritonserver_pid() != killed[0]  # restarted by its supervisor
    assert report.went_away == [b.options.grpc_url] and report.servers == [a.options.grpc_url, b.options.grpc_url]
    assert sum(report.embedded_by.values()) == report.embedded and report.embedded_by[a.options.grpc_url] > PRODUCTS // 2
    views = 1 + len(repo.preprocessing().catalog_views)
    assert embedded_images(a) - before == report.embedded_by[a.options.grpc_url] * views
    meta = IndexMeta.load(repo.search_dir / str(report.version))
    for server in (a, b):
        with LookalikeClient(server.options.grpc_url) as client:
            info = client.info()
            assert (info.index_version, info.index_id, info.products) == (report.version, meta.index_id, meta.count)
    assert "tritonserver restarted" in b.text()
