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
written, with its id and product count (`confirm_served`), or that version is set aside.

Every running `lookalike serve` records which version it serves in `product_search/.serving/`
(`record_serving`, kept fresh by its supervisor), so that pruning old versions keeps, and names, a
version that another server on the same repository still serves.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from lookalike_client import LookalikeClient, LookalikeError, ServerInfo
from lookalike_client import contract as c

from .artifacts import ArtifactError, IndexMeta
from .repository import STAGING_OWNER_FILE, STAGING_PREFIX, Repository
from .search import CorruptIndexError, ProductIndex, check_index_dir

Log = Callable[[str], None]

REASON_FILE = "REJECTED.txt"
KEEP_REJECTED = 5  # set-aside versions kept for inspection; older ones are deleted
# A staging directory whose writer cannot be asked (another host, or no owner file) is stale after:
STALE_FOREIGN_STAGING_S = 24 * 3600.0
STALE_UNKNOWN_STAGING_S = 3600.0


class PublishError(RuntimeError):
    """A new index version that the server did not take (or did not confirm); it has been set aside."""


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


def record_serving(repository: Repository, version: int, server_id: str = "", urls: tuple[str, ...] = ()) -> Path:
    """Records (atomically) that this process serves index `version` of `repository`."""
    host, pid = socket.gethostname(), os.getpid()
    repository.serving_dir.mkdir(exist_ok=True)
    target = _serving_file(repository, host, pid)
    staged = target.with_name(f".{target.name}.tmp")
    staged.write_text(json.dumps({"host": host, "pid": pid, "version": int(version), "server_id": server_id,
                                  "urls": list(urls), "updated": time.time()}))
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


def prune_index_versions(repository: Repository, keep: int = 2, protected: set[int] | frozenset[int] = frozenset()) -> list[int]:
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
    kept = sorted(repository.rejected_dir.iterdir(), key=lambda p: p.stat().st_mtime)
    for old in kept[:-KEEP_REJECTED]:
        shutil.rmtree(old, ignore_errors=True)
    return target


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
        age = now - staging.stat().st_mtime
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
        if not target.is_file() or target.read_bytes() == source:
            continue
        staged = target.with_name(f".model.py.{os.getpid()}")
        staged.write_bytes(source)
        os.replace(staged, target)
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
    this release's model code (`refresh_model_code`)."""
    clean_stale_staging(repository, log)
    refresh_model_code(repository, log)
    fingerprint = repository.manifest().fingerprint
    skipped: list[tuple[int, str]] = []
    for version in reversed(repository.index_versions()):
        problem = version_problem(repository.search_dir / str(version), fingerprint)
        if problem is None:
            for bad, reason in skipped:
                where = set_aside(repository, bad, f"index version {bad} cannot be served: {reason}")
                log(f"skipped index version {bad}: {reason} (set aside in {where})")
            if skipped:
                log(f"serving index version {version}, the newest that can be served")
            return version
        skipped.append((version, problem))
    for bad, reason in skipped:
        log(f"index version {bad} cannot be served: {reason}")
    version = write_empty_index(repository)
    log(f"published empty index version {version} of {c.SEARCH_MODEL}; run `lookalike index CATALOG` to fill it")
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


@dataclass
class Publication:
    """What `publish_index` did, each part confirmed: the version written and the server's own
    INDEX_INFO after the reload; versions deleted, and versions kept because a server still serves them."""

    version: int
    served: ServerInfo
    pruned: list[int] = field(default_factory=list)
    kept_for: dict[int, list[ServingRecord]] = field(default_factory=dict)
    superseded_by: int | None = None  # a newer version that another `lookalike index` published meanwhile


def confirm_served(repository: Repository, client: LookalikeClient, version: int, index: ProductIndex) -> tuple[ServerInfo, int | None]:
    """After the reload: the server's INDEX_INFO must name `version` with `index`'s id and product count.
    Returns (what it serves, None), or (what it serves, its version) when a newer version of this
    repository, published meanwhile by another `lookalike index`, already replaced ours. Anything else
    sets `version` aside and raises PublishError."""
    try:
        info = client.info()
    except LookalikeError as exc:
        raise PublishError(f"the server took the load of index version {version}, but its INDEX_INFO could not be "
                           f"read to confirm it ({type(exc).__name__}: {exc}); the version stays in place") from exc
    if (info.index_version, info.index_id, info.products) == (version, index.meta.index_id, len(index)):
        return info, None
    if info.index_version > version and index_id_of(repository.search_dir / str(info.index_version)) == info.index_id:
        return info, info.index_version
    why = (f"after loading, the server at {client.url} serves {_describe(info)}, not index version {version} "
           f"({len(index)} products, id {index.meta.index_id})")
    where = set_aside(repository, version, why)
    raise PublishError(f"{why}: version {version} was set aside in {where}, where no restart serves it")


