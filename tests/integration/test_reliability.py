"""`lookalike serve` as an operator runs it, against what breaks in production: a model process killed
under load, tritonserver itself killed, a restart at once on the same ports, a corrupt index version
on disk, an index the server refused, a writer killed while saving. Real tritonserver, real signals."""

import json
import socket
import urllib.request
from pathlib import Path

import pytest

from loadtest.recovery import Serve, kill_and_recover
from lookalike.indexer import index_catalog
from lookalike.publishing import PublishError
from lookalike.repository import STAGING_OWNER_FILE, copy_repository
from lookalike.search import ProductIndex
from lookalike.serve import lookalike_server
from lookalike.server import ServerOptions, free_port
from lookalike_client import LookalikeClient
from tests.conftest import REPOSITORY

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def catalog(catalog, tmp_path_factory) -> Path:
    """The session catalog cut to 4 products per category (same images): these tests are about
    processes and files, not search quality, and each index of it embeds 10 images per product."""
    import csv
    from collections import Counter

    small = tmp_path_factory.mktemp("small_catalog")
    (small / "images").symlink_to(catalog / "images", target_is_directory=True)
    with open(catalog / "catalog.csv", newline="") as handle:
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


def new_serve(tmp_path: Path) -> Serve:
    return Serve.fresh(tmp_path, REPOSITORY)


@pytest.fixture(scope="module")
def serve(tmp_path_factory, catalog):
    s = new_serve(tmp_path_factory.mktemp("serve"))
    s.start()
    with LookalikeClient(s.grpc) as client:
        index_catalog(catalog / "catalog.csv", s.repo, client, progress=False)
    yield s
    assert s.stop() == 0, s.text()[-3000:]


def query_image(catalog: Path) -> bytes:
    return next(iter(sorted((catalog / "images").glob("*/*.png")))).read_bytes()


@pytest.mark.parametrize("model", ["preprocess", "preprocess_query", "embedder", "product_search"])
def test_a_killed_model_process_is_replaced_and_readiness_tells_the_truth(serve, catalog, model):
    run = kill_and_recover(serve, model, [query_image(catalog)])
    print(f"\n{model}: /ready 503 after {run['detected_s']:.2f} s, 200 again after {run['ready_s']:.2f} s; "
          f"{run['failed']} of {run['requests']} requests failed, the last started {run['last_failure_started_s']} s "
          "after the kill")
    assert run["failed_after_ready"] == 0  # whatever started once ready again succeeded
    assert run["requests"] - run["failed"] > 20
    assert all("is not healthy" in error for error in run["errors"]), run["errors"]
    (incident,) = run["incidents"]
    assert f"pid {run['pid']} crashed" in incident["what"] and incident["action"] == f"reload {model}"
    assert any(f"reloading {model}" in line for line in serve.lookalike_lines())
    if model == "product_search":  # the next re-index works on the replaced model
        with LookalikeClient(serve.grpc) as client:
            report = index_catalog(catalog / "catalog.csv", serve.repo, client, progress=False)
            assert report.version in client.served_index_versions()


def test_a_killed_tritonserver_is_restarted(serve, catalog):
    with LookalikeClient(serve.grpc) as client:
        expected = client.search(query_image(catalog), top_k=3)
    run = kill_and_recover(serve, "tritonserver", [query_image(catalog)], settle_s=12.0)
    print(f"\ntritonserver killed: ready again after {run['ready_s']:.1f} s; {run['failed']} of {run['requests']} "
          f"requests failed, the last started {run['last_failure_started_s']} s after the kill")
    status = serve.status()
    assert status["tritonserver_pid"] != run["pid"] and status["restarts"] == 1
    # Clients fail fast while nothing listens, and a gRPC channel then waits out its reconnect backoff
    # (1 s, then 1.6x more, with jitter) before it finds the new server; after that, nothing fails.
    assert run["last_failure_started_s"] < run["ready_s"] + 10.0, run
    assert run["requests"] - run["failed"] > 20
    with LookalikeClient(serve.grpc) as client:
        assert client.search(query_image(catalog), top_k=3) == expected
    assert any("tritonserver exited with code -9: restarting tritonserver" in line for line in serve.lookalike_lines())


