"""`lookalike index`: embed a catalog through the running server, publish it as a new index version of
`product_search`, and have the server swap it in without a restart. Incremental: images whose content
an index version of the same embedder already holds are not embedded again (`EmbeddingStore`).

Images are sent in batches over several concurrent requests (the server's dynamic batcher merges
them), through one server or spread over several on the same repository (`lookalike.indexing.fanout`). A
batch refused for a bad image is retried image by image, so one bad file costs only itself; every
unusable row is reported with its reason and the rest go on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from lookalike.indexing.catalog import CatalogItem, Problem, read_catalog
from lookalike.indexing.fanout import AllServersGone, spread
from lookalike.indexing.index_types import IndexChoice, choose
from lookalike.indexing.publishing import ServingRecord, as_clients, check_server, check_servers, clean_stale_staging, publish_index
from lookalike.indexing.repository import KEEP_VERSIONS, Repository
from lookalike.serving.artifacts import VECTORS_FILE, ArtifactError, EmbedderManifest, IndexMeta
from lookalike.serving.index_files import CorruptIndexError, Product, load_products
from lookalike.serving.preprocessing import ImageError, ImageLimits, PreprocessConfig
from lookalike.serving.search import ProductIndex
from lookalike_client import FileRefusedError, InvalidRequestError, LookalikeClient, ServerUnavailableError
from lookalike_client.files import open_file, read_file

if TYPE_CHECKING:
    from lookalike.indexing.milvus_index import MilvusReport, MilvusWriter
    from lookalike.indexing.milvus_publish import MilvusEmbeddingStore, MilvusTarget
    from lookalike.serving.milvus_search import CollectionState


class EmptyCatalogError(ValueError):
    """Not one row of the catalog could be indexed: nothing is published, the served version stays."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        shown = "; ".join(str(p) for p in problems[:3]) + ("; ..." if len(problems) > 3 else "")
        what = (f"no row of the catalog could be indexed ({len(problems)} problem(s): {shown})" if problems
                else "the catalog lists no product")
        super().__init__(f"{what}; nothing was published and the server keeps serving its current index")
        self.problems = list(problems)


@dataclass
class IndexReport:
    version: int
    products: int
    problems: list[Problem] = field(default_factory=list)
    seconds: float = 0.0
    index: IndexChoice | None = None
    vectors: int = 0
    images: int = 0  # catalog rows indexed (a product may have several)
    # Against the version served before (incremental updates): products added, whose images changed,
    # removed, whose category alone changed; images whose embeddings were reused from the store or
    # sent to the server; rows that failed (= len(problems)).
    added: int = 0
    changed: int = 0
    removed: int = 0
    recategorized: int = 0
    reused: int = 0
    embedded: int = 0
    previous: int | None = None  # the version compared against
    # After publishing, each confirmed by the server: versions deleted, versions kept because another
    # server on the repository still serves them, and a newer version another run published meanwhile.
    pruned: list[int] = field(default_factory=list)
    kept_for: dict[int, list[ServingRecord]] = field(default_factory=dict)
    superseded_by: int | None = None
    # Several servers: the images each one embedded (by url), those that went away while embedding (their
    # batches went to the others; each was ready again before publishing), and those that confirmed it.
    embedded_by: dict[str, int] = field(default_factory=dict)
    embedding_seconds: float = 0.0  # of `seconds`, the embedding through the server(s)
    went_away: list[str] = field(default_factory=list)
    servers: list[str] = field(default_factory=list)
    milvus: "MilvusReport | None" = None  # the Milvus backend: what was written (a new generation or in place)

    @property
    def failed(self) -> int:
        return len(self.problems)


class EmbeddingStore:
    """Embeddings already computed, keyed by (embedder fingerprint, sha256 of the image file): the index
    versions kept beside the served one (`product_search/<N>/vectors.npy`, with each image's hash in
    products.json). Only versions of the current embedder count, so a new embedder re-embeds all."""

    def __init__(self) -> None:
        self._where: dict[str, tuple[np.ndarray, int, int]] = {}  # sha256 -> (vectors, start, count)

    @classmethod
    def from_repository(cls, repository: Repository, fingerprint: str) -> "EmbeddingStore":
        store = cls()
        for version in reversed(repository.index_versions()):  # newest first: it wins a tie
            directory = repository.search_dir / str(version)
            try:
                if IndexMeta.load(directory).embedder_fingerprint != fingerprint or not (directory / VECTORS_FILE).is_file():
                    continue
                products = load_products(directory)
                vectors = np.load(directory / VECTORS_FILE, mmap_mode="r")
            except (ArtifactError, CorruptIndexError, OSError, ValueError):
                continue  # an unreadable version just contributes nothing
            start = 0
            for product in products:
                for _, sha, count in product.sources:
                    if start + count <= len(vectors):
                        store._where.setdefault(sha, (vectors, start, count))
                    start += count
        return store

    def __len__(self) -> int:
        return len(self._where)

    def get(self, sha256: str) -> np.ndarray | None:
        found = self._where.get(sha256)
        if found is None:
            return None
        vectors, start, count = found
        return np.array(vectors[start : start + count], dtype=np.float32)


