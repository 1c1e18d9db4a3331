"""What `lookalike index` does on the Milvus backend around the writes (`lookalike.indexing.milvus_index`): checking
the servers before anything is embedded, reusing the live generation's embeddings, publishing (a new
generation and the alias move, or an incremental change), and confirming through each server's
INDEX_INFO that it serves what was written, as on the faiss backend.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from lookalike.indexing.milvus_index import LOAD_TIMEOUT_S, MilvusIndexError, MilvusReport, MilvusWriter, Row, catalog_rows
from lookalike.indexing.publishing import ServerMismatchError
from lookalike.indexing.repository import KEEP_VERSIONS
from lookalike.serving.artifacts import EmbedderManifest
from lookalike.serving.milvus_search import INDEX_TYPES, REFRESH_S, CollectionState, MilvusSettings
from lookalike_client import LookalikeClient, LookalikeError, ServerInfo

if TYPE_CHECKING:
    from lookalike.indexing.catalog import CatalogItem
    from lookalike.indexing.index_types import IndexChoice
    from lookalike.indexing.indexer import IndexReport

CONFIRM_S = 30.0  # how long the servers get to show a write in INDEX_INFO (they look every REFRESH_S)


@dataclass(frozen=True)
class MilvusTarget:
    """Where `lookalike index --search-backend milvus` writes: the settings, and whether to build a new
    generation even when the live one could be updated in place (`--full`, another index type)."""

    settings: MilvusSettings
    partition_key: bool = False


class MilvusEmbeddingStore:
    """sha256 -> the stored embeddings of that image in the live generation (same embedder only)."""

    def __init__(self, found: dict[str, np.ndarray]) -> None:
        self._found = found

    @classmethod
    def from_live(cls, writer: MilvusWriter, live: CollectionState | None, fingerprint: str,
                  hashes: Sequence[str]) -> "MilvusEmbeddingStore":
        """The live generation's embeddings, or, when it is another embedder's, the newest generation of
        this one that was not rolled back (the faiss backend reuses every kept version alike)."""
        source = live if live is not None and live.fingerprint == fingerprint else None
        if source is None:
            same = [s for _, s in sorted(writer.generations().items())
                    if s is not None and s.fingerprint == fingerprint and not s.rejected]
            source = same[-1] if same else None
        if source is None:
            return cls({})
        writer.client.load_collection(source.name, timeout=LOAD_TIMEOUT_S)
        return cls(writer.embeddings_of(source, hashes))

    def __len__(self) -> int:
        return len(self._found)

    def get(self, sha256: str) -> np.ndarray | None:
        found = self._found.get(sha256)
        return None if found is None else found.copy()


def _describe(info: ServerInfo) -> str:
    return (f"{info.backend} generation {info.index_version} ({info.products} products, state {info.index_id or 'none'}, "
            f"embedder {info.embedder_model} {info.embedder_fingerprint})")


def check_milvus_servers(writer: MilvusWriter, clients: Sequence[LookalikeClient], manifest: EmbedderManifest
                         ) -> CollectionState | None:
    """Before anything is embedded: every server searches this Milvus alias with this embedder, i.e. its
    INDEX_INFO names the live generation and state (or, while the live generation is another embedder's,
    which the servers refuse, an earlier generation of this embedder, or none). Returns the live one."""
    live = writer.live()
    if live is not None and live.fingerprint == manifest.fingerprint:
        expected = {(live.generation, live.state_id)}
    else:  # the servers refuse the live (foreign) one: they serve an earlier one of theirs, or nothing
        expected = {(0, "")} | {(g, s.state_id) for g, s in writer.generations().items()
                                if s is not None and s.fingerprint == manifest.fingerprint}
    for client in clients:
        info = client.info()
        if info.backend != "milvus":
            raise ServerMismatchError(
                f"the server at {client.url} searches with {info.backend}, not Milvus: start it with `lookalike serve "
                f"--search-backend milvus --milvus-uri {writer.settings.uri}`; nothing was embedded or written")
        if info.embedder_fingerprint != manifest.fingerprint:
            raise ServerMismatchError(
                f"the server at {client.url} serves embedder {info.embedder_model} ({info.embedder_fingerprint}), but the "
                f"model repository holds {manifest.model} ({manifest.fingerprint}); nothing was embedded or written")
        deadline = time.monotonic() + 3 * REFRESH_S  # a write of another run may not be seen yet
        while (info.index_version, info.index_id) not in expected and time.monotonic() < deadline:
            time.sleep(REFRESH_S)
            info = client.info()
        if (info.index_version, info.index_id) not in expected:
            names = f"{live.name} (generation {live.generation}, state {live.state_id})" if live else "no collection"
            raise ServerMismatchError(
                f"the server at {client.url} serves {_describe(info)}, but alias {writer.settings.alias} at "
                f"{writer.settings.uri} names {names}: the server searches another Milvus or alias; nothing was "
                "embedded or written")
    return live


def confirm_milvus(clients: Sequence[LookalikeClient], report: MilvusReport, timeout_s: float = CONFIRM_S) -> list[ServerInfo]:
    """Every server's INDEX_INFO must name the generation and state just written, with its product count
    (they look every REFRESH_S); MilvusIndexError names those that do not."""
    expected = (report.generation, report.state_id, report.products)
    confirmed: list[ServerInfo] = []
    for client in clients:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                info = client.info()
                if (info.index_version, info.index_id, info.products) == expected:
                    confirmed.append(info)
                    break
                seen = _describe(info)
            except LookalikeError as exc:
                seen = f"no INDEX_INFO ({type(exc).__name__}: {exc})"
            if time.monotonic() > deadline:
                raise MilvusIndexError(f"after {timeout_s:.0f} s the server at {client.url} serves {seen}, not generation "
                                       f"{report.generation} state {report.state_id} ({report.products} products)")
            time.sleep(REFRESH_S / 2)
    return confirmed


def publish_milvus(writer: MilvusWriter, rows: Sequence[Row], manifest: EmbedderManifest, clients: Sequence[LookalikeClient], *,
                   live: CollectionState | None, kind: str, build: dict[str, int], search: dict[str, int], full: bool,
                   partition_key: bool = False, keep: int = KEEP_VERSIONS, log: Callable[[str], None] = print) -> MilvusReport:
    """Writes `rows` as the catalog: a new generation when there is no live one of this embedder and index
    kind, or when `full`; else an incremental change of the live one. Then every server must confirm it.
    A new generation that a server does not confirm is rolled back (the alias returns to the live one)."""
    incremental = (not full and live is not None and live.fingerprint == manifest.fingerprint and live.kind == kind
                   and live.search == search)
    if incremental:
        assert live is not None
        report = writer.update_live(live, rows, manifest.fingerprint)
        confirm_milvus(clients, report)
        return report
    report = writer.build_generation(rows, fingerprint=manifest.fingerprint, embedder_model=manifest.model, dim=manifest.dim,
                                     kind=kind, build=build, search=search, partition_key=partition_key)
    try:
        confirm_milvus(clients, report)
    except MilvusIndexError as exc:
        if live is not None:
            writer.rollback()
            raise MilvusIndexError(f"{exc}; the alias names generation {live.generation} again") from exc
        raise
    report.dropped = writer.prune(keep)
    return report


def rollback_milvus(writer: MilvusWriter, clients: Sequence[LookalikeClient]) -> tuple[int, int]:
    """`lookalike index --rollback` on Milvus: the alias back to the previous generation, confirmed by
    every server. Returns (generation rolled back, generation served now)."""
    old, now = writer.rollback()
    live = writer.live()
    assert live is not None
    confirm_milvus(clients, MilvusReport(now, live.state_id, live.products, True))
    return old, now


def catalog_products(good: Sequence[tuple["CatalogItem", str, np.ndarray]]) -> list[tuple[str, str, list[tuple[str, str, np.ndarray]]]]:
    """Catalog rows (item, image sha256, [views, D] vectors) as products in the order their ids first
    appear, each with its images (category and image for display: its first row's, as on faiss)."""
    products: dict[str, tuple[str, list[tuple[str, str, np.ndarray]]]] = {}
    for item, sha, vectors in good:
        products.setdefault(item.product_id, (item.category, []))[1].append((str(item.image), sha, vectors))
    return [(pid, category, images) for pid, (category, images) in products.items()]


def milvus_kind(choice: "IndexChoice") -> tuple[str, dict[str, int], dict[str, int]]:
    """The Milvus index kind, build and search parameters of an `--index` choice."""
    kind = choice.kind
    if kind not in INDEX_TYPES:
        raise ValueError(f"the Milvus backend builds {', '.join(INDEX_TYPES)} indexes, not {kind}")
    build: dict[str, int] = {}
    hnsw, ivf, pq = (re.search(pattern, choice.factory) for pattern in (r"HNSW(\d+)", r"IVF(\d+)", r"PQ(\d+)"))
    if kind == "hnsw":
        build = {"M": int(hnsw.group(1)) if hnsw else 32, "efConstruction": 200}
    elif kind == "ivf-pq":
        build = {"nlist": int(ivf.group(1)) if ivf else 1024, "m": int(pq.group(1)) if pq else 16}
    return kind, build, dict(choice.search)


def publish_catalog(writer: MilvusWriter, good: Sequence[tuple["CatalogItem", str, np.ndarray]], manifest: EmbedderManifest,
                    clients: Sequence[LookalikeClient], *, live: CollectionState | None, choice: "IndexChoice", full: bool,
                    partition_key: bool, keep: int, report: "IndexReport") -> MilvusReport:
    """The Milvus end of `lookalike.indexing.indexer.index_catalog`: rows of the catalog, the counts of what changed
    against the live generation, the write (`publish_milvus`), and the report's version and pruned lists."""
    products = catalog_products(good)
    rows = catalog_rows(products)
    kind, build, search = milvus_kind(choice)
    report.products = len(products)
    if live is not None and live.fingerprint == manifest.fingerprint:
        before: dict[str, tuple[str, set[str]]] = {}
        for pid, category, _image, sha, _count in writer.stored_rows(live).values():
            before.setdefault(pid, (category, set()))[1].add(sha)
        report.previous = live.generation
        for pid, category, images in products:
            old = before.get(pid)
            if old is None:
                report.added += 1
            elif old[1] != {sha for _, sha, _ in images}:
                report.changed += 1
            elif old[0] != category:
                report.recategorized += 1
        now = {pid for pid, _, _ in products}
        report.removed = sum(1 for pid in before if pid not in now)
    else:
        report.added = len(products)
    written = publish_milvus(writer, rows, manifest, clients, live=live, kind=kind, build=build, search=search, full=full,
                             partition_key=partition_key, keep=keep)
    report.version, report.pruned = written.generation, written.dropped
    report.milvus = written
    return written
