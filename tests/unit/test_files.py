"""lookalike_client.files: only regular files are read, never a FIFO or a device, the size checked first."""

import errno
import hashlib
import os
import pickle
import socket
import tracemalloc

import pytest

from lookalike_client import FileRefusedError, files
from lookalike_client.contract import quoted
from lookalike_client.files import check_file, open_file, read_file
from tests.conftest import finishes

LIMIT = 20 * 1024 * 1024


def refusal(call) -> FileRefusedError:
    with pytest.raises(FileRefusedError) as info:
        finishes(call)
    return info.value


def test_a_regular_file_is_read_relative_to_its_base_or_absolute(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"\xff\xd8abc")
    (tmp_path / "b.jpg").write_bytes(b"b")
    assert read_file("photos/a.jpg", 10, base=tmp_path) == b"\xff\xd8abc"
    assert read_file(tmp_path / "photos" / "a.jpg", 5) == b"\xff\xd8abc"  # exactly the limit
    assert read_file(str(tmp_path / "b.jpg"), 10, base=tmp_path / "elsewhere") == b"b"  # absolute: base ignored
    assert read_file("../b.jpg", 10, base=tmp_path / "photos") == b"b"
    assert check_file("photos/a.jpg", base=tmp_path) == 5
    os.symlink(tmp_path / "photos" / "a.jpg", tmp_path / "link.jpg")  # links to regular files are followed
    assert read_file(tmp_path / "link.jpg", 10) == b"\xff\xd8abc"
    with open_file(tmp_path / "link.jpg") as handle:
        assert handle.read() == b"\xff\xd8abc"
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert read_file(tmp_path / "empty.jpg", 10) == b""


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "x.fifo"
    os.mkfifo(fifo)
    for call in (lambda: read_file(fifo, LIMIT), lambda: open_file(fifo), lambda: check_file(fifo)):
        err = refusal(call)
        assert err.kind == "not_regular" and err.path == str(fifo)
        assert str(err) == f"{quoted(str(fifo))}: not a regular file (a FIFO)"
        assert err.reason == "not a regular file (a FIFO)"


def test_a_fifo_swapped_in_after_the_check_is_refused_on_its_descriptor(tmp_path, monkeypatch):
    """The path is checked, then opened (O_NONBLOCK: a FIFO's open returns at once), then checked again."""
    fifo = tmp_path / "x.fifo"
    os.mkfifo(fifo)
    monkeypatch.setattr(files, "check_file", lambda *args, **kwargs: 0)  # as if it had been a file a moment ago
    err = refusal(lambda: read_file(fifo, LIMIT))
    assert err.kind == "not_regular" and err.reason == "not a regular file (a FIFO)"


def test_devices_directories_and_sockets_are_refused_naming_what_they_are(tmp_path):
    os.symlink("/dev/zero", tmp_path / "zero.jpg")
    err = refusal(lambda: read_file(tmp_path / "zero.jpg", LIMIT))
    assert (err.kind, err.reason) == ("not_regular", "not a regular file (a character device)")
    err = refusal(lambda: read_file(tmp_path, LIMIT))
    assert (err.kind, err.reason, err.errno) == ("not_regular", "not a regular file (a directory)", errno.EISDIR)
    assert isinstance(err, IsADirectoryError)  # what a plain read of a directory raises
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / "s"))
        err = refusal(lambda: read_file(tmp_path / "s", LIMIT))
    assert (err.kind, err.reason) == ("not_regular", "not a regular file (a socket)")


def test_a_large_sparse_file_is_refused_from_its_size_unread(tmp_path):
    huge = tmp_path / "huge.jpg"
    with open(huge, "wb"):
        pass
    os.truncate(huge, 2**31)  # 2 GiB on paper, nothing on disk
    tracemalloc.start()
    try:
        err = refusal(lambda: read_file(huge, LIMIT))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (err.kind, err.errno) == ("too_large", errno.EFBIG)
    assert err.reason == "image too large: 2,147,483,648 bytes, the limit is 20,971,520 bytes"
    assert peak < 1024 * 1024  # not a byte of it was read
    assert refusal(lambda: open_file(huge, max_bytes=LIMIT)).kind == "too_large"
    assert refusal(lambda: check_file(huge, max_bytes=LIMIT, what="photo")).reason.startswith("photo too large: ")
    assert check_file(huge) == 2**31  # no limit given: only its kind is checked


def test_a_file_that_grows_past_the_limit_while_read_is_refused(tmp_path, monkeypatch):
    grown = tmp_path / "grown.jpg"
    grown.write_bytes(b"x" * 100)
    monkeypatch.setattr(files, "_checked", lambda path, status, max_bytes, what: 10)  # it had 10 bytes when checked
    reads = []
    real_read = os.read
    monkeypatch.setattr(files.os, "read", lambda fd, n: reads.append(n) or real_read(fd, n))
    err = refusal(lambda: read_file(grown, 10))
    assert err.kind == "too_large" and "grew past the limit of 10 bytes" in err.reason
    assert sum(reads) <= 11  # never more than the limit and one byte


def test_missing_long_names_and_other_failures(tmp_path):
    err = refusal(lambda: read_file(tmp_path / "nope.jpg", LIMIT))
    assert (err.kind, err.errno, err.reason) == ("missing", errno.ENOENT, "file not found")
    assert isinstance(err, FileNotFoundError)  # callers that caught FileNotFoundError still do
    (tmp_path / "a.txt").write_text("a")
    assert refusal(lambda: read_file(tmp_path / "a.txt" / "b.jpg", LIMIT)).kind == "missing"  # a file mid-path
    long_name = tmp_path / ("n" * 300 + ".jpg")
    err = refusal(lambda: read_file(long_name, LIMIT))
    assert (err.kind, err.errno) == ("name_too_long", errno.ENAMETOOLONG)
    assert err.reason == "file name too long (a name over 255 bytes or a path over 4,096)"
    assert "(" + f"{len(str(long_name)):,} characters)" in str(err)  # the path is quoted, cut short
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    err = refusal(lambda: read_file(tmp_path / "loop", LIMIT))
    assert (err.kind, err.errno) == ("unreadable", errno.ELOOP) and err.reason.startswith("cannot read: ")
    err = refusal(lambda: read_file("a\0b.jpg", LIMIT))
    assert err.kind == "unreadable" and err.reason == "cannot read: the file name holds a NUL character"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_a_file_without_read_permission_is_unreadable(tmp_path):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"x")
    secret.chmod(0)
    err = refusal(lambda: read_file(secret, LIMIT))
    assert (err.kind, err.errno) == ("unreadable", errno.EACCES) and isinstance(err, PermissionError)


def test_the_refusal_is_an_oserror_that_survives_pickling(tmp_path):
    err = refusal(lambda: read_file(tmp_path / "nope.jpg", LIMIT))
    assert isinstance(err, OSError)
    again = pickle.loads(pickle.dumps(err))
    assert (type(again), again.path, again.kind, again.reason, again.errno, str(again)) == (
        type(err), err.path, err.kind, err.reason, err.errno, str(err))


def test_open_file_streams_a_regular_file(tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 7)
    (tmp_path / "big.bin").write_bytes(data)
    digest = hashlib.sha256()
    with open_file("big.bin", base=tmp_path) as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()


def test_limits_must_be_sizes():
    for bad in (-1, 2.5, True, "10"):
        with pytest.raises(ValueError, match="max_bytes"):
            read_file("x", bad)