def content_hash(path: Path) -> str:
    """The sha256 of a regular file's content, streamed in 1 MiB chunks; FileRefusedError (an OSError)
    for anything else (a FIFO, a device: never opened)."""
    digest = hashlib.sha256()
    with open_file(path, what="image") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read(item: CatalogItem, max_bytes: int) -> bytes | Problem:
    """The file's bytes, unless it is not a regular file or is over the server's upload limit:
    checked from its size first, so that an oversized file is never read into memory."""
    try:
        return read_file(item.image, max_bytes)
    except FileRefusedError as exc:
        return Problem(item.where, f"{item.image.name}: {exc.reason}")
    except OSError as exc:
        return Problem(item.where, f"cannot read {item.image}: {exc.strerror or exc}")


def _with_views(data: bytes, config: PreprocessConfig | None, limits: ImageLimits) -> list[bytes]:
    """The packshot's bytes, then its catalog views rendered here (the server embeds them all). A
    packshot that does not decode here is sent alone: the server refuses it with its own reason."""
    if config is None or not config.catalog_views:
        return [data]
    try:
        return [data, *config.render_views(data, limits)]
    except ImageError:
        return [data]


@dataclass
class Embedded:
    """What `embed_across` returns: the items that embedded with each one's [1 + views, D] embeddings,
    the problems of the rest, the images each server embedded (by its place in the list given), and the
    servers that went away while embedding (their batches went to the others), with their errors."""

    items: list[CatalogItem]
    vectors: list[np.ndarray]
    problems: list[Problem]
    images_by_server: list[int]
    gone: dict[int, ServerUnavailableError] = field(default_factory=dict)


def embed_items(
    client: LookalikeClient | Sequence[LookalikeClient],
    items: Sequence[CatalogItem],
    *,
    batch_size: int = 16,
    concurrency: int = 4,
    progress: bool = True,
    max_bytes: int = ImageLimits().max_bytes,
    config: PreprocessConfig | None = None,
    limits: ImageLimits | None = None,
) -> tuple[list[CatalogItem], list[np.ndarray], list[Problem]]:
    """Returns the items that embedded, each one's [1 + views, D] embeddings (its packshot, then the
    catalog views of the preprocessing `config`, none without one), and the problems of the rest.
    Files over `max_bytes` (the server's limit) are reported without being read; `limits` (the
    server's) bound the local decode that renders the views. Several clients: see `embed_across`."""
    done = embed_across(as_clients(client), items, batch_size=batch_size, concurrency=concurrency, progress=progress,
                        max_bytes=max_bytes, config=config, limits=limits)
    return done.items, done.vectors, done.problems


