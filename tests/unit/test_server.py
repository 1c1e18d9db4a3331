"""lookalike.server.launcher: command line, restricted APIs beyond loopback, binary discovery."""

import os
from pathlib import Path

import pytest

from lookalike.server.launcher import Binary, LaunchError, ServerOptions, build_command, find_tritonserver

BINARY = Binary(Path("/opt/tritonserver/bin/tritonserver"), {}, None)


def test_loopback_command(tmp_path):
    args = build_command(ServerOptions(model_repository=tmp_path, http_port=1, grpc_port=2, metrics_port=3), BINARY)
    assert args[0] == str(BINARY.path)
    for flag in (f"--model-repository={tmp_path.resolve()}", "--model-control-mode=explicit", "--load-model=*",
                 "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1",
                 "--http-port=1", "--grpc-port=2", "--metrics-port=3"):
        assert flag in args
    assert not any("restricted" in a for a in args)
    assert not any(a.startswith("--backend-directory") for a in args)


def test_beyond_loopback_needs_a_key(tmp_path, monkeypatch):
    monkeypatch.delenv("LOOKALIKE_ADMIN_KEY", raising=False)
    with pytest.raises(LaunchError, match="LOOKALIKE_ADMIN_KEY"):
        build_command(ServerOptions(model_repository=tmp_path, host="0.0.0.0"), BINARY)
    monkeypatch.setenv("LOOKALIKE_ADMIN_KEY", "s3cret")
    args = build_command(ServerOptions(model_repository=tmp_path, host="0.0.0.0"), BINARY)
    restriction = "model-repository,shared-memory,trace,logging:lookalike-admin-key=s3cret"
    assert f"--http-restricted-api={restriction}" in args
    assert f"--grpc-restricted-protocol={restriction}" in args


def test_model_config_name(tmp_path):
    args = build_command(ServerOptions(model_repository=tmp_path, model_config_name="onnxruntime"), BINARY)
    assert "--model-config-name=onnxruntime" in args


def test_wheel_binary_gets_its_libraries_stub_and_python(monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin")  # no tritonserver on PATH
    binary = find_tritonserver()
    assert binary.path.name == "tritonserver" and binary.path.exists()
    assert "nvidia_pytriton.libs" in binary.env["LD_LIBRARY_PATH"]
    assert binary.env["PATH"].split(os.pathsep)[0] == str(Path(os.sys.executable).parent)
    stub = binary.backend_directory / "python" / "triton_python_backend_stub"
    assert stub.exists() and os.access(stub, os.X_OK)
    assert (binary.backend_directory / "python" / "libtriton_python.so").exists()


def test_port_check_ignores_time_wait_but_not_listeners():
    """A stopped server's TIME-WAIT connections (about 60 s) must not block its successor; a socket
    that another process listens on, with or without SO_REUSEPORT (gRPC's), still does."""
    import socket

    from lookalike.server.launcher import port_is_free

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    accepted.close()  # the server side closes first: its end goes to TIME-WAIT
    client.recv(1)
    client.close()
    assert not port_is_free("127.0.0.1", port)
    listener.close()
    states = [line.split()[3] for table in ("/proc/net/tcp", "/proc/net/tcp6")
              for line in open(table).read().splitlines()[1:] if int(line.split()[1].rsplit(":", 1)[1], 16) == port]
    assert "06" in states  # TIME-WAIT, as after a restart
    assert port_is_free("127.0.0.1", port)
    shared = socket.socket()
    shared.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    shared.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    shared.bind(("127.0.0.1", port))
    shared.listen()
    try:
        assert not port_is_free("127.0.0.1", port)
    finally:
        shared.close()
