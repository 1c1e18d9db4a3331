"""`lookalike index`: embed a catalog through the running server, publish it as a new index version of
`product_search`, and have the server swap it in without a restart. Incremental: images whose content
an index version of the same embedder already holds are not embedded again (`EmbeddingStore`).

Images are sent in batches over several concurrent requests (the server's dynamic batcher merges
them). A batch refused for a bad image is retried image by image, so one bad file costs only itself;
every unusable row is reported with its reason and the rest go on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from lookalike_client import FileRefusedError, InvalidRequestError, LookalikeClient
from lookalike_client.files import open_file, read_file

from .artifacts import VECTORS_FILE, ArtifactError, EmbedderManifest, IndexMeta
from .catalog import CatalogItem, Problem, read_catalog
from .index_types import IndexChoice, choose
from .preprocessing import ImageError, ImageLimits, PreprocessConfig
from .publishing import ServingRecord, check_server, clean_stale_staging, publish_index
from .repository import Repository
from .search import CorruptIndexError, Product, ProductIndex, load_products


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


def embed_items(
    client: LookalikeClient,
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
    server's) bound the local decode that renders the views."""
    limits = limits or ImageLimits(max_bytes=max_bytes)
    groups = [list(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]

    def embed_all(images: list[bytes]) -> np.ndarray:
        chunks = [client.embed(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        return np.concatenate(chunks)

    def run(group: list[CatalogItem]) -> list[tuple[CatalogItem, np.ndarray | Problem]]:
        data = [_read(item, max_bytes) for item in group]
        out: list[tuple[CatalogItem, np.ndarray | Problem]] = [
            (item, d) for item, d in zip(group, data) if isinstance(d, Problem)
        ]
        readable = [(item, _with_views(d, config, limits)) for item, d in zip(group, data) if isinstance(d, bytes)]
        if not readable:
            return out
        try:
            vectors = embed_all([image for _, images in readable for image in images])
            start = 0
            for item, images in readable:
                out.append((item, vectors[start : start + len(images)]))
                start += len(images)
        except InvalidRequestError:
            for item, images in readable:  # find the bad one(s)
                try:
                    out.append((item, embed_all(images)))
                except InvalidRequestError as exc:
                    out.append((item, Problem(item.where, f"{item.image.name}: {exc.detail}")))
        return out

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), unit="img", desc="embedding", file=sys.stderr)
    results: dict[int, np.ndarray | Problem] = {}
    position = {id(item): i for i, item in enumerate(items)}
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        for group_result in pool.map(run, groups):
            for item, value in group_result:
                results[position[id(item)]] = value
            if bar is not None:
                bar.update(len(group_result))
    if bar is not None:
        bar.close()
    good = [(items[i], results[i]) for i in range(len(items)) if isinstance(results[i], np.ndarray)]
    problems = [results[i] for i in range(len(items)) if isinstance(results[i], Problem)]
    return [item for item, _ in good], [v.astype(np.float32) for _, v in good], problems  # type: ignore[misc]


def index_catalog(
    catalog: str | Path,
    repository: Repository,
    client: LookalikeClient,
    *,
    index: str = "auto",
    index_options: dict[str, int | None] | None = None,
    factory: str | None = None,
    batch_size: int = 16,
    concurrency: int = 4,
    keep_versions: int = 2,
    progress: bool = True,
    reuse: bool = True,
) -> IndexReport:
    """Embeds the catalog through the server and publishes it as a new version. Incremental: an image
    whose file content (sha256) an index version of the same embedder already holds is not embedded
    again (`EmbeddingStore`; `reuse=False` embeds all); removed products are dropped and category changes
    kept without embedding. `index` (auto|flat|hnsw|ivf-pq) with `index_options` (hnsw_m, ef_search,
    nlist, m, nprobe) picks the FAISS index (`lookalike.index_types`); `factory`, a FAISS index_factory
    string, overrides it for experts."""
    import time

    started = time.perf_counter()
    manifest = repository.manifest()
    clean_stale_staging(repository, log=lambda m: print(f"lookalike index: {m}", file=sys.stderr))
    # Before anything is read or embedded: the server serves this repository, with this embedder.
    client.wait_until_ready(timeout_s=120.0)
    check_server(repository, client)
    items, problems = read_catalog(catalog)
    limits = repository.image_limits()
    config = repository.preprocessing()
    if not factory:  # refuse impossible settings before hours of embedding, on the expected vector count
        choose(index, len(items) * (1 + len(config.catalog_views)), manifest.dim, **(index_options or {}))
    store = EmbeddingStore.from_repository(repository, manifest.fingerprint) if reuse else EmbeddingStore()
    hashes: dict[int, str] = {}
    known: dict[int, np.ndarray] = {}
    for i, item in enumerate(items):
        try:
            if item.image.stat().st_size <= limits.max_bytes:  # larger ones are reported by embed_items
                hashes[i] = content_hash(item.image)
        except OSError:
            continue  # reported by embed_items, which reads it again
        found = store.get(hashes[i]) if i in hashes else None
        if found is not None:
            known[i] = found
    todo = [i for i in range(len(items)) if i not in known]
    if todo:
        client.wait_until_ready(timeout_s=120.0, model="embed_image")
    embedded, new_vectors, embed_problems = embed_items(
        client, [items[i] for i in todo], batch_size=batch_size, concurrency=concurrency, progress=progress,
        max_bytes=limits.max_bytes, config=config, limits=limits,
    )
    problems += embed_problems
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
    built = build_index([item for _, item, _ in good], [v for _, _, v in good], manifest, choice=choice,
                        hashes=[hashes[i] for i, _, _ in good])
    report = IndexReport(0, len(built), problems, 0.0, choice, rows, len(good), reused=len(known),
                         embedded=len(embedded))
    compare_versions(repository, built, report)
    published = publish_index(repository, built, client, keep_versions=keep_versions)
    report.version, report.pruned, report.kept_for = published.version, published.pruned, published.kept_for
    report.superseded_by = published.superseded_by
    report.seconds = time.perf_counter() - started
    return report


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
