"""`lookalike serve` as an operator runs it, against what breaks in production: a model process killed
under load, tritonserver itself killed, a restart at once on the same ports, a corrupt index version
on disk, an index the server refused, a writer killed while saving. Real tritonserver, real signals."""

import json
import os
import resource
import socket
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from loadtest.benchmarks.recovery import Serve, kill_and_recover
from lookalike.indexing.indexer import index_catalog
from lookalike.indexing.publishing import PublishError
from lookalike.indexing.repository import STAGING_OWNER_FILE, copy_repository
from lookalike.server.launcher import ServerOptions, free_port
from lookalike.server.serve import lookalike_server
from lookalike.serving.search import ProductIndex
from lookalike_client import LookalikeClient, wait_for
from lookalike_client import contract as c
from tests.conftest import REPOSITORY

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def catalog(catalog_small) -> Path:
    """These tests are about processes and files, not search quality: 4 products per category."""
    return catalog_small


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
    assert f"pid {run['pid']} crashed" in incident["what"]
    version = incident["what"].split(f"({model} version ", 1)[1].split(")")[0]
    assert incident["action"] == f"reload {model} version {version}"  # the version that served, pinned
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
    lines = serve.lookalike_lines()
    assert any("tritonserver exited with code -9: restarting tritonserver" in line for line in lines), lines[-10:]


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


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_the_health_port_holds_idle_connections_near_the_descriptor_limit_and_so_does_the_supervisor(serve, catalog):
    """Idle connections to the health port (each sends a request line and nothing more) held near the
    file-descriptor limit of `lookalike serve`: probes and searches go on, tritonserver is left alone.
    Then the limit is cut below what the process holds, so that its own /proc reads and calls to
    tritonserver fail with EMFILE for a while: logged, retried, nothing killed."""
    pid = serve.process.pid
    triton = serve.tritonserver_pid()
    restarts, incidents = serve.status()["restarts"], len(serve.status()["incidents"])
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    image = query_image(catalog)
    with LookalikeClient(serve.grpc, timeout_s=30) as client:
        expected = client.search(image, top_k=3)
    idle = []
    baseline = open_fds(pid)
    try:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (300, hard))
        for _ in range(400):
            sock = socket.create_connection(("127.0.0.1", serve.options.health_port), timeout=10)
            sock.sendall(b"GET /ready HTTP/1.1\r\n")
            idle.append(sock)
        time.sleep(1.0)
        held = open_fds(pid)
        print(f"\nlookalike serve holds {held} descriptors ({baseline} before) with 400 idle connections to its "
              "health port")
        with LookalikeClient(serve.grpc, timeout_s=30) as client:
            for _ in range(40):
                assert client.search(image, top_k=3) == expected
                probe = serve.health()
                assert probe[0] == 200, (probe, open_fds(pid), serve.lookalike_lines()[-5:])
        assert held <= baseline + 64 + 8, (baseline, held)  # the health port's cap, not one per connection
    finally:
        for sock in idle:
            sock.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    assert serve.tritonserver_pid() == triton and serve.status()["restarts"] == restarts

    resource.prlimit(pid, resource.RLIMIT_NOFILE, (3, hard))  # every open() of `lookalike serve` fails now
    try:
        time.sleep(3.0)
        with LookalikeClient(serve.grpc, timeout_s=30) as client:  # tritonserver serves on, unharmed
            assert client.search(image, top_k=3) == expected
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    serve.wait_ready(timeout_s=30)
    status = serve.status()
    assert status["tritonserver_pid"] == triton and status["restarts"] == restarts
    assert len(status["incidents"]) == incidents, status["incidents"]
    wait_for(lambda: any("watching tritonserver again" in line for line in serve.lookalike_lines()), 10.0,
             what="the supervisor watching again")
    lines = "\n".join(serve.lookalike_lines())
    assert "cannot watch tritonserver" in lines and "Too many open files" in lines, lines[-3000:]


def small_catalog(catalog: Path, tmp_path: Path, products: int = 5) -> Path:
    rows = (catalog / "catalog.csv").read_text().splitlines()
    out = tmp_path / "small.csv"
    out.write_text("\n".join([rows[0]] + [row.replace(",images/", f",{catalog}/images/") for row in rows[1 : 1 + products]]) + "\n")
    return out


def tiny_index(repo, products: int = 3) -> ProductIndex:
    from lookalike.serving.index_files import Product

    dim = repo.manifest().dim
    vectors = np.eye(products, dim, dtype=np.float32)
    return ProductIndex.build([Product(f"tiny-{i}") for i in range(products)], vectors, dim=dim,
                              embedder_fingerprint=repo.manifest().fingerprint)


def test_a_crash_repair_keeps_the_version_that_served(tmp_path, catalog):
    """A newer index version sits on disk, never loaded. Neither a killed product_search stub nor a
    killed tritonserver makes the server move to it: the repair reloads the version that served, and
    the restart loads it pinned. `lookalike index` then moves the server on, as it should. The server
    runs with --require-admin-key: /status needs the key, /ready does not."""
    from lookalike.indexing.publishing import serving_records, write_index_version

    key = "k3y-for-tests"
    s = new_serve(tmp_path)
    s.args, s.env = ["--require-admin-key"], {c.ADMIN_KEY_ENV: key}
    s.start()
    try:
        assert s.health("/status")[0] == 403 and s.health("/ready")[0] == 200
        with LookalikeClient(s.grpc, admin_key=key) as client:
            served = index_catalog(small_catalog(catalog, tmp_path), s.repo, client, progress=False).version
            newer = write_index_version(s.repo, tiny_index(s.repo).save)
            assert newer > served
            wait_for(lambda: s.status().get("index_version") == served and any(  # the supervisor has seen the swap
                f"(product_search version {served})" in name for name in s.status()["stubs"]), 30.0, what="the swap")
            (record,) = serving_records(s.repo)  # what `lookalike index` keeps from pruning, and names
            assert (record.version, record.pid, record.server_id) == (served, s.process.pid, client.info().server_id)

            run = kill_and_recover(s, "product_search", [query_image(catalog)], settle_s=1.0)
            assert run["incidents"][0]["action"] == f"reload product_search version {served}", run["incidents"]
            assert client.served_index_versions() == [served] and client.info().index_version == served

            run = kill_and_recover(s, "tritonserver", [query_image(catalog)], settle_s=1.0)
            (incident,) = [i for i in run["incidents"] if i["action"].startswith("restart")]
            assert f"kept at index version {served}" in incident["action"], incident
            assert client.served_index_versions() == [served] and client.info().index_version == served
            assert client.search(query_image(catalog), top_k=1)[0].product_id != "tiny-0"

            report = index_catalog(small_catalog(catalog, tmp_path), s.repo, client, progress=False)
            assert client.info().index_version == report.version > newer  # a plain load moves on again
    finally:
        assert s.stop() == 0, s.text()[-3000:]
    lines = "\n".join(s.lookalike_lines())
    assert f"serving index version {served} as before" in lines, lines[-3000:]
    assert serving_records(s.repo) == []  # removed when it stopped
