"""Index versions of `product_search` as the server sees them: which one it can serve, setting aside
the ones it cannot, cleaning up after killed writers, and publishing a new version so that nothing
the server refused stays where a restart would serve it.

Triton serves the highest-numbered version directory. A version that cannot be served (a damaged
file, another embedder's index, a version the server refused to load) is therefore never left in
place above a good one: it is moved, not deleted, to `product_search/.rejected/<version>-<UTC time>/`
with a REJECTED.txt that says why, where Triton does not look and an operator can inspect it.

Nothing is claimed that the server did not confirm. Before `lookalike index` embeds anything, the server
must serve this repository (the index version it serves is one of this repository's, by its id) with
this embedder (`check_server`); after the reload, the server's INDEX_INFO must name the version just
written, with its id and product count (`confirm_served`), or that version is set aside. With several
servers on one repository (`lookalike index --url A --url B`), each is checked and each must confirm:
all or none. When one does not, the version is set aside and those that loaded it are reloaded back
onto the previous one (`_withdraw`); a rollback that one server refuses is undone on all.

Every running `lookalike serve` records which version it serves in `product_search/.serving/`
(`record_serving`, kept fresh by its supervisor), so that pruning old versions keeps, and names, a
version that another server on the same repository still serves.

A repository that `lookalike serve` cannot write (the Kubernetes pods mount the index volume read-only,
so that they are pure readers) is served as it is: nothing is set aside, refreshed, published or
recorded (`servable_read_only`).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from lookalike.indexing.repository import KEEP_VERSIONS, STAGING_OWNER_FILE, STAGING_PREFIX, Repository
from lookalike.serving.artifacts import ArtifactError, IndexMeta
from lookalike.serving.index_files import CorruptIndexError, check_index_dir
from lookalike.serving.search import ProductIndex
from lookalike_client import LookalikeClient, LookalikeError, ServerInfo
from lookalike_client import contract as c

Log = Callable[[str], None]

REASON_FILE = "REJECTED.txt"
KEEP_REJECTED = 5  # set-aside versions kept for inspection; older ones are deleted
# A staging directory whose writer cannot be asked (another host, or no owner file) is stale after:
STALE_FOREIGN_STAGING_S = 24 * 3600.0
STALE_UNKNOWN_STAGING_S = 3600.0
# A write that fails with one of these means this process may not write the repository: a volume mounted
# read-only (EROFS), or one it has no permission on; `lookalike serve` then serves it read-only.
READ_ONLY_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


class PublishError(RuntimeError):
    """A new index version that the server did not take (or did not confirm); it has been set aside."""


class NothingToServeError(RuntimeError):
    """A model repository that cannot be written holds no index version that the server can serve, and
    no empty index can be published into it."""


class ServerMismatchError(RuntimeError):
    """The server does not serve this model repository, or serves another embedder: indexing through it
    would write a version it never loads, or mix two embedding spaces in one index."""


# -- which servers serve which version -------------------------------------------------------------
SERVING_HEARTBEAT_S = 30.0  # a running `lookalike serve` rewrites its record at least this often
STALE_SERVING_S = 120.0  # a record from another host not rewritten for this long is ignored


@dataclass(frozen=True)
class ServingRecord:
    """`lookalike serve` (host, pid) serves index `version`; `server_id` is its tritonserver's id (in the
    server's metadata, `ServerInfo.server_id`), `urls` where its clients reach it."""

    host: str
    pid: int
    version: int
    server_id: str = ""
    urls: tuple[str, ...] = ()
    updated: float = 0.0

    def __str__(self) -> str:
        where = f" ({', '.join(self.urls)})" if self.urls else ""
        return f"lookalike serve pid {self.pid} on {self.host}{where}"


def _serving_file(repository: Repository, host: str, pid: int) -> Path:
    return repository.serving_dir / f"{host}-{pid}.json"