def embed_across(
    clients: Sequence[LookalikeClient],
    items: Sequence[CatalogItem],
    *,
    batch_size: int = 16,
    concurrency: int = 4,
    progress: bool = True,
    max_bytes: int = ImageLimits().max_bytes,
    config: PreprocessConfig | None = None,
    limits: ImageLimits | None = None,
) -> Embedded:
    """`embed_items` over every server of `clients`: batches of `batch_size` rows from one queue, with
    `concurrency` requests in flight per server (`lookalike.indexing.fanout`), one progress bar. A batch whose
    server is unreachable past the client's own retries (ServerUnavailableError) goes to the other
    servers, and that server gets no more; ServerUnavailableError only once every server has gone
    (with one server: its own error, as it came). Any other error stops the run, as with one server."""
    limits = limits or ImageLimits(max_bytes=max_bytes)
    groups = [list(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]

    def embed_all(client: LookalikeClient, images: list[bytes]) -> np.ndarray:
        chunks = [client.embed(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        return np.concatenate(chunks)

    def run(client: LookalikeClient, group: list[CatalogItem]) -> list[tuple[CatalogItem, np.ndarray | Problem]]:
        data = [_read(item, max_bytes) for item in group]
        out: list[tuple[CatalogItem, np.ndarray | Problem]] = [
            (item, d) for item, d in zip(group, data) if isinstance(d, Problem)
        ]
        readable = [(item, _with_views(d, config, limits)) for item, d in zip(group, data) if isinstance(d, bytes)]
        if not readable:
            return out
        try:
            vectors = embed_all(client, [image for _, images in readable for image in images])
            start = 0
            for item, images in readable:
                out.append((item, vectors[start : start + len(images)]))
                start += len(images)
        except InvalidRequestError:
            for item, images in readable:  # find the bad one(s)
                try:
                    out.append((item, embed_all(client, images)))
                except InvalidRequestError as exc:
                    out.append((item, Problem(item.where, f"{item.image.name}: {exc.detail}")))
        return out

    bar = None
    if progress:
        from tqdm import tqdm

        where = f" on {len(clients)} servers" if len(clients) > 1 else ""
        bar = tqdm(total=len(items), unit="img", desc=f"embedding{where}", file=sys.stderr)

    def tick(_group: list[CatalogItem], result: list[tuple[CatalogItem, np.ndarray | Problem]]) -> None:
        if bar is not None:
            bar.update(len(result))

    try:
        done = spread(clients, groups, run, per_server=max(1, concurrency), done=tick,
                      gone=lambda exc: isinstance(exc, ServerUnavailableError))
    except AllServersGone as exc:
        errors = {i: e for i, e in exc.errors.items() if isinstance(e, ServerUnavailableError)}
        if len(clients) == 1 and 0 in errors:
            raise errors[0] from errors[0].__cause__  # one server: its own error, as it came
        shown = "; ".join(f"{clients[i].url}: {type(e).__name__}: {e}" for i, e in sorted(errors.items()))
        raise ServerUnavailableError(
            f"every server went away while embedding, {exc.left} of {len(groups)} batches of {batch_size} left "
            f"({shown}); nothing was published") from (errors[max(errors)] if errors else exc)
    finally:
        if bar is not None:
            bar.close()
    results: dict[int, np.ndarray | Problem] = {}
    position = {id(item): i for i, item in enumerate(items)}
    by_server = [0] * len(clients)
    for group_result, server in zip(done.results, done.done_by):
        for item, value in group_result:
            results[position[id(item)]] = value
            if isinstance(value, np.ndarray):
                by_server[server] += 1
    good = [(items[i], v) for i in range(len(items)) if isinstance(v := results[i], np.ndarray)]
    problems = [p for i in range(len(items)) if isinstance(p := results[i], Problem)]
    gone = {i: e for i, e in done.gone.items() if isinstance(e, ServerUnavailableError)}
    return Embedded([item for item, _ in good], [v.astype(np.float32) for _, v in good], problems, by_server, gone)


def index_catalog(
    catalog: str | Path,
    repository: Repository,
    client: LookalikeClient | Sequence[LookalikeClient],
    *,
    index: str = "auto",
    index_options: dict[str, int | None] | None = None,
    factory: str | None = None,
    batch_size: int = 16,
    concurrency: int = 4,
    keep_versions: int = KEEP_VERSIONS,
    progress: bool = True,
    reuse: bool = True,
    milvus: "MilvusTarget | None" = None,
) -> IndexReport:
    """Embeds the catalog through the server and publishes it as a new version. Incremental: an image
    whose file content (sha256) an index version of the same embedder already holds is not embedded
    again (`EmbeddingStore`; `reuse=False` embeds all); removed products are dropped and category changes
    kept without embedding. `index` (auto|flat|hnsw|ivf-pq) with `index_options` (hnsw_m, ef_search,
    nlist, m, nprobe) picks the FAISS index (`lookalike.indexing.index_types`); `factory`, a FAISS index_factory
    string, overrides it for experts.

    `client` may be the clients of several servers on this repository (`lookalike index --url A --url
    B`): each is checked before anything is embedded (`check_servers`), the batches are spread over all
    of them with `concurrency` requests in flight per server (`embed_across`; a server that goes away
    leaves its batches to the others, and must be back, serving this repository, before anything is
    written), and every one of them must load and confirm the new version, or none serves it
    (`publish_index`).

    `milvus`: the catalog goes into that Milvus alias instead (`lookalike.indexing.milvus_publish`): the servers
    must search it; images are reused from its live generation; the change is written in place or as a
    new generation, and every server confirms it through INDEX_INFO. `index` picks the Milvus index type."""
    import time

    started = time.perf_counter()
    manifest = repository.manifest()
    clean_stale_staging(repository, log=lambda m: print(f"lookalike index: {m}", file=sys.stderr))
    # Before anything is read or embedded: each server serves this repository, with this embedder.
    clients = as_clients(client)
    for cl in clients:
        cl.wait_until_ready(timeout_s=120.0)
    writer = live = None
    if milvus is not None:
        from lookalike.indexing.milvus_index import MilvusWriter
        from lookalike.indexing.milvus_publish import check_milvus_servers

        if factory:
            raise ValueError("--index-factory is a FAISS index_factory string: the Milvus backend takes --index")
        writer = MilvusWriter(milvus.settings)
        try:
            live = check_milvus_servers(writer, clients, manifest)
        except BaseException:
            writer.close()
            raise
    else:
        check_servers(repository, clients)
    try:
        return _index_checked(catalog, repository, clients, manifest, started, index=index, index_options=index_options,
                              factory=factory, batch_size=batch_size, concurrency=concurrency, keep_versions=keep_versions,
                              progress=progress, reuse=reuse, milvus=milvus, writer=writer, live=live)
    finally:
        if writer is not None:
            writer.close()


def _index_checked(catalog: str | Path, repository: Repository, clients: Sequence[LookalikeClient], manifest: EmbedderManifest,
                   started: float, *, index: str, index_options: dict[str, int | None] | None, factory: str | None,
                   batch_size: int, concurrency: int, keep_versions: int, progress: bool, reuse: bool,
                   milvus: "MilvusTarget | None", writer: "MilvusWriter | None", live: "CollectionState | None") -> IndexReport:
    """`index_catalog` once the servers have been checked."""
    import time

    items, problems = read_catalog(catalog)
    limits = repository.image_limits()
    config = repository.preprocessing()
    if not factory:  # refuse impossible settings before hours of embedding, on the expected vector count
        choose(index, len(items) * (1 + len(config.catalog_views)), manifest.dim, **(index_options or {}))
    hashes: dict[int, str] = {}
    known: dict[int, np.ndarray] = {}
    for i, item in enumerate(items):
        try:
            if item.image.stat().st_size <= limits.max_bytes:  # larger ones are reported by embed_items
                hashes[i] = content_hash(item.image)
        except OSError:
            continue  # reported by embed_items, which reads it again
    store: EmbeddingStore | MilvusEmbeddingStore
    if not reuse:
        store = EmbeddingStore()
    elif writer is not None:
        from lookalike.indexing.milvus_publish import MilvusEmbeddingStore

        store = MilvusEmbeddingStore.from_live(writer, live, manifest.fingerprint, list(hashes.values()))
    else:
        store = EmbeddingStore.from_repository(repository, manifest.fingerprint)
    for i, sha in hashes.items():
        found = store.get(sha)
        if found is not None and found.shape[0] == 1 + len(config.catalog_views):
            known[i] = found
    todo = [i for i in range(len(items)) if i not in known]
    if todo:
        for cl in clients:
            cl.wait_until_ready(timeout_s=120.0, model="embed_image")
    embedding_started = time.perf_counter()
    done = embed_across(
        clients, [items[i] for i in todo], batch_size=batch_size, concurrency=concurrency, progress=progress,
        max_bytes=limits.max_bytes, config=config, limits=limits,
    )
    embedding_seconds = time.perf_counter() - embedding_started
    embedded, new_vectors = done.items, done.vectors
    problems += done.problems
    for place, error in sorted(done.gone.items()):
        _back_again(repository, clients[place], error, check=writer is None)
    fresh = {id(item): v for item, v in zip(embedded, new_vectors)}
    good = [(i, items[i], known[i] if i in known else fresh[id(items[i])]) for i in range(len(items))
            if i in known or id(items[i]) in fresh]
    if not good:
        raise EmptyCatalogError(problems)
    rows = sum(len(v) for _, _, v in good)
    if factory:
        choice = IndexChoice("custom", factory, "FAISS factory string given")
    else:
        choice = choose(index, rows, manifest.dim, **(index_options or {}))
    for i, item, _ in good:
        if i not in hashes:  # embedded although not hashed before (a file that appeared meanwhile)
            try:
                hashes[i] = content_hash(item.image)
            except OSError:  # and changed again since: indexed, but not reused by the next run
                hashes[i] = ""
    if writer is not None:
        assert milvus is not None
        from lookalike.indexing.milvus_publish import publish_catalog

        report = IndexReport(0, 0, problems, 0.0, choice, rows, len(good), reused=len(known), embedded=len(embedded))
        report.embedding_seconds = embedding_seconds
        report.embedded_by = {cl.url: n for cl, n in zip(clients, done.images_by_server)}
        report.went_away = [clients[place].url for place in sorted(done.gone)]
        publish_catalog(writer, [(item, hashes[i], v) for i, item, v in good], manifest, clients, live=live, choice=choice,
                        full=not reuse, partition_key=milvus.partition_key, keep=keep_versions, report=report)
        report.servers = [cl.url for cl in clients]
        report.seconds = time.perf_counter() - started
        return report
    built = build_index([item for _, item, _ in good], [v for _, _, v in good], manifest, choice=choice,
                        hashes=[hashes[i] for i, _, _ in good])
    report = IndexReport(0, len(built), problems, 0.0, choice, rows, len(good), reused=len(known),
                         embedded=len(embedded))
    report.embedding_seconds = embedding_seconds
    report.embedded_by = {cl.url: n for cl, n in zip(clients, done.images_by_server)}
    report.went_away = [clients[place].url for place in sorted(done.gone)]
    compare_versions(repository, built, report)
    published = publish_index(repository, built, clients, keep_versions=keep_versions)
    report.version, report.pruned, report.kept_for = published.version, published.pruned, published.kept_for
    report.superseded_by = published.superseded_by
    report.servers = [info.url for info in published.served_by]
    report.seconds = time.perf_counter() - started
    return report


def _back_again(repository: Repository, client: LookalikeClient, error: ServerUnavailableError, wait_s: float = 120.0,
                check: bool = True) -> None:
    """A server that went away while embedding (its batches went to the others) must serve again, this
    repository with this embedder, before the new version is written: every listed server is to serve
    it. Its supervisor restarts it (`lookalike serve`); after `wait_s`, ServerUnavailableError, and
    nothing is written."""
    try:
        client.wait_until_ready(timeout_s=wait_s)
    except ServerUnavailableError as exc:
        raise ServerUnavailableError(
            f"the server at {client.url} went away while embedding ({type(error).__name__}: {error}; the other servers "
            f"embedded its batches) and was not ready again within {wait_s:.0f} s: every listed server must serve the "
            "new version, so nothing was written and each server serves what it served before") from exc
    if check:  # the faiss backend: still this repository (on Milvus, the writes are confirmed per server)
        check_server(repository, client)


def compare_versions(repository: Repository, built: ProductIndex, report: IndexReport) -> None:
    """Fills the added/changed/removed/recategorized counts of `report` against the served version."""
    latest = repository.latest_index_dir()
    if latest is None:
        report.added = len(built)
        return
    try:
        before = {p.product_id: p for p in load_products(latest)}
    except CorruptIndexError:
        before = {}
    report.previous = int(latest.name)
    now = {p.product_id: p for p in built.products}
    report.added = sum(1 for pid in now if pid not in before)
    report.removed = sum(1 for pid in before if pid not in now)
    for pid, product in now.items():
        old = before.get(pid)
        if old is None:
            continue
        if sorted(s[1] for s in old.sources) != sorted(s[1] for s in product.sources):
            report.changed += 1
        elif old.category != product.category:
            report.recategorized += 1


def build_index(items: Sequence[CatalogItem], vectors: Sequence[np.ndarray], manifest: EmbedderManifest, *,
                choice: IndexChoice | None = None, hashes: Sequence[str] | None = None) -> ProductIndex:
    """The index of `items` (catalog rows), each with its vectors (packshot, then catalog views), for
    the embedder of `manifest`, of the kind `choice` (default: flat). Rows of one product id become one
    product whose vectors are all its images' (it scores its best vector), in the order the ids first
    appear; its image for display is its first row's. `hashes` (each row's image sha256) are recorded
    for incremental updates."""
    choice = choice or IndexChoice("flat", "Flat", "default")
    dim = manifest.dim
    for block in vectors:
        if block.shape[1] != dim:
            raise RuntimeError(f"server returned {block.shape[1]}-d embeddings, the embedder manifest says {dim}")
    blocks: dict[str, list[np.ndarray]] = {}
    products: dict[str, Product] = {}
    sources: dict[str, list[tuple[str, str, int]]] = {}
    for i, (item, block) in enumerate(zip(items, vectors)):
        products.setdefault(item.product_id, Product(item.product_id, item.category, str(item.image)))
        blocks.setdefault(item.product_id, []).append(block)
        if hashes is not None:
            sources.setdefault(item.product_id, []).append((str(item.image), hashes[i], len(block)))
    grouped = [np.concatenate(blocks[pid]) for pid in products]
    return ProductIndex.build(
        [dataclasses.replace(p, sources=tuple(sources.get(pid, ()))) for pid, p in products.items()],
        np.concatenate(grouped) if grouped else np.zeros((0, dim), np.float32),
        dim=dim,
        factory=choice.factory,
        embedder_fingerprint=manifest.fingerprint,
        vectors=[len(block) for block in grouped],
        search=choice.search,
    )
