"""lookalike.publishing without tritonserver: which index version can be served, setting aside the ones
that cannot, and staging directories left by killed writers."""

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from lookalike.artifacts import EmbedderManifest
from lookalike.publishing import (
    REASON_FILE,
    clean_stale_staging,
    ensure_servable_index,
    refresh_model_code,
    set_aside,
    version_problem,
    write_index_version,
)
from lookalike.repository import STAGING_OWNER_FILE, Repository
from lookalike.search import CorruptIndexError, Product, ProductIndex

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
