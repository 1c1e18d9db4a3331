"""Reading the files a caller names (an image path given to the SDK, a catalog's rows, a query CSV's
photos), safely: the one place that opens them.

Only regular files are read, symbolic links followed: a FIFO (which would block an open or a read
for ever), a device such as /dev/zero (which never ends), a directory or a socket is refused, naming
what it is. A file's size is checked against the limit before a byte of it is read, and no more than
the limit and one byte is ever read, so that a file that grows meanwhile is refused too. Every refusal
is a `FileRefusedError` (an OSError) whose `kind` says why:

- "missing": no such file (errno ENOENT);
- "not_regular": a FIFO, a character or block device, a directory or a socket;
- "too_large": over the limit (errno EFBIG);
- "name_too_long": a name over 255 bytes or a path over 4,096 (errno ENAMETOOLONG);
- "unreadable": anything else the system refused (permission denied, a loop of symbolic links, an
  I/O error, a name with a NUL character), with the system's own errno.

Relative paths resolve against `base` when one is given (a CSV's folder), else against the working
directory; absolute paths are taken as they are.
"""

from __future__ import annotations

import errno as errnos
import io
import os
import stat
from typing import Union, cast

from . import contract as c

StrPath = Union[str, "os.PathLike[str]"]

FILE_KINDS = ("missing", "not_regular", "too_large", "name_too_long", "unreadable")
NAME_MAX = 255  # bytes of one name, on Linux's file systems
PATH_MAX = 4096  # bytes of a whole path, on Linux
# O_NONBLOCK: opening a FIFO that no one writes returns at once instead of waiting for a writer.
# O_NOCTTY: a terminal device never becomes this process's controlling terminal.
_OPEN_FLAGS = (os.O_RDONLY | int(getattr(os, "O_NONBLOCK", 0)) | int(getattr(os, "O_NOCTTY", 0))
               | int(getattr(os, "O_CLOEXEC", 0)) | int(getattr(os, "O_BINARY", 0)))
_CHUNK = 1 << 20


class FileRefusedError(OSError):
    """A file that was not read: `path` (as resolved), `kind` (one of FILE_KINDS) and `reason`, the
    problem in words ("not a regular file (a FIFO)"); str() names the path too. `errno` is set where
    one fits (ENOENT, EFBIG, ENAMETOOLONG, EISDIR, or the system's own)."""

    def __init__(self, path: str, kind: str, reason: str, errno: int | None = None) -> None:
        super().__init__(errno, reason)
        self.path = path
        self.kind = kind
        self.reason = reason
        self.filename = path

    def __str__(self) -> str:
        return f"{c.quoted(self.path)}: {self.reason}"

    def __reduce__(self) -> tuple[type[FileRefusedError], tuple[str, str, str, int | None]]:
        return type(self), (self.path, self.kind, self.reason, self.errno)


# A refusal is also the OSError subclass that the plain read would have raised, so that code that
# catches FileNotFoundError, IsADirectoryError or PermissionError keeps working.
class _Missing(FileRefusedError, FileNotFoundError):
    pass


class _IsADirectory(FileRefusedError, IsADirectoryError):
    pass


class _PermissionDenied(FileRefusedError, PermissionError):
    pass


def _refused(path: str, kind: str, reason: str, errno: int | None = None) -> FileRefusedError:
    if kind == "missing":
        return _Missing(path, kind, reason, errno)
    if errno == errnos.EISDIR:
        return _IsADirectory(path, kind, reason, errno)
    if errno in (errnos.EACCES, errnos.EPERM):
        return _PermissionDenied(path, kind, reason, errno)
    return FileRefusedError(path, kind, reason, errno)


def _from_os(path: str, exc: OSError) -> FileRefusedError:
    """What the system said of `path`, as a refusal."""
    if isinstance(exc, FileRefusedError):
        return exc
    if exc.errno in (errnos.ENOENT, errnos.ENOTDIR):
        return _refused(path, "missing", "file not found", errnos.ENOENT)
    if exc.errno == errnos.ENAMETOOLONG:
        return _refused(path, "name_too_long", f"file name too long (a name over {NAME_MAX} bytes or a path over "
                                               f"{PATH_MAX:,})", errnos.ENAMETOOLONG)
    return _refused(path, "unreadable", f"cannot read: {exc.strerror or exc}", exc.errno)


