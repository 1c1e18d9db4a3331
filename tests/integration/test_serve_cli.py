"""`lookalike serve` as a user runs it: banner with the URLs once ready, SIGINT/SIGTERM forwarded, clean
exit, no tritonserver left behind."""

import os
import signal
import subprocess
import sys
import time

import pytest

from lookalike.indexing.repository import copy_repository
from lookalike.server.launcher import free_port
from tests.conftest import REPOSITORY

pytestmark = pytest.mark.integration


def tritonservers_under(repo) -> list[str]:
    out = subprocess.run(["pgrep", "-af", f"tritonserver.*{repo}"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_prints_urls_when_ready_and_stops_cleanly_on_signal(tmp_path, sig):
    repo = copy_repository(REPOSITORY, tmp_path / "model_repository")
    http, grpc, metrics = free_port(), free_port(), free_port()
    lookalike = os.path.join(os.path.dirname(sys.executable), "lookalike")
    process = subprocess.Popen(
        [lookalike, "serve", "--model-repository", str(repo.root), "--http-port", str(http),
         "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    banner = []
    deadline = time.monotonic() + 180
    try:
        for line in process.stderr:
            banner.append(line)
            if line.strip().startswith("metrics"):
                break
            assert time.monotonic() < deadline, "no ready banner in time"
        text = "".join(banner)
        assert "visual_search is ready" in text
        assert f"gRPC     127.0.0.1:{grpc}" in text and f"HTTP     http://127.0.0.1:{http}" in text
        assert tritonservers_under(repo.root)
        process.send_signal(sig)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    time.sleep(1)
    assert not tritonservers_under(repo.root), "tritonserver outlived `lookalike serve`"


def test_serve_refuses_a_model_config_name_the_embedder_has_no_config_for(tmp_path):
    """tritonserver would serve config.pbtxt (the Python/ONNX Runtime CPU embedder) in its place."""
    repo = copy_repository(REPOSITORY, tmp_path / "model_repository")
    assert not (repo.embedder_dir / "configs" / "tensorrt.pbtxt").exists()  # no engine was built here
    lookalike = os.path.join(os.path.dirname(sys.executable), "lookalike")
    done = subprocess.run(
        [lookalike, "serve", "--model-repository", str(repo.root), "--model-config-name", "tensorrt",
         "--http-port", str(free_port()), "--grpc-port", str(free_port()), "--metrics-port", str(free_port()),
         "--health-port", "0"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "--model-config-name tensorrt: the embedder has no configs/tensorrt.pbtxt" in done.stderr
    assert "it has onnxruntime" in done.stderr and not tritonservers_under(repo.root)
