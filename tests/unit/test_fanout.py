"""Several servers, one catalog, without a server: the batches spread over every server with bounded
concurrency, a server that goes away leaving its batches to the others, and publishing / rollback
all-or-none across servers on one repository."""

import shutil
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from lookalike.indexing.catalog import CatalogItem
from lookalike.indexing.fanout import AllServersGone, spread
from lookalike.indexing.indexer import build_index, embed_across, embed_items
from lookalike.indexing.publishing import (
    REASON_FILE,
    PublishError,
    RollbackError,
    ServerMismatchError,
    check_servers,
    publish_index,
    rollback_index,
    write_empty_index,
    write_index_version,
)
from lookalike.indexing.repository import Repository
from lookalike.serving.artifacts import EmbedderManifest, IndexMeta
from lookalike_client import InvalidRequestError, ServerError, ServerUnavailableError

# -- the spread itself ------------------------------------------------------------------------------


class Gone(Exception):
    pass


def test_every_server_takes_tasks_never_more_than_per_server_at_once_and_results_keep_their_order():
    in_flight, most = Counter(), Counter()
    lock = threading.Lock()

    def work(server, task):
        with lock:
            in_flight[server] += 1
            most[server] = max(most[server], in_flight[server])
        time.sleep(0.005 if server == "fast" else 0.02)
        with lock:
            in_flight[server] -= 1
        return task * 10

    finished = []
    done = spread(["fast", "slow"], list(range(60)), work, per_server=3, gone=lambda e: isinstance(e, Gone),
                  done=lambda task, result: finished.append(task))
    assert done.results == [t * 10 for t in range(60)] and sorted(finished) == list(range(60))
    assert max(most.values()) <= 3 and min(most.values()) >= 2  # bounded per server, and used
    by = Counter(done.done_by)
    assert by[0] > by[1] > 0 and done.gone == {}  # the faster server took more


def test_the_tasks_of_a_server_that_goes_away_go_to_the_others():
    calls = Counter()

    def work(server, task):
        calls[server] += 1
        if server == "dying" and calls[server] > 2:
            raise Gone(f"{server} is gone")
        time.sleep(0.002)
        return task

    done = spread(["dying", "a", "b"], list(range(40)), work, per_server=2, gone=lambda e: isinstance(e, Gone))
    assert done.results == list(range(40))
    assert set(done.gone) == {0} and "dying is gone" in str(done.gone[0])
    assert Counter(done.done_by)[0] <= 2 and calls["dying"] <= 2 + 2  # no task after it went (two lanes in flight)


def test_all_servers_gone_names_each_and_the_tasks_left():
    def work(server, task):
        if task >= 3:
            raise Gone(f"{server} down")
        return task

    with pytest.raises(AllServersGone) as info:
        spread(["a", "b"], list(range(10)), work, per_server=1, gone=lambda e: isinstance(e, Gone))
    assert set(info.value.errors) == {0, 1} and info.value.left == 7
    assert "server 1: Gone: a down" in str(info.value) and "server 2: Gone: b down" in str(info.value)


def test_another_error_is_raised_as_it_is_and_stops_the_rest():
    started = []

    def work(server, task):
        started.append(task)
        if task == 2:
            raise ValueError("a bug")
        time.sleep(0.01)
        return task

    with pytest.raises(ValueError, match="a bug"):
        spread(["a", "b"], list(range(100)), work, per_server=2, gone=lambda e: isinstance(e, Gone))
    assert len(started) < 20  # not every task ran before the error came through


def test_spread_refuses_no_server_and_no_lane():
    with pytest.raises(ValueError, match="no server"):
        spread([], [1], lambda s, t: t, per_server=1, gone=lambda e: False)
    with pytest.raises(ValueError, match="per_server"):
        spread(["a"], [1], lambda s, t: t, per_server=0, gone=lambda e: False)
    assert spread(["a"], [], lambda s, t: t, per_server=1, gone=lambda e: False).results == []


# -- embedding over several servers -----------------------------------------------------------------

DIM = 8


class EmbedServer:
    """Embeds each image's bytes as a vector of its first byte; `dies_after` requests, unreachable."""

    def __init__(self, url, dies_after=None, refuses=b"", meet=None):
        self.url, self.dies_after, self.refuses = url, dies_after, refuses
        self.requests = 0
        self.images = 0
        self.lock = threading.Lock()
        self.meet = meet  # a Barrier: the first request of each server waits for the others' (no lane starves)

    def embed(self, images):
        if self.meet is not None and self.requests == 0:
            self.meet.wait(timeout=10)
        with self.lock:
            self.requests += 1
            if self.dies_after is not None and self.requests > self.dies_after:
                raise ServerUnavailableError(f"{self.url}: connection refused")
            self.images += len(images)
        if any(image.startswith(self.refuses) for image in images) and self.refuses:
            raise InvalidRequestError("invalid image (not_an_image): cannot decode")
        return np.array([[image[0]] * DIM for image in images], dtype=np.float32)


