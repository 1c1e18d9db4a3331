"""tritonserver's Python-backend stub processes, as /proc shows them.

python_backend (r24.10) runs each model instance in a process of its own, started with
`bash -c "exec <stub> <repository>/<model>/<version>/model.py <shm region> <shm size> <shm growth>
<tritonserver pid> <backend dir> <ipc handle> <instance name> <env>"`: its command line says which
model, version and instance it serves, and which tritonserver started it.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

STUB_BINARY = "triton_python_backend_stub"
DEAD_STATES = frozenset("ZXx")  # zombie, dead
STOPPED_STATES = frozenset("Tt")  # stopped by a signal, or by a tracer
# A /proc entry that is not there (any more) means the process is gone; any other failure (too many
# open files, no memory, permission) means only that this process could not look.
GONE_ERRNOS = frozenset({errno.ENOENT, errno.ESRCH})


class ProcUnreadable(OSError):
    """/proc could not be read for a reason of the reader's own (EMFILE, ENFILE, ENOMEM, EACCES, ...):
    says nothing about the process looked at, which must not be taken for dead."""

    def __init__(self, what: str, cause: OSError) -> None:
        super().__init__(cause.errno, f"cannot read {what}: {cause.strerror or cause}")
        self.cause = cause


def _gone_or_raise(what: str, exc: OSError) -> None:
    """Returns when `exc` says the process is gone; raises ProcUnreadable otherwise."""
    if exc.errno in GONE_ERRNOS:
        return
    raise ProcUnreadable(what, exc) from exc


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
    """/proc/<pid>/stat from field 3 (state) on; None when the process no longer exists (ProcUnreadable
    when it could not be read for another reason)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read().decode(errors="replace")
    except OSError as exc:
        _gone_or_raise(f"/proc/{pid}/stat", exc)
        return None
    return stat.rsplit(")", 1)[-1].split()  # the name in parentheses may hold spaces


def read_state(pid: int) -> str | None:
    """The one-letter state of a process (R, S, D, T, Z, ...), None when it no longer exists. Raises
    ProcUnreadable when /proc could not be read (never None then: "I could not look" is not "gone")."""
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def _argv(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return [a.decode(errors="replace") for a in handle.read().split(b"\0") if a]
    except OSError as exc:
        _gone_or_raise(f"/proc/{pid}/cmdline", exc)
        return []


def _children(pid: int) -> list[int]:
    """Child pids of a process: /proc/<pid>/task/<tid>/children lists the children that each thread
    forked (tritonserver forks stubs from its model-loading threads)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError as exc:
        _gone_or_raise(f"/proc/{pid}/task", exc)
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as handle:
                out += [int(p) for p in handle.read().split()]
        except OSError as exc:
            _gone_or_raise(f"/proc/{pid}/task/{tid}/children", exc)
    return out


def list_stubs(server_pid: int) -> list[StubProcess]:
    """The model instances' stubs that tritonserver `server_pid` started (children or grandchildren,
    in case a launcher shell stands between). Zombies have lost their command line: not listed.
    Raises ProcUnreadable when /proc could not be read: a partial listing is never returned."""
    stubs: list[StubProcess] = []
    for child in _children(server_pid):
        for pid in [child, *_children(child)]:
            stub = parse_stub_argv(_argv(pid))
            fields = _stat_fields(pid)
            if stub is not None and fields is not None:
                stubs.append(StubProcess(pid, stub, int(fields[19])))
    return stubs


def kill_stubs_of(server_pid: int, attempts: int = 20, retry_s: float = 0.25) -> list[int]:
    """SIGKILLs the stubs that tritonserver `server_pid`, now gone, left running; returns their pids.

    A stub is meant to exit when its tritonserver does, but its health thread first takes a mutex in
    shared memory without a timeout: when tritonserver died holding it (SIGKILL, OOM), the stub
    waits forever, holding its memory. Its command line names the tritonserver that started it.

    When /proc cannot be read (this process out of file descriptors, say), it tries again `attempts`
    times, `retry_s` apart, then raises ProcUnreadable: the caller decides, nothing is assumed."""
    for attempt in range(attempts):
        try:
            return _kill_stubs_of(server_pid)
        except ProcUnreadable:
            if attempt == attempts - 1:
                raise
            time.sleep(retry_s)
    return []


def _kill_stubs_of(server_pid: int) -> list[int]:
    killed = []
    try:
        entries = os.listdir("/proc")
    except OSError as exc:
        raise ProcUnreadable("/proc", exc) from exc
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            argv = _argv(int(entry))
        except ProcUnreadable as exc:
            if exc.errno in (errno.EACCES, errno.EPERM):  # another user's process: not a stub of ours
                continue
            raise
        if len(argv) > 5 and os.path.basename(argv[0]) == STUB_BINARY and argv[5] == str(server_pid):
            try:
                os.kill(int(entry), signal.SIGKILL)
                killed.append(int(entry))
            except OSError:
                continue
    return killed