def _bad_name(path: str) -> FileRefusedError:
    """A name the system cannot even be asked about (os functions raise ValueError for it)."""
    what = "holds a NUL character" if "\0" in path else "cannot be encoded for the file system"
    return _refused(path, "unreadable", f"cannot read: the file name {what}", errnos.EINVAL)


def _what_it_is(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "neither a file nor a directory"


def check_max_bytes(max_bytes: int | None) -> None:
    """ValueError unless `max_bytes` is None or an int >= 0."""
    limit = cast(object, max_bytes)  # checked as what a caller may pass, whatever the annotation says
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"max_bytes must be an int >= 0, got {max_bytes!r}")


def _checked(path: str, status: os.stat_result, max_bytes: int | None, what: str) -> int:
    """The size of a regular file within `max_bytes`; else the refusal."""
    if not stat.S_ISREG(status.st_mode):
        raise _refused(path, "not_regular", f"not a regular file ({_what_it_is(status.st_mode)})",
                       errnos.EISDIR if stat.S_ISDIR(status.st_mode) else None)
    if max_bytes is not None and status.st_size > max_bytes:
        raise _refused(path, "too_large", f"{what} too large: {status.st_size:,} bytes, the limit is {max_bytes:,} bytes",
                       errnos.EFBIG)
    return status.st_size


def resolve(path: StrPath, base: StrPath | None = None) -> str:
    """`path` as a string, relative to `base` when it is relative and `base` is given."""
    name = os.fspath(path)
    return name if base is None else os.path.join(os.fspath(base), name)


def check_file(path: StrPath, *, base: StrPath | None = None, max_bytes: int | None = None,
               what: str = "image") -> int:
    """The size of a regular file (symbolic links followed), without opening it; FileRefusedError when
    it is missing, not a regular file, over `max_bytes` (when given) or cannot be looked at. `what`
    names the file in the too-large message ("image too large: ...")."""
    check_max_bytes(max_bytes)
    full = resolve(path, base)
    try:
        status = os.stat(full)
    except OSError as exc:
        raise _from_os(full, exc) from None
    except ValueError:
        raise _bad_name(full) from None
    return _checked(full, status, max_bytes, what)


def _open_checked(full: str, max_bytes: int | None, what: str) -> tuple[int, int]:
    """(descriptor, size) of a regular file within `max_bytes`: checked by path first (a device is
    never opened), opened without blocking, checked again on the descriptor (the file the path names
    may have changed in between)."""
    check_file(full, max_bytes=max_bytes, what=what)
    try:
        fd = os.open(full, _OPEN_FLAGS)
    except OSError as exc:
        raise _from_os(full, exc) from None
    except ValueError:
        raise _bad_name(full) from None
    try:
        size = _checked(full, os.fstat(fd), max_bytes, what)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except OSError as exc:
        os.close(fd)
        raise _from_os(full, exc) from None
    except BaseException:
        os.close(fd)
        raise
    return fd, size


def read_file(path: StrPath, max_bytes: int, *, base: StrPath | None = None, what: str = "image") -> bytes:
    """The bytes of a regular file of at most `max_bytes` bytes (see the module's docstring); never
    blocks on a FIFO, never reads more than `max_bytes` + 1 bytes."""
    check_max_bytes(max_bytes)
    full = resolve(path, base)
    fd, size = _open_checked(full, max_bytes, what)
    chunks: list[bytes] = []
    total = 0
    try:
        want = min(size, max_bytes) + 1  # the whole file and its end, in one read as a rule
        while total <= max_bytes:
            chunk = os.read(fd, min(max_bytes + 1 - total, want))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            want = _CHUNK
    except OSError as exc:
        raise _from_os(full, exc) from None
    finally:
        os.close(fd)
    if total > max_bytes:
        raise _refused(full, "too_large", f"{what} too large: it grew past the limit of {max_bytes:,} bytes while "
                                          "being read", errnos.EFBIG)
    return b"".join(chunks)


def open_file(path: StrPath, *, base: StrPath | None = None, max_bytes: int | None = None,
              what: str = "file") -> io.BufferedReader:
    """A regular file, checked as `read_file` checks it (`max_bytes` when given), opened for reading in
    binary: for streaming a large file (hashing it, say) or a CSV (wrap it in io.TextIOWrapper). The
    caller closes it (`with open_file(...) as handle:`)."""
    check_max_bytes(max_bytes)
    fd, _ = _open_checked(resolve(path, base), max_bytes, what)
    try:
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
