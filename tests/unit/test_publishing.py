"""lookalike.indexing.publishing without tritonserver: which index version can be served, setting aside the ones
that cannot, and staging directories left by killed writers."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lookalike.indexing.publishing import (
    REASON_FILE,
    NothingToServeError,
    clean_stale_staging,
    ensure_servable_index,
    record_serving,
    refresh_model_code,
    set_aside,
    version_problem,
    write_index_version,
)
from lookalike.indexing.repository import STAGING_OWNER_FILE, Repository
from lookalike.serving.artifacts import EmbedderManifest
from lookalike.serving.index_files import CorruptIndexError, Product
from lookalike.serving.search import ProductIndex

DIM = 8


@pytest.fixture
def repo(tmp_path) -> Repository:
    (tmp_path / "embedder").mkdir()
    EmbedderManifest(model="test", dim=DIM, input=(3, 32, 32), fingerprint="fp-now").save(tmp_path / "embedder" / "manifest.json")
    (tmp_path / "product_search").mkdir()
    (tmp_path / "product_search" / "model.py").write_text("# the product_search adapter\n")
    return Repository(tmp_path)


def write_index(repo: Repository, n: int = 5, fingerprint: str = "fp-now") -> int:
    rng = np.random.default_rng(n)
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = ProductIndex.build([Product(f"p{i}") for i in range(n)], vectors, embedder_fingerprint=fingerprint)
    return write_index_version(repo, index.save)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated index.faiss": (lambda d: truncate(d / "index.faiss"), "index.faiss: "),
    "altered index.faiss": (lambda d: flip_a_byte(d / "index.faiss"), "sha256 mismatch"),
    "garbage products.json": (lambda d: (d / "products.json").write_text("{not json"), "products.json: "),
    "garbage index.json": (lambda d: (d / "index.json").write_text("\x00\x01"), "index.json: "),
    "no index.json": (lambda d: (d / "index.json").unlink(), "no index.json"),
    "no index.faiss": (lambda d: (d / "index.faiss").unlink(), "no index.faiss"),
    "no model.py": (lambda d: (d / "model.py").unlink(), "no model.py"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_a_corrupt_newest_version_is_set_aside_and_the_newest_good_one_served(repo, name):
    corrupt, reason = CORRUPTIONS[name]
    good = write_index(repo, 5)
    bad = write_index(repo, 6)
    corrupt(repo.search_dir / str(bad))
    assert reason in version_problem(repo.search_dir / str(bad), "fp-now")
    lines = []
    assert ensure_servable_index(repo, log=lines.append) == good
    assert repo.index_versions() == [good]
    (aside,) = list(repo.rejected_dir.iterdir())
    assert aside.name.startswith(f"{bad}-") and reason in (aside / REASON_FILE).read_text()
    assert any(f"skipped index version {bad}" in line and reason in line for line in lines), lines
    assert any(f"serving index version {good}" in line for line in lines)
    assert write_index(repo) == bad + 1  # a set-aside number is never reused


def test_an_empty_version_directory_and_a_stale_newest_version_are_skipped(repo):
    good = write_index(repo)
    stale = write_index(repo, fingerprint="fp-before")
    (repo.search_dir / str(stale + 1)).mkdir()  # e.g. created by hand
    lines = []
    assert ensure_servable_index(repo, log=lines.append) == good
    reasons = {p.name.split("-")[0]: (p / REASON_FILE).read_text() for p in repo.rejected_dir.iterdir()}
    assert "built with embedder fp-before, but the embedder is fp-now" in reasons[str(stale)]
    assert "no model.py" in reasons[str(stale + 1)]


def test_without_any_servable_version_an_empty_index_is_published(repo):
    stale = write_index(repo, fingerprint="fp-before")
    lines = []
    version = ensure_servable_index(repo, log=lines.append)
    assert version == stale + 1 and repo.index_versions() == [stale, version]  # the stale one is kept, unserved
    assert len(ProductIndex.load(repo.search_dir / str(version))) == 0
    assert version_problem(repo.search_dir / str(version), "fp-now") is None
    assert ensure_servable_index(repo, log=lines.append) == version  # nothing more to do


def test_an_index_written_before_hashes_were_recorded_is_checked_by_parsing(repo):
    version = write_index(repo)
    directory = repo.search_dir / str(version)
    meta = json.loads((directory / "index.json").read_text())
    del meta["files"]
    (directory / "index.json").write_text(json.dumps(meta))
    assert version_problem(directory, "fp-now") is None
    (directory / "index.faiss").write_bytes(b"IxF2" + b"\x00" * 10)
    assert "FAISS cannot read it" in version_problem(directory, "fp-now")
    with pytest.raises(CorruptIndexError):
        ProductIndex.load(directory)


def test_load_refuses_a_damaged_file_before_faiss_reads_it(repo):
    directory = repo.search_dir / str(write_index(repo))
    flip_a_byte(directory / "products.json")
    with pytest.raises(CorruptIndexError, match="products.json"):
        ProductIndex.load(directory)


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def staging(repo: Repository, name: str, owner: dict | None, age_s: float = 0) -> Path:
    directory = repo.search_dir / name
    directory.mkdir()
    (directory / "index.faiss").write_bytes(b"partial")
    if owner is not None:
        (directory / STAGING_OWNER_FILE).write_text(json.dumps(owner))
    stamp = time.time() - age_s
    os.utime(directory, (stamp, stamp))
    return directory


def test_stale_staging_directories_are_cleaned_live_ones_kept(repo):
    import socket

    host = socket.gethostname()
    killed = staging(repo, ".staging-7-a", {"host": host, "pid": dead_pid()})
    writing = staging(repo, ".staging-8-b", {"host": host, "pid": os.getpid()}, age_s=7200)
    old_unknown = staging(repo, ".staging-3-c", None, age_s=7200)
    new_unknown = staging(repo, ".staging-9-d", None, age_s=60)
    other_host_old = staging(repo, ".staging-4-e", {"host": "elsewhere", "pid": 1}, age_s=2 * 86400)
    other_host_new = staging(repo, ".staging-5-f", {"host": "elsewhere", "pid": 1}, age_s=3600)
    lines = []
    removed = clean_stale_staging(repo, log=lines.append)
    assert sorted(removed) == sorted([killed, old_unknown, other_host_old])
    assert all(d.exists() for d in (writing, new_unknown, other_host_new))
    assert len(lines) == 3


def test_set_aside_keeps_a_bounded_number(repo):
    for _ in range(8):
        set_aside(repo, write_index(repo), "test")
        time.sleep(0.01)
    assert len(list(repo.rejected_dir.iterdir())) == 5
    assert repo.index_versions() == []


def test_versions_written_by_an_older_release_get_this_releases_model_code(repo):
    """An upgrade changes product_search/model.py; the index files of the versions stay as they were."""
    first, second = write_index(repo), write_index(repo)
    (repo.search_dir / str(first) / "model.py").write_text("from lookalike.serving import gone\n")
    index_bytes = (repo.search_dir / str(first) / "index.faiss").read_bytes()
    lines = []
    assert ensure_servable_index(repo, log=lines.append) == second
    for version in (first, second):
        assert (repo.search_dir / str(version) / "model.py").read_text() == "# the product_search adapter\n"
    assert (repo.search_dir / str(first) / "index.faiss").read_bytes() == index_bytes
    assert any(f"index version(s) {first}" in line for line in lines), lines
    assert refresh_model_code(repo, log=lines.append) == []  # nothing left to do


# -- a repository this process cannot write (the pods' read-only index volume) ----------------------
def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its content (None for a directory): what "nothing written" compares."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def read_only(monkeypatch) -> None:
    monkeypatch.setattr(Repository, "writable", lambda self: False)


def test_a_read_only_repository_is_served_as_it_is(repo, monkeypatch):
    good = write_index(repo, 5)
    bad = write_index(repo, 6)
    truncate(repo.search_dir / str(bad) / "index.faiss")
    (repo.search_dir / str(good) / "model.py").write_text("# an older release's adapter\n")
    staging(repo, ".staging-9-x", None, age_s=7200)  # stale: a writer would remove it
    before = tree(repo.root)
    read_only(monkeypatch)
    lines = []
    assert ensure_servable_index(repo, log=lines.append) == good
    assert tree(repo.root) == before  # nothing moved, refreshed, removed or published
    said = [line for line in lines if "read-only: nothing is written" in line]
    assert len(said) == 1 and "no version set aside" in said[0] and "no empty index" in said[0], lines
    assert any(f"index version {bad} cannot be served" in line and "left in place" in line for line in lines), lines
    assert any(f"serving index version {good}" in line and "pinned" in line for line in lines), lines
    assert any("keeps the model code it was published with" in line for line in lines), lines
    assert record_serving(repo, good) is None and not repo.serving_dir.exists()


@pytest.mark.parametrize("case", ["no version", "another embedder's", "damaged"])
def test_a_read_only_repository_with_nothing_to_serve_is_refused(repo, monkeypatch, case):
    if case == "another embedder's":
        write_index(repo, fingerprint="fp-before")
    elif case == "damaged":
        flip_a_byte(repo.search_dir / str(write_index(repo)) / "index.faiss")
    before = tree(repo.root)
    read_only(monkeypatch)
    with pytest.raises(NothingToServeError, match="read-only and holds no index version that can be served") as caught:
        ensure_servable_index(repo, log=lambda _line: None)
    assert tree(repo.root) == before  # no empty index published
    reason = {"no version": "it has no index version", "another embedder's": "built with embedder fp-before",
              "damaged": "sha256 mismatch"}[case]
    assert reason in str(caught.value) and "lookalike index" in str(caught.value)


def test_a_write_refused_with_erofs_makes_the_start_read_only(repo, monkeypatch):
    """os.access can say yes where the write fails (a server-side read-only export)."""
    import errno

    import lookalike.indexing.publishing as publishing

    version = write_index(repo)
    (repo.search_dir / str(version) / "model.py").write_text("# an older release's adapter\n")
    before = tree(repo.root)

    def refused(*_args, **_kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(publishing.tempfile, "mkstemp", refused)
    lines = []
    assert ensure_servable_index(repo, log=lines.append) == version
    assert tree(repo.root) == before
    assert any("failed (Read-only file system): serving it read-only" in line for line in lines), lines


def test_another_error_of_a_write_is_not_taken_for_read_only(repo, monkeypatch):
    import errno

    import lookalike.indexing.publishing as publishing

    (repo.search_dir / str(write_index(repo)) / "model.py").write_text("# an older release's adapter\n")

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(publishing.tempfile, "mkstemp", full)
    with pytest.raises(OSError, match="No space left"):
        ensure_servable_index(repo, log=lambda _line: None)


# -- several servers starting at once on one writable volume ----------------------------------------
def test_a_version_set_aside_meanwhile_by_another_server_is_skipped(repo, monkeypatch):
    import lookalike.indexing.publishing as publishing

    good = write_index(repo, 5)
    bad = write_index(repo, 6)
    truncate(repo.search_dir / str(bad) / "index.faiss")
    real = publishing.set_aside

    def the_other_server_first(repository, version, reason):
        real(repository, version, reason)  # the other server, between our check and our move
        return real(repository, version, reason)

    monkeypatch.setattr(publishing, "set_aside", the_other_server_first)
    lines = []
    assert ensure_servable_index(repo, log=lines.append) == good
    assert repo.index_versions() == [good] and len(list(repo.rejected_dir.iterdir())) == 1
    assert any("set aside meanwhile by another server" in line for line in lines), lines


def test_an_empty_index_published_first_by_another_server_is_served(repo, monkeypatch):
    import lookalike.indexing.publishing as publishing

    real = publishing.next_version
    calls = []

    def the_other_server_publishes_first(repository):
        number = real(repository)
        if not calls:
            calls.append(number)
            monkeypatch.setattr(publishing, "next_version", real)
            assert publishing.write_empty_index(repository) == number  # the other server wins the rename
            monkeypatch.setattr(publishing, "next_version", the_other_server_publishes_first)
        return number

    monkeypatch.setattr(publishing, "next_version", the_other_server_publishes_first)
    lines = []
    assert ensure_servable_index(repo, log=lines.append) == calls[0]
    assert repo.index_versions() == [calls[0]] and repo.staging_dirs() == []
    assert not any("published empty index" in line for line in lines), lines  # it published nothing itself


RACE = """
import sys, time
from pathlib import Path
from lookalike.indexing.publishing import ensure_servable_index
from lookalike.indexing.repository import Repository
start = float(sys.argv[2])
while time.time() < start:
    time.sleep(0.001)
