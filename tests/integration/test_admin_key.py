"""Model control restricted to the admin key, as `lookalike serve` does beyond loopback (forced on here,
on loopback, so that no test binds a public address)."""

import asyncio

import pytest
from PIL import Image

from lookalike.indexing.publishing import write_empty_index
from lookalike.indexing.repository import copy_repository
from lookalike.server.launcher import ServerOptions, free_port
from lookalike.server.serve import lookalike_server
from lookalike_client import AsyncLookalikeClient, LookalikeClient, PermissionDeniedError
from tests.conftest import REPOSITORY, encode

pytestmark = pytest.mark.integration


def test_model_control_needs_the_admin_key_inference_does_not(tmp_path):
    repo = copy_repository(REPOSITORY, tmp_path / "model_repository")
    write_empty_index(repo)
    options = ServerOptions(model_repository=repo.root, http_port=free_port(), grpc_port=free_port(),
                            metrics_port=free_port(), restrict_admin=True, admin_key="k3y-for-tests")
    image = encode(Image.new("RGB", (32, 32), (10, 200, 10)), "PNG")
    with lookalike_server(options, log_file=tmp_path / "tritonserver.log"):
        for protocol, url in (("grpc", options.grpc_url), ("http", options.http_url)):
            with LookalikeClient(url, protocol=protocol, admin_key="") as anonymous:
                assert anonymous.search(image, top_k=3) == []  # inference is open (empty catalog)
                with pytest.raises(PermissionDeniedError, match="restricted, expecting header .*lookalike-admin-key"):
                    anonymous.reload_index()
            with LookalikeClient(url, protocol=protocol, admin_key="wrong") as wrong:
                with pytest.raises(PermissionDeniedError):
                    wrong.reload_index()
            with LookalikeClient(url, protocol=protocol, admin_key="k3y-for-tests") as admin:
                admin.reload_index()
                assert admin.is_ready()

            async def reload(key: str, url: str = url, protocol: str = protocol) -> None:
                async with AsyncLookalikeClient(url, protocol=protocol, admin_key=key) as client:
                    await client.reload_index()

            with pytest.raises(PermissionDeniedError) as denied:  # the asyncio client, the same
                asyncio.run(reload(""))
            assert denied.value.status is not None and "lookalike-admin-key" in denied.value.detail
            asyncio.run(reload("k3y-for-tests"))


def test_the_supervisor_repairs_with_the_admin_key_where_model_control_is_restricted(tmp_path):
    """Its repository index and reload calls are restricted APIs: it must send the key."""
    import os
    import signal
    import threading
    import time

    from lookalike.server.supervisor import Supervisor, SupervisorOptions

    repo = copy_repository(REPOSITORY, tmp_path / "model_repository")
    options = ServerOptions(model_repository=repo.root, http_port=free_port(), grpc_port=free_port(),
                            metrics_port=free_port(), restrict_admin=True, admin_key="k3y-for-tests")
    lines = []
    with lookalike_server(options, log_file=tmp_path / "tritonserver.log") as server:
        supervisor = Supervisor(server, SupervisorOptions(interval_s=0.1), log=lines.append)
        supervisor.check()  # learn the stubs
        (victim,) = [p for s, p in supervisor.watch.current.items() if s.model == "product_search"]
        stop = threading.Event()
        watcher = threading.Thread(target=supervisor.run, args=(stop,), daemon=True)
        watcher.start()
        os.kill(victim.pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not any(i.recovered_after_s is not None for i in supervisor.incidents):
            assert time.monotonic() < deadline, lines
            time.sleep(0.1)
        stop.set()
        watcher.join(timeout=30)
        assert supervisor.readiness() == (True, "ready"), lines
        assert not any("failed" in line for line in lines), lines
        with LookalikeClient(options.grpc_url, admin_key="") as anonymous:
            assert anonymous.search(encode(Image.new("RGB", (32, 32), (10, 200, 10)), "PNG"), top_k=3) == []