@pytest.fixture
def items(tmp_path):
    out = []
    for i in range(50):
        path = tmp_path / f"{i}.png"
        path.write_bytes(bytes([i]) + b"image")
        out.append(CatalogItem(f"p{i}", path, "", f"catalog.csv:{i + 2}"))
    return out


def test_embedding_spreads_over_every_server_and_keeps_each_items_vectors(items):
    meet = threading.Barrier(2)
    a, b = EmbedServer("a:8001", meet=meet), EmbedServer("b:8001", meet=meet)
    done = embed_across([a, b], items, batch_size=4, concurrency=1, progress=False)
    assert [item.product_id for item in done.items] == [item.product_id for item in items]
    assert all(v.shape == (1, DIM) and v[0, 0] == i for i, v in enumerate(done.vectors))
    assert a.images > 0 and b.images > 0 and a.images + b.images == len(items)
    assert done.images_by_server == [a.images, b.images] and done.gone == {}


def test_a_server_that_dies_mid_embedding_leaves_its_batches_to_the_other(items):
    dying, alive = EmbedServer("a:8001", dies_after=2), EmbedServer("b:8001")
    done = embed_across([dying, alive], items, batch_size=4, concurrency=2, progress=False)
    assert len(done.items) == len(items) and done.problems == []
    assert all(v[0, 0] == i for i, v in enumerate(done.vectors))
    assert list(done.gone) == [0] and "connection refused" in str(done.gone[0])
    assert done.images_by_server == [dying.images, len(items) - dying.images]


def test_a_bad_image_is_still_its_own_problem_on_several_servers(items):
    a, b = EmbedServer("a:8001", refuses=bytes([7])), EmbedServer("b:8001", refuses=bytes([7]))
    good, vectors, problems = embed_items([a, b], items, batch_size=4, concurrency=2, progress=False)
    assert len(good) == len(items) - 1 and [p.where for p in problems] == ["catalog.csv:9"]
    assert "not_an_image" in problems[0].reason


def test_only_when_every_server_is_gone_does_embedding_fail_naming_each(items):
    with pytest.raises(ServerUnavailableError, match="every server went away while embedding") as info:
        embed_across([EmbedServer("a:8001", dies_after=1), EmbedServer("b:8001", dies_after=1)], items,
                     batch_size=4, concurrency=1, progress=False)
    assert "a:8001: ServerUnavailableError" in str(info.value) and "b:8001: ServerUnavailableError" in str(info.value)
    # one server: its own error, as before there were several
    with pytest.raises(ServerUnavailableError, match=r"^a:8001: connection refused$"):
        embed_items(EmbedServer("a:8001", dies_after=0), items, batch_size=4, progress=False)


def test_a_server_error_is_not_a_server_gone(items):
    meet = threading.Barrier(2)

    class Broken(EmbedServer):
        def embed(self, images):
            meet.wait(timeout=10)
            raise ServerError("Stub process is not healthy")

    with pytest.raises(ServerError, match="not healthy"):
        embed_across([EmbedServer("a:8001", meet=meet), Broken("b:8001")], items, batch_size=4, concurrency=1, progress=False)


# -- publishing and rollback over several servers ---------------------------------------------------


@pytest.fixture
def repo(tmp_path) -> Repository:
    (tmp_path / "repo" / "embedder").mkdir(parents=True)
    EmbedderManifest(model="test", dim=16, input=(3, 8, 8), fingerprint="fp-now").save(tmp_path / "repo" / "embedder" / "manifest.json")
    (tmp_path / "repo" / "product_search").mkdir()
    (tmp_path / "repo" / "product_search" / "model.py").write_text("# adapter\n")
    return Repository(tmp_path / "repo")


def built(rows, fingerprint="fp-now"):
    items = [CatalogItem(pid, Path(f"/x/{sha}.png"), cat) for pid, cat, sha in rows]
    rng = np.random.default_rng(len(rows))
    blocks = [rng.standard_normal((1, 16)).astype(np.float32) for _ in rows]
    blocks = [b / np.linalg.norm(b) for b in blocks]
    manifest = EmbedderManifest(model="test", dim=16, input=(3, 8, 8), fingerprint=fingerprint)
    return build_index(items, blocks, manifest, hashes=[sha for _, _, sha in rows])


def publish(repo, rows):
    return write_index_version(repo, built(rows).save)


