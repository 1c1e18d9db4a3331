"""A local Milvus standalone server (the `milvus==2.3.5` wheel's `milvus-server`: embedded etcd, local
storage, no Docker) for the tests, the benchmarks and trying the Milvus backend on one machine.

Every component is bound to 127.0.0.1. The server runs in a process group of its own and is stopped by
signalling that group: SIGINT, as Ctrl-C would (the whole group is gone in about a second); SIGTERM
leaves the child `milvus run standalone` hanging and still listening. SIGKILL follows after a grace.
Either way its components' etcd sessions may stay behind until their lease (30 s) expires, and the next
start on the same directory was ready 13-55 s after the stop (5-10 s on a fresh one), and once in seven
never (its proxy never registered): each test session starts on a fresh directory, and only the restart
test, which runs last, starts one on a used directory.
Its internal ports are the wheel's defaults (etcd 2379, the coordinators' 53100, 19529...; `milvus-server`
has flags to move them, not used here): one such server runs on a host at a time; the client port is
free to choose.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

COMPONENTS = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexNode", "dataCoord", "dataNode")
STOP_GRACE_S = 10.0


class MilvusStartError(RuntimeError):
    pass


def milvus_server_binary() -> str | None:
    here = Path(sys.executable).parent / "milvus-server"
    return str(here) if here.exists() else shutil.which("milvus-server")


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class MilvusServer:
    """`with MilvusServer(data_dir, port) as milvus:` ... `milvus.uri`."""

    def __init__(self, data_dir: Path, port: int, log_file: Path | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.port = port
        self.log_file = log_file
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0, wait_for_host_s: float = 0.0) -> "MilvusServer":
        """Starts the server and waits until it answers. Another Milvus standalone on this host (its etcd
        port is taken) is waited for up to `wait_for_host_s`, then MilvusStartError."""
        binary = milvus_server_binary()
        if binary is None:
            raise MilvusStartError("no milvus-server: pip install milvus==2.3.5 (make setup does)")
        deadline = time.monotonic() + wait_for_host_s
        while _port_open(2379) and time.monotonic() < deadline:
            time.sleep(1.0)
        if _port_open(2379):
            raise MilvusStartError("port 2379 (etcd) is in use: another Milvus standalone runs on this host")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [binary, "--data", str(self.data_dir), "--proxy-port", str(self.port)]
        for component in COMPONENTS:
            args += ["--extra-config", f"{component}.ip=127.0.0.1"]
        self._log = open(self.log_file, "ab") if self.log_file else None
        self.process = subprocess.Popen(args, stdout=self._log or subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        from pymilvus import MilvusClient

        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise MilvusStartError(f"milvus-server exited with {self.process.returncode} (log: {self.log_file})")
            if _port_open(self.port):
                try:
                    client = MilvusClient(uri=self.uri, timeout=5)
                    try:
                        client.list_collections()
                        return
                    finally:
                        client.close()
                except Exception as exc:  # noqa: BLE001 - not ready yet
                    last = exc
            time.sleep(0.5)
        self.stop()
        raise MilvusStartError(f"milvus did not get ready within {timeout_s:.0f} s ({last}; log: {self.log_file})")

    def stop(self) -> None:
        """SIGINT to the process group, SIGKILL after STOP_GRACE_S; waits until its ports are closed."""
        process, self.process = self.process, None
        if process is not None:
            for sig, wait in ((signal.SIGINT, STOP_GRACE_S), (signal.SIGKILL, 30.0)):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                deadline = time.monotonic() + wait
                while time.monotonic() < deadline and _group_alive(process.pid):
                    process.poll()
                    time.sleep(0.1)
                if not _group_alive(process.pid):
                    break
            process.poll()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and (_port_open(self.port) or _port_open(2379)):
                time.sleep(0.1)
        if self._log is not None:
            self._log.close()
            self._log = None

    def pause(self) -> None:
        """Freezes the whole server (SIGSTOP to its group): it accepts connections and answers nothing, as
        a Milvus that hangs or sits behind a network partition."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGCONT)

    def __enter__(self) -> "MilvusServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a group of zombies only: reaped by our wait
    return any(_state(pid) not in ("Z", None) for pid in _group_members(pgid))


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                members.append(int(entry.name))
    return members


def _state(pid: int) -> str | None:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None