print(ensure_servable_index(Repository(Path(sys.argv[1])), log=lambda line: None))
"""


@pytest.mark.parametrize("state", ["empty", "bad newest, old code"])
def test_servers_starting_at_once_on_one_volume_agree(repo, state):
    """Real processes, released at the same instant: none fails, each serves a version that can be served,
    and nothing half-written is left. With a good version on disk they all serve it; on an empty volume
    a server that looked after another published may publish an empty index of its own (both empty)."""
    if state == "bad newest, old code":
        good = write_index(repo, 5)
        for version in (good, write_index(repo, 6)):
            (repo.search_dir / str(version) / "model.py").write_text("# an older release's adapter\n")
        truncate(repo.search_dir / str(good + 1) / "index.faiss")
    start = time.time() + 3.0
    processes = [subprocess.Popen([sys.executable, "-c", RACE, str(repo.root), str(start)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [p.communicate(timeout=120) for p in processes]
    assert [p.returncode for p in processes] == [0] * 4, [err for _out, err in results]
    served = {int(out) for out, _err in results}
    assert repo.staging_dirs() == [] and max(served) == repo.index_versions()[-1]
    for version in served:
        assert version_problem(repo.search_dir / str(version), "fp-now") is None
    if state == "empty":
        assert all(len(ProductIndex.load(repo.search_dir / str(v))) == 0 for v in repo.index_versions())
    else:
        assert served == {good} and len(list(repo.rejected_dir.iterdir())) == 1
        assert (repo.search_dir / str(good) / "model.py").read_text() == "# the product_search adapter\n"
        assert not list((repo.search_dir / str(good)).glob(".model.py.*"))