def time_wait_sockets(port: int) -> int:
    """TCP sockets in TIME-WAIT on local `port` (/proc/net/tcp*, state 06)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            count += int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "06"
    return count


def test_restart_at_once_on_the_same_ports(tmp_path, catalog):
    s = new_serve(tmp_path).start()
    for protocol, url in (("http", s.http), ("grpc", s.grpc)):
        with LookalikeClient(url, protocol=protocol) as client:
            client.search(query_image(catalog), top_k=1)
    for _ in range(3):  # "Connection: close" requests: the server closes, its side goes to TIME-WAIT
        urllib.request.urlopen(f"http://{s.http}/v2/health/ready", timeout=5).close()
    assert s.stop() == 0
    assert time_wait_sockets(s.options.http_port) > 0  # what made the old port check refuse for ~60 s
    s.start(wait=False)
    took = s.wait_ready(timeout_s=120)
    print(f"\nrestarted on the same ports: ready after {took:.1f} s")
    assert not any("in use" in line for line in s.lookalike_lines())
    # a port that another process really listens on is still refused, with a clear message: a plain
    # listener, and tritonserver's own gRPC listener (which binds with SO_REUSEPORT)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    for name, port in (("metrics", blocker.getsockname()[1]), ("grpc", s.options.grpc_port)):
        ports = {f"{n}_port": free_port() for n in ("http", "grpc", "metrics", "health")} | {f"{name}_port": port}
        options = ServerOptions(model_repository=s.repo.root, **ports)
        other = Serve(s.repo, options, tmp_path / f"other-{name}.log").start(wait=False)
        assert other.process.wait(timeout=60) == 1
        assert f"{name} port 127.0.0.1:{port} is in use" in other.text(), other.text()[-2000:]
    blocker.close()
    assert s.health()[0] == 200
    assert s.stop() == 0


def test_a_corrupt_newest_index_version_and_a_killed_writer_do_not_block_startup(tmp_path, catalog):
    s = new_serve(tmp_path).start()
    with LookalikeClient(s.grpc) as client:
        good = index_catalog(catalog / "catalog.csv", s.repo, client, progress=False).version
        expected = client.search(query_image(catalog), top_k=3)
    assert s.stop() == 0
    bad = s.repo.search_dir / str(good + 1)  # a newer version whose index file was cut short
    import shutil

    shutil.copytree(s.repo.search_dir / str(good), bad)
    faiss_file = bad / "index.faiss"
    faiss_file.write_bytes(faiss_file.read_bytes()[:1000])
    staging = s.repo.search_dir / ".staging-99-killed"  # what a `lookalike index` killed while saving leaves
    staging.mkdir()
    (staging / STAGING_OWNER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 7}))
    s.start()
    with LookalikeClient(s.grpc) as client:
        assert client.search(query_image(catalog), top_k=3) == expected
        assert client.served_index_versions() == [good]
    lines = "\n".join(s.lookalike_lines())
    assert f"skipped index version {good + 1}: index.faiss: 1,000 bytes" in lines, lines
    assert f"serving index version {good}" in lines
    assert not staging.exists() and "removed .staging-99-killed" in lines
    assert s.stop() == 0


def test_an_index_the_server_refused_is_not_left_for_a_restart(tmp_path, catalog):
    repo = copy_repository(REPOSITORY, tmp_path / "model_repository")
    options = ServerOptions(model_repository=repo.root, http_port=free_port(), grpc_port=free_port(),
                            metrics_port=free_port(), restrict_admin=True, admin_key="k3y-for-tests")
    with lookalike_server(options, log_file=tmp_path / "tritonserver.log"):
        serving = repo.index_versions()
        with LookalikeClient(options.grpc_url, admin_key="") as anonymous:
            with pytest.raises(PublishError, match="did not load index version .*set aside"):
                index_catalog(catalog / "catalog.csv", repo, anonymous, progress=False)
            assert anonymous.served_index_versions() == serving
        assert repo.index_versions() == serving  # nothing a restart would serve instead
        (aside,) = repo.rejected_dir.iterdir()
        assert "PermissionDeniedError" in (aside / "REJECTED.txt").read_text()
        assert len(ProductIndex.load(aside)) > 40  # kept for inspection, out of Triton's sight


def test_lookalike_query_shows_hostile_ids_escaped(serve, catalog, tmp_path):
    import shutil
    import subprocess
    import sys

    image = sorted((catalog / "images").glob("*/*.png"))[0]
    shutil.copy(image, tmp_path / "a.png")
    hostile = "SKU\x1b[2J\x1b[31m-red\u202eevil"
    (tmp_path / "catalog.csv").write_text(f"product_id,image\n{hostile},a.png\n", encoding="utf-8")
    with LookalikeClient(serve.grpc) as client:
        index_catalog(tmp_path / "catalog.csv", serve.repo, client, progress=False)
    lookalike = Path(sys.executable).parent / "lookalike"
    out = subprocess.run([str(lookalike), "query", str(image), "--url", serve.grpc, "--top-k", "1",
                          "--model-repository", str(serve.repo.root)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "SKU\\x1b[2J\\x1b[31m-red\\u202eevil" in out.stdout
    assert "\x1b" not in out.stdout and "\u202e" not in out.stdout