def record_serving(repository: Repository, version: int, server_id: str = "", urls: tuple[str, ...] = ()) -> Path | None:
    """Records (atomically) that this process serves index `version` of `repository`. None, with nothing
    written, when the repository cannot be written (a read-only volume: see `ensure_servable_index`)."""
    host, pid = socket.gethostname(), os.getpid()
    if not repository.writable():
        return None
    target = _serving_file(repository, host, pid)
    staged = target.with_name(f".{target.name}.tmp")
    try:
        repository.serving_dir.mkdir(exist_ok=True)
        staged.write_text(json.dumps({"host": host, "pid": pid, "version": int(version), "server_id": server_id,
                                      "urls": list(urls), "updated": time.time()}))
    except OSError as exc:
        if exc.errno in READ_ONLY_ERRNOS:
            return None
        raise
    os.replace(staged, target)
    return target


def clear_serving(repository: Repository) -> None:
    """Removes this process's record (`lookalike serve` stopping)."""
    _serving_file(repository, socket.gethostname(), os.getpid()).unlink(missing_ok=True)


def serving_records(repository: Repository, now: float | None = None) -> list[ServingRecord]:
    """The records of servers that may still serve: on this host, whose process is alive (the record of
    one that is gone is removed); from another host, rewritten within STALE_SERVING_S."""
    now = time.time() if now is None else now
    records = []
    if not repository.serving_dir.is_dir():
        return records
    for path in sorted(repository.serving_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
            record = ServingRecord(str(data["host"]), int(data["pid"]), int(data["version"]),
                                   str(data.get("server_id", "")), tuple(str(u) for u in data.get("urls", ())),
                                   float(data["updated"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if record.host == socket.gethostname():
            if not _pid_alive(record.pid):
                path.unlink(missing_ok=True)
                continue
        elif now - record.updated > STALE_SERVING_S:
            continue
        records.append(record)
    return records


def version_problem(directory: Path, fingerprint: str) -> str | None:
    """Why the server could not serve this index version directory, or None if it can."""
    if not (directory / "model.py").is_file():
        return "no model.py"
    try:
        meta = check_index_dir(directory)
    except CorruptIndexError as exc:
        return str(exc)
    built_with = meta.embedder_fingerprint
    if built_with != fingerprint:
        return f"built with embedder {built_with or '?'}, but the embedder is {fingerprint}"
    if meta.files is None:  # written before sizes and hashes were recorded: parse it instead
        try:
            ProductIndex.load(directory)
        except (CorruptIndexError, ValueError) as exc:
            return str(exc)
    return None


def next_version(repository: Repository) -> int:
    """One more than any version ever written here, set-aside ones included, so that a number never
    names two different indexes."""
    used = repository.index_versions()
    if repository.rejected_dir.is_dir():
        used += [int(p.name.split("-")[0]) for p in repository.rejected_dir.iterdir() if p.name.split("-")[0].isdigit()]
    return max(used, default=0) + 1


def write_index_version(repository: Repository, save: Callable[[Path], None]) -> int:
    """Creates the next version directory of `product_search` atomically: `save(path)` writes the
    index into a staging directory, the model code is copied beside it, and one rename publishes it,
    so Triton never sees a half-written version. Returns the new version number. The staging
    directory names its owner (host, pid), so that one left by a killed writer can be told from one
    being written (`clean_stale_staging`)."""
    version = next_version(repository)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{version}-", dir=repository.search_dir))
    owner = staging / STAGING_OWNER_FILE
    try:
        owner.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}))
        save(staging)
        shutil.copy2(repository.search_dir / "model.py", staging / "model.py")
        owner.unlink()
        os.chmod(staging, 0o755)
        os.rename(staging, repository.search_dir / str(version))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return version


def prune_index_versions(repository: Repository, keep: int = KEEP_VERSIONS,
                         protected: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """Deletes all but the newest `keep` index versions (Triton serves only the newest), except the
    `protected` ones (served by another server); returns the versions deleted."""
    versions = repository.index_versions()
    removed = [v for v in (versions[:-keep] if keep > 0 else versions) if v not in protected]
    for version in removed:
        shutil.rmtree(repository.search_dir / str(version), ignore_errors=True)
    return removed


def set_aside(repository: Repository, version: int, reason: str) -> Path:
    """Moves an index version out of Triton's sight, with the reason beside it; returns where."""
    repository.rejected_dir.mkdir(exist_ok=True)
    target = repository.rejected_dir / f"{version}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    os.rename(repository.search_dir / str(version), target)
    (target / REASON_FILE).write_text(reason.rstrip() + "\n")
    kept = sorted(repository.rejected_dir.iterdir(), key=_mtime_or_zero)
    for old in kept[:-KEEP_REJECTED]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _mtime_or_zero(path: Path) -> float:
    """Its mtime; 0 for one that another process deleted meanwhile (two servers starting on one volume)."""
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_staging(repository: Repository, log: Log = print, now: float | None = None) -> list[Path]:
    """Deletes staging directories whose writer is gone (a `lookalike index` killed while saving):
    on this host, when its process no longer exists; otherwise after a day (an hour without an
    owner file). One that is still being written is left alone."""
    now = time.time() if now is None else now
    removed = []
    for staging in repository.staging_dirs():
        try:
            owner = json.loads((staging / STAGING_OWNER_FILE).read_text())
            host, pid = str(owner["host"]), int(owner["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            host, pid = None, None
        try:
            age = now - staging.stat().st_mtime
        except FileNotFoundError:  # removed meanwhile by another server starting on the same volume
            continue
        if host == socket.gethostname() and pid is not None:
            stale = not _pid_alive(pid)
        else:
            stale = age > (STALE_FOREIGN_STAGING_S if host else STALE_UNKNOWN_STAGING_S)
        if stale:
            shutil.rmtree(staging, ignore_errors=True)
            log(f"removed {staging.name}, an index version whose writer died while saving it")
            removed.append(staging)
    return removed


def write_empty_index(repository: Repository) -> int:
    """Publishes an empty index version for the current embedder, so that `visual_search` can load
    before the first `lookalike index`."""
    manifest = repository.manifest()
    index = ProductIndex.build([], np.zeros((0, manifest.dim), np.float32), dim=manifest.dim,
                               embedder_fingerprint=manifest.fingerprint)
    return write_index_version(repository, index.save)


def refresh_model_code(repository: Repository, log: Log = print) -> list[int]:
    """Gives every index version the model code of this lookalike (product_search/model.py), so that
    versions published by an older release load with today's code; the index files are untouched.
    Returns the versions updated."""
    source = (repository.search_dir / "model.py").read_bytes()
    updated = []
    for version in repository.index_versions():
        target = repository.search_dir / str(version) / "model.py"
        try:
            if not target.is_file() or target.read_bytes() == source:
                continue
            # A staged file of its own: servers on one volume in containers of their own are all pid 1.
            handle, staged = tempfile.mkstemp(prefix=".model.py.", dir=target.parent)
        except FileNotFoundError:  # no model.py (version_problem says so), or set aside meanwhile by another server
            continue
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(source)
                os.fchmod(out.fileno(), 0o644)
            os.replace(staged, target)
        except FileNotFoundError:  # the version was set aside meanwhile by another server
            continue
        except BaseException:
            Path(staged).unlink(missing_ok=True)
            raise
        updated.append(version)
    if updated:
        log(f"updated the model code of index version(s) {', '.join(map(str, updated))} to this release's")
    return updated


def ensure_servable_index(repository: Repository, log: Log = print) -> int:
    """Before tritonserver starts: makes the newest index version one that it can serve, and returns
    its number. Newer versions that cannot be served are set aside (and named in the log), so the
    server starts on the newest good one instead of failing to start. With no good version at all
    (none yet, or only indexes of another embedder) an empty index is published, so the server comes
    up and can be indexed; embedding spaces are never mixed. Versions written by an older release get
    this release's model code (`refresh_model_code`).

    Several servers may start at once on one writable volume: each step is atomic or idempotent (a
    version another server set aside meanwhile is skipped, an empty index that another published
    first is served). A repository this process cannot write (a read-only volume: `Repository.writable`
    false, or a write failing with EROFS, EACCES or EPERM) is served as it is (`servable_read_only`)."""
    if repository.writable():
        try:
            return _make_servable(repository, log)
        except OSError as exc:
            if exc.errno not in READ_ONLY_ERRNOS:
                raise
            log(f"writing into {repository.search_dir} failed ({exc.strerror}): serving it read-only")
    return servable_read_only(repository, log)


def _make_servable(repository: Repository, log: Log) -> int:
    clean_stale_staging(repository, log)
    refresh_model_code(repository, log)
    fingerprint = repository.manifest().fingerprint
    for _attempt in range(3):
        version, skipped = newest_servable_version(repository, fingerprint)
        if version is not None:
            for bad, reason in skipped:
                try:
                    where = set_aside(repository, bad, f"index version {bad} cannot be served: {reason}")
                except FileNotFoundError:
                    log(f"skipped index version {bad}: {reason} (set aside meanwhile by another server)")
                else:
                    log(f"skipped index version {bad}: {reason} (set aside in {where})")
            if skipped:
                log(f"serving index version {version}, the newest that can be served")
            return version
        for bad, reason in skipped:
            log(f"index version {bad} cannot be served: {reason}")
        try:
            version = write_empty_index(repository)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            continue  # another server published that version number first: serve what is there now
        log(f"published empty index version {version} of {c.SEARCH_MODEL}; run `lookalike index CATALOG` to fill it")
        return version
    raise RuntimeError(f"{repository.search_dir}: other writers kept publishing index versions while this server started")


def newest_servable_version(repository: Repository, fingerprint: str | None = None) -> tuple[int | None, list[tuple[int, str]]]:
    """The newest index version that the server can serve (None if none), and the newer ones that it
    cannot, newest first, each with the reason. Reads only."""
    fingerprint = repository.manifest().fingerprint if fingerprint is None else fingerprint
    skipped: list[tuple[int, str]] = []
    for version in reversed(repository.index_versions()):
        problem = version_problem(repository.search_dir / str(version), fingerprint)
        if problem is None:
            return version, skipped
        skipped.append((version, problem))
    return None, skipped


def servable_read_only(repository: Repository, log: Log = print) -> int:
    """The index version to serve from a repository that this process cannot write (the index volume of
    the Kubernetes pods is mounted read-only, so that servers are pure readers and never race): the
    newest that can be served. Nothing is moved, updated or published: staging directories stay, an
    older release's model code stays, a newer version that cannot be served stays where tritonserver
    would load it (`lookalike serve` then loads the one returned pinned), and with none at all this
    raises NothingToServeError instead of publishing an empty index."""
    log(f"the model repository {repository.root} is read-only: nothing is written to it (no stale staging directory "
        "removed, no model code updated, no version set aside, no empty index published, no record of the version "
        f"served in {repository.serving_dir.name}/)")
    version, skipped = newest_servable_version(repository)
    for bad, reason in skipped:
        log(f"index version {bad} cannot be served: {reason} (left in place)")
    if version is None:
        found = "; ".join(f"version {v}: {why}" for v, why in skipped) or "it has no index version"
        raise NothingToServeError(
            f"{repository.search_dir} is read-only and holds no index version that can be served ({found}), and no "
            "empty index can be published into it: publish one from a writer (`lookalike index` with the volume "
            "mounted read-write), or serve a writable copy")
    if skipped:
        log(f"serving index version {version}, the newest that can be served, pinned (tritonserver would load "
            f"version {skipped[0][0]})")
    code = repository.search_dir / "model.py"
    served = repository.search_dir / str(version) / "model.py"
    try:
        differs = code.read_bytes() != served.read_bytes()
    except OSError:
        differs = False
    if differs:
        log(f"index version {version} keeps the model code it was published with, which is not this release's "
            f"{code} (read-only: not updated); a writer's `lookalike serve` updates it")
    return version


def index_id_of(directory: Path) -> str | None:
    """The id of the index version in `directory` ("" for one built before ids), None when unreadable."""
    try:
        return IndexMeta.load(directory).index_id
    except (ArtifactError, OSError):
        return None


def _describe(info: ServerInfo) -> str:
    return (f"index version {info.index_version} ({info.products} products, id {info.index_id or 'none'}, "
            f"embedder {info.embedder_model} {info.embedder_fingerprint})")


def as_clients(client: LookalikeClient | Sequence[LookalikeClient]) -> list[LookalikeClient]:
    """One client, or the clients of several servers on this repository (`lookalike index --url A --url
    B`), as a list; ValueError for none."""
    clients = list(client) if isinstance(client, Sequence) else [client]
    if not clients:
        raise ValueError("no server given")
    return clients


def check_server(repository: Repository, client: LookalikeClient) -> ServerInfo:
    """Before indexing (nothing is embedded or written yet): the server at `client.url` must serve this
    repository, i.e. an index version that this repository holds under the same number and id, with
    the embedder of this repository's manifest. Raises ServerMismatchError naming both sides."""
    manifest = repository.manifest()
    info = client.info()
    if info.embedder_fingerprint != manifest.fingerprint:
        raise ServerMismatchError(
            f"the server at {client.url} serves embedder {info.embedder_model} (fingerprint "
            f"{info.embedder_fingerprint}), but {repository.embedder_dir} holds {manifest.model} (fingerprint "
            f"{manifest.fingerprint}): its embeddings would not be of this index's embedding space; nothing was "
            "embedded or written")
    local = index_id_of(repository.search_dir / str(info.index_version))
    if local is None or local != info.index_id:
        held = f"holds another index under that number (id {local or 'none'})" if local is not None else \
            f"has no such version (it has {', '.join(map(str, repository.index_versions())) or 'none'})"
        raise ServerMismatchError(
            f"the server at {client.url} serves {_describe(info)}, but {repository.search_dir} {held}: the server "
            "serves another model repository. `lookalike index` writes into --model-repository and has the server "
            "load it from there, so give the server's own (or the volume mounted into its container); nothing was "
            "embedded or written")
    return info


def check_servers(repository: Repository, clients: Sequence[LookalikeClient]) -> list[ServerInfo]:
    """`check_server` for each server, in order: the first that fails raises, before anything is embedded
    or written. ValueError for a url given twice."""
    urls = [cl.url for cl in clients]
    twice = [u for i, u in enumerate(urls) if u in urls[:i]]
    if twice:
        raise ValueError(f"the server at {twice[0]} is given twice; nothing was embedded or written")
    return [check_server(repository, cl) for cl in clients]


@dataclass
class Publication:
    """What `publish_index` did, each part confirmed: the version written and the server's own
    INDEX_INFO after the reload (`served`: the first server's; `served_by`: each one's, in the order
    given); versions deleted, and versions kept because a server still serves them."""

    version: int
    served: ServerInfo
    pruned: list[int] = field(default_factory=list)
    kept_for: dict[int, list[ServingRecord]] = field(default_factory=dict)
    superseded_by: int | None = None  # a newer version that another `lookalike index` published meanwhile
    served_by: list[ServerInfo] = field(default_factory=list)


def _confirm(repository: Repository, client: LookalikeClient, version: int, index: ProductIndex) -> tuple[ServerInfo, int | None] | str:
    """The server's INDEX_INFO after the reload: (what it serves, None) when it names `version` with
    `index`'s id and product count; (what it serves, its version) when a newer version of this
    repository, published meanwhile by another `lookalike index`, already replaced ours; otherwise why
    it does not count as serving it. LookalikeError when INDEX_INFO cannot be read."""
    info = client.info()
    if (info.index_version, info.index_id, info.products) == (version, index.meta.index_id, len(index)):
        return info, None
    if info.index_version > version and index_id_of(repository.search_dir / str(info.index_version)) == info.index_id:
        return info, info.index_version
    return (f"after loading, the server at {client.url} serves {_describe(info)}, not index version {version} "
            f"({len(index)} products, id {index.meta.index_id})")


def confirm_served(repository: Repository, client: LookalikeClient, version: int, index: ProductIndex) -> tuple[ServerInfo, int | None]:
    """After the reload: the server's INDEX_INFO must name `version` with `index`'s id and product count.
    Returns (what it serves, None), or (what it serves, its version) when a newer version of this
    repository, published meanwhile by another `lookalike index`, already replaced ours. Anything else
    sets `version` aside and raises PublishError."""
    try:
        found = _confirm(repository, client, version, index)
    except LookalikeError as exc:
        raise PublishError(f"the server took the load of index version {version}, but its INDEX_INFO could not be "
                           f"read to confirm it ({type(exc).__name__}: {exc}); the version stays in place") from exc
    if isinstance(found, str):
        where = set_aside(repository, version, found)
        raise PublishError(f"{found}: version {version} was set aside in {where}, where no restart serves it")
    return found


def _reload_each(clients: Sequence[LookalikeClient]) -> list[LookalikeError | None]:
    """Asks every server to load the newest index version, all at once; each one's error, or None."""

    def one(client: LookalikeClient) -> LookalikeError | None:
        try:
            client.reload_index()
        except LookalikeError as exc:
            return exc
        return None

    if len(clients) <= 1:
        return [one(cl) for cl in clients]
    with ThreadPoolExecutor(max_workers=len(clients), thread_name_prefix="lookalike-reload") as pool:
        return list(pool.map(one, clients))


def _withdraw(repository: Repository, clients: Sequence[LookalikeClient], version: int, problems: dict[int, str]) -> PublishError:
    """Not every server took `version`: it is set aside (no restart serves it), and every server that
    loaded it is reloaded back onto the newest version left, so that all of them serve the same one
    again. The error names each server's state."""
    reasons = "; ".join(problems[i] for i in sorted(problems))
    where = set_aside(repository, version, reasons)
    message = f"{reasons}: version {version} was set aside in {where}, where no restart serves it"
    took = [clients[i] for i in range(len(clients)) if i not in problems]
    states: list[str] = []
    for client, error in zip(took, _reload_each(took)):
        state = f"the server at {client.url} had loaded version {version}"
        try:
            if error is not None:
                raise error
            info = client.info()
        except LookalikeError as exc:
            states.append(f"{state} and could not be reloaded back ({type(exc).__name__}: {exc}): it may serve the "
                          f"set-aside version until its model control is reachable and it is reloaded (a restart "
                          "serves the previous version)")
            continue
        if info.index_version == version:
            states.append(f"{state} and still serves it after a reload: reload or restart it")
        else:
            states.append(f"{state} and was reloaded back: it serves {_describe(info)}")
    if states:
        message += "; " + "; ".join(states)
    return PublishError(message)


def publish_index(repository: Repository, index: ProductIndex, client: LookalikeClient | Sequence[LookalikeClient], *,
                  keep_versions: int = KEEP_VERSIONS) -> Publication:
    """Writes `index` as the next version, has the running server(s) load it, confirms through each
    one's INDEX_INFO that it serves it (`confirm_served`), then prunes old versions except those another
    server on this repository still serves (`serving_records`). If a server does not load it (refused, no
    admin key, unreachable) or serves something else afterwards, the version is set aside before the
    error is raised, so that a restart cannot serve what a server never accepted; with several servers,
    all or none: those that did load it are reloaded back onto the previous version (`_withdraw`), and
    the error names each server's state. A server that took the load but whose INDEX_INFO cannot be
    read leaves the version in place (the others serve it), and the error says so."""
    clients = as_clients(client)
    version = write_index_version(repository, index.save)
    problems: dict[int, str] = {}
    unread: dict[int, LookalikeError] = {}
    found: dict[int, tuple[ServerInfo, int | None]] = {}
    for i, (cl, error) in enumerate(zip(clients, _reload_each(clients))):
        if error is not None and not _serves(cl, version):
            problems[i] = f"the server at {cl.url} did not load index version {version} ({type(error).__name__}: {error})"
            continue
        try:
            outcome = _confirm(repository, cl, version, index)
        except LookalikeError as exc:
            unread[i] = exc
            continue
        if isinstance(outcome, str):
            problems[i] = outcome
        else:
            found[i] = outcome
    if problems:
        first = next((e for e in unread.values()), None)
        raise _withdraw(repository, clients, version, problems) from first
    if unread:
        shown = "; ".join(f"the server at {clients[i].url} ({type(e).__name__}: {e})" for i, e in sorted(unread.items()))
        raise PublishError(f"index version {version} was loaded, but INDEX_INFO could not be read to confirm it from {shown}; "
                           "the version stays in place") from next(iter(unread.values()))
    served_by = [found[i][0] for i in range(len(clients))]
    newer = [v for _, v in found.values() if v is not None]
    # A server just reloaded may not have rewritten its record yet: known by its id, it is not "another".
    ours = {info.server_id for info in served_by if info.server_id}
    others = [r for r in serving_records(repository) if r.server_id not in ours]
    kept_for: dict[int, list[ServingRecord]] = {}
    for record in others:
        kept_for.setdefault(record.version, []).append(record)
    pruned = prune_index_versions(repository, keep=keep_versions, protected=set(kept_for))
    remaining = repository.index_versions()
    newest = set(remaining[-keep_versions:]) if keep_versions > 0 else set()
    kept_for = {v: r for v, r in kept_for.items() if v in remaining and v not in newest}  # kept only for them
    return Publication(version, served_by[0], pruned, kept_for, max(newer) if newer else None, served_by)


def _serves(client: LookalikeClient, version: int) -> bool:
    try:
        return version in client.served_index_versions()
    except LookalikeError:
        return False


class RollbackError(RuntimeError):
    """No earlier index version to go back to, or a server did not take it (nothing changed then)."""


def rollback_index(repository: Repository, client: LookalikeClient | Sequence[LookalikeClient]) -> tuple[int, int]:
    """Serves the index version before the newest again (`lookalike index --rollback`): the newest is set
    aside (`.rejected/`, with the reason; its number is never reused) and the server(s) load the previous
    one, which hot-swaps in like a new version. If a server does not take it, the newest is put back and
    every server reloaded onto it, so that all of them serve one version. Returns (version rolled back,
    version served now)."""
    clients = as_clients(client)
    versions = repository.index_versions()
    if not versions:
        raise RollbackError("no index version to roll back")
    newest = versions[-1]
    fingerprint = repository.manifest().fingerprint
    earlier = [v for v in versions[:-1] if version_problem(repository.search_dir / str(v), fingerprint) is None]
    if not earlier:
        kept = ", ".join(map(str, versions[:-1])) or "none"
        raise RollbackError(f"no earlier index version of this embedder to roll back to from version {newest} "
                            f"(other versions kept: {kept}; `lookalike index` keeps the newest {KEEP_VERSIONS} unless "
                            "--keep-versions says otherwise)")
    for stale in [v for v in versions[:-1] if v > earlier[-1]]:  # unservable ones in between
        set_aside(repository, stale, f"index version {stale} cannot be served; set aside by a rollback")
    where = set_aside(repository, newest, f"rolled back by `lookalike index --rollback` to version {earlier[-1]}")
    target = earlier[-1]

    def put_back(why: str, cause: Exception | None) -> RollbackError:
        (where / REASON_FILE).unlink(missing_ok=True)
        os.rename(where, repository.search_dir / str(newest))
        _reload_each(clients)
        states = ""
        if len(clients) > 1:
            states = " and every server reloaded: " + "; ".join(_state(cl) for cl in clients)
        error = RollbackError(f"{why}; version {newest} was put back{states}")
        error.__cause__ = cause
        return error

    refused: dict[int, LookalikeError] = {}
    for i, (cl, error) in enumerate(zip(clients, _reload_each(clients))):
        if error is not None and not _serves(cl, target):
            refused[i] = error
    if refused:
        why = "; ".join(f"the server at {clients[i].url} did not load index version {target} ({type(e).__name__}: {e})"
                        for i, e in sorted(refused.items()))
        raise put_back(why, next(iter(refused.values())))
    target_id = index_id_of(repository.search_dir / str(target))
    wrong: list[str] = []
    unread: dict[int, LookalikeError] = {}
    for i, cl in enumerate(clients):
        try:
            info = cl.info()
        except LookalikeError as exc:
            unread[i] = exc
            continue
        if (info.index_version, info.index_id) != (target, target_id):
            wrong.append(f"after loading, the server at {cl.url} serves {_describe(info)}, not index version {target} "
                         "of this repository")
    if wrong:
        raise put_back("; ".join(wrong), None)
    if unread:
        shown = "; ".join(f"the server at {clients[i].url} ({type(e).__name__}: {e})" for i, e in sorted(unread.items()))
        raise RollbackError(f"index version {target} was loaded, but INDEX_INFO could not be read to confirm it from "
                            f"{shown}") from next(iter(unread.values()))
    return newest, target


def _state(client: LookalikeClient) -> str:
    """What the server at `client.url` serves, for an error message; never raises."""
    try:
        return f"the server at {client.url} serves {_describe(client.info())}"
    except LookalikeError as exc:
        return f"the server at {client.url} could not be asked what it serves ({type(exc).__name__}: {exc})"
