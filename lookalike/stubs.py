"""tritonserver's Python-backend stub processes, as /proc shows them.

python_backend (r24.10) runs each model instance in a process of its own, started with
`bash -c "exec <stub> <repository>/<model>/<version>/model.py <shm region> <shm size> <shm growth>
<tritonserver pid> <backend dir> <ipc handle> <instance name> <env>"`: its command line says which
model, version and instance it serves, and which tritonserver started it.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

STUB_BINARY = "triton_python_backend_stub"
DEAD_STATES = frozenset("ZXx")  # zombie, dead
STOPPED_STATES = frozenset("Tt")  # stopped by a signal, or by a tracer


@dataclass(frozen=True, order=True)
class StubId:
    model: str
    version: str
    instance: str  # e.g. "preprocess_0_1"

    def __str__(self) -> str:
        return f"{self.instance} ({self.model} version {self.version})"


def parse_stub_argv(argv: list[str]) -> StubId | None:
    """The identity of a model instance's stub from its command line, or None for another process."""
    if not argv or os.path.basename(argv[0]) != STUB_BINARY or len(argv) < 9:
        return None
    model_file = Path(argv[1])
    model, instance = model_file.parent.parent.name, argv[8]
    if instance == model:  # the short-lived stub that completes a model's config while it loads
        return None
    return StubId(model=model, version=model_file.parent.name, instance=instance)


@dataclass(frozen=True)
class StubProcess:
    pid: int
    stub: StubId
    started: int  # clock ticks after boot (/proc/<pid>/stat field 22): pids wrap, start times do not


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from field 3 (state) on; None when the process no longer exists."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read().decode(errors="replace")
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()  # the name in parentheses may hold spaces


def read_state(pid: int) -> str | None:
    """The one-letter state of a process (R, S, D, T, Z, ...), None when it no longer exists."""
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def _argv(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return [a.decode(errors="replace") for a in handle.read().split(b"\0") if a]
    except OSError:
        return []


def _children(pid: int) -> list[int]:
    """Child pids of a process: /proc/<pid>/task/<tid>/children lists the children that each thread
    forked (tritonserver forks stubs from its model-loading threads)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as handle:
                out += [int(p) for p in handle.read().split()]
        except OSError:
            continue
    return out


def list_stubs(server_pid: int) -> list[StubProcess]:
    """The model instances' stubs that tritonserver `server_pid` started (children or grandchildren,
    in case a launcher shell stands between). Zombies have lost their command line: not listed."""
    stubs: list[StubProcess] = []
    for child in _children(server_pid):
        for pid in [child, *_children(child)]:
            stub = parse_stub_argv(_argv(pid))
            fields = _stat_fields(pid)
            if stub is not None and fields is not None:
                stubs.append(StubProcess(pid, stub, int(fields[19])))
    return stubs


def kill_stubs_of(server_pid: int) -> list[int]:
    """SIGKILLs the stubs that tritonserver `server_pid`, now gone, left running; returns their pids.

    A stub is meant to exit when its tritonserver does, but its health thread first takes a mutex in
    shared memory without a timeout: when tritonserver died holding it (SIGKILL, OOM), the stub
    waits forever, holding its memory. Its command line names the tritonserver that started it."""
    killed = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        argv = _argv(int(entry))
        if len(argv) > 5 and os.path.basename(argv[0]) == STUB_BINARY and argv[5] == str(server_pid):
            try:
                os.kill(int(entry), signal.SIGKILL)
                killed.append(int(entry))
            except OSError:
                continue
    return killed