class Server:
    """A server's model control on a repository: a reload serves the newest version (unless it refuses),
    INDEX_INFO says which, read from the version's own files."""

    def __init__(self, repo, url, refuse=False, server_id=None):
        self.repo, self.url, self.refuse = repo, url, refuse
        self.server_id = server_id or f"lookalike:host:{url}"
        self.served = repo.index_versions()[-1:]
        self.reloads = 0

    def reload_index(self):
        self.reloads += 1
        if self.refuse:
            raise ServerError("load failed")
        self.served = self.repo.index_versions()[-1:]

    def served_index_versions(self):
        return self.served

    def info(self):
        directory = self.repo.search_dir / str(self.served[-1])
        if not directory.is_dir():  # set aside meanwhile: still in memory
            directory = next(self.repo.rejected_dir.glob(f"{self.served[-1]}-*"))
        meta = IndexMeta.load(directory)
        return SimpleNamespace(url=self.url, index_version=self.served[-1], index_id=meta.index_id, products=meta.count,
                               embedder_model="test", embedder_fingerprint=meta.embedder_fingerprint, server_id=self.server_id)


def test_publishing_on_two_servers_reloads_and_confirms_each(repo):
    v1 = publish(repo, [("A", "x", "h1")])
    a, b = Server(repo, "a:8001"), Server(repo, "b:8001")
    published = publish_index(repo, built([("A", "x", "h1"), ("B", "x", "h2")]), [a, b])
    assert a.served == b.served == [v1 + 1]
    assert [(i.url, i.index_version, i.products) for i in published.served_by] == [("a:8001", v1 + 1, 2), ("b:8001", v1 + 1, 2)]
    assert published.served.url == "a:8001" and published.pruned == []


def test_a_server_that_refuses_withdraws_the_version_from_every_server(repo):
    v1 = publish(repo, [("A", "x", "h1")])
    a, b = Server(repo, "a:8001"), Server(repo, "b:8001", refuse=True)
    with pytest.raises(PublishError) as info:
        publish_index(repo, built([("B", "x", "h2")]), [a, b])
    text = str(info.value)
    assert f"the server at b:8001 did not load index version {v1 + 1} (ServerError: load failed)" in text
    assert f"version {v1 + 1} was set aside in" in text
    assert f"the server at a:8001 had loaded version {v1 + 1} and was reloaded back: it serves index version {v1} " in text
    assert a.served == b.served == [v1] and a.reloads == 2  # A: the new version, then back
    assert repo.index_versions() == [v1]  # nothing a restart would serve
    (aside,) = repo.rejected_dir.iterdir()
    assert aside.name.startswith(f"{v1 + 1}-") and "b:8001 did not load" in (aside / REASON_FILE).read_text()


def test_a_server_on_another_repository_is_refused_before_anything_and_withdrawn_after(repo, tmp_path):
    v1 = publish(repo, [("A", "x", "h1")])
    other = Repository(tmp_path / "other")
    shutil.copytree(repo.root, other.root)
    shutil.rmtree(other.search_dir / str(v1))
    write_empty_index(other)  # its own history: same number, another id
    a, b = Server(repo, "a:8001"), Server(other, "b:8001")
    with pytest.raises(ServerMismatchError, match="the server at b:8001 serves index version .*holds another index"):
        check_servers(repo, [a, b])
    # a copy of this repository (same ids) passes the check, but never sees what is written here
    copy = Repository(tmp_path / "copy")
    shutil.copytree(repo.root, copy.root)
    c = Server(copy, "c:8001")
    assert [i.index_version for i in check_servers(repo, [a, c])] == [v1, v1]
    with pytest.raises(PublishError, match=f"the server at c:8001 serves index version {v1} .*not index version {v1 + 1}") as info:
        publish_index(repo, built([("B", "x", "h2")]), [a, c])
    assert "a:8001 had loaded version" in str(info.value) and a.served == [v1]
    assert repo.index_versions() == [v1]


def test_a_server_listed_twice_is_refused(repo):
    publish(repo, [("A", "x", "h1")])
    with pytest.raises(ValueError, match="a:8001 is given twice"):
        check_servers(repo, [Server(repo, "a:8001"), Server(repo, "a:8001")])


def test_rollback_rolls_back_every_server_or_none(repo):
    v1 = publish(repo, [("A", "x", "h1")])
    v2 = publish(repo, [("B", "x", "h2")])
    a, b = Server(repo, "a:8001"), Server(repo, "b:8001", refuse=True)
    with pytest.raises(RollbackError) as info:
        rollback_index(repo, [a, b])
    text = str(info.value)
    assert f"the server at b:8001 did not load index version {v1}" in text and f"version {v2} was put back" in text
    assert f"the server at a:8001 serves index version {v2}" in text and f"the server at b:8001 serves index version {v2}" in text
    assert a.served == b.served == [v2] and repo.index_versions() == [v1, v2]
    b.refuse = False
    assert rollback_index(repo, [a, b]) == (v2, v1)
    assert a.served == b.served == [v1] and repo.index_versions() == [v1]