def publish_index(repository: Repository, index: ProductIndex, client: LookalikeClient, *,
                  keep_versions: int = 2) -> Publication:
    """Writes `index` as the next version, has the running server load it, confirms through INDEX_INFO
    that the server serves it (`confirm_served`), then prunes old versions except those another server
    on this repository still serves (`serving_records`). If the server does not load it (refused, no
    admin key, unreachable) or serves something else afterwards, the version is set aside before the
    error is raised, so that a restart cannot serve what the server never accepted."""
    version = write_index_version(repository, index.save)
    try:
        client.reload_index()
    except LookalikeError as exc:
        if not _serves(client, version):
            why = f"{type(exc).__name__}: {exc}"
            where = set_aside(repository, version, f"the server did not load index version {version}: {why}")
            raise PublishError(f"the server did not load index version {version} ({why}); it was set aside in "
                               f"{where}, where no restart serves it") from exc
    served, superseded_by = confirm_served(repository, client, version, index)
    # The server just reloaded may not have rewritten its record yet: known by its id, it is not "another".
    others = [r for r in serving_records(repository) if not (served.server_id and r.server_id == served.server_id)]
    kept_for: dict[int, list[ServingRecord]] = {}
    for record in others:
        kept_for.setdefault(record.version, []).append(record)
    pruned = prune_index_versions(repository, keep=keep_versions, protected=set(kept_for))
    remaining = repository.index_versions()
    newest = set(remaining[-keep_versions:]) if keep_versions > 0 else set()
    kept_for = {v: r for v, r in kept_for.items() if v in remaining and v not in newest}  # kept only for them
    return Publication(version, served, pruned, kept_for, superseded_by)


def _serves(client: LookalikeClient, version: int) -> bool:
    try:
        return version in client.served_index_versions()
    except LookalikeError:
        return False


class RollbackError(RuntimeError):
    """No earlier index version to go back to, or the server did not take it (nothing changed then)."""


def rollback_index(repository: Repository, client: LookalikeClient) -> tuple[int, int]:
    """Serves the index version before the newest again (`lookalike index --rollback`): the newest is set
    aside (`.rejected/`, with the reason; its number is never reused) and the server loads the previous
    one, which hot-swaps in like a new version. If the server does not take it, the newest is put back.
    Returns (version rolled back, version served now)."""
    versions = repository.index_versions()
    if not versions:
        raise RollbackError("no index version to roll back")
    newest = versions[-1]
    fingerprint = repository.manifest().fingerprint
    earlier = [v for v in versions[:-1] if version_problem(repository.search_dir / str(v), fingerprint) is None]
    if not earlier:
        kept = ", ".join(map(str, versions[:-1])) or "none"
        raise RollbackError(f"no earlier index version of this embedder to roll back to from version {newest} "
                            f"(other versions kept: {kept}; `lookalike index` keeps the newest 2)")
    for stale in [v for v in versions[:-1] if v > earlier[-1]]:  # unservable ones in between
        set_aside(repository, stale, f"index version {stale} cannot be served; set aside by a rollback")
    where = set_aside(repository, newest, f"rolled back by `lookalike index --rollback` to version {earlier[-1]}")
    target = earlier[-1]

    def put_back(why: str, cause: Exception | None) -> RollbackError:
        (where / REASON_FILE).unlink(missing_ok=True)
        os.rename(where, repository.search_dir / str(newest))
        try:
            client.reload_index()
        except LookalikeError:
            pass
        error = RollbackError(f"{why}; version {newest} was put back")
        error.__cause__ = cause
        return error

    try:
        client.reload_index()
    except LookalikeError as exc:
        if not _serves(client, target):
            raise put_back(f"the server did not load index version {target} ({type(exc).__name__}: {exc})", exc) from exc
    try:
        info = client.info()
    except LookalikeError as exc:
        raise RollbackError(f"the server took the load of index version {target}, but its INDEX_INFO could not be "
                            f"read to confirm it ({type(exc).__name__}: {exc})") from exc
    if (info.index_version, info.index_id) != (target, index_id_of(repository.search_dir / str(target))):
        raise put_back(f"after loading, the server at {client.url} serves {_describe(info)}, not index version {target} "
                       "of this repository", None)
    return newest, target
