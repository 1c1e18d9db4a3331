"""`lookalike index`: embed a catalog through the running server, publish it as a new index version of
`product_search`, and have the server swap it in without a restart.

Images are sent in batches over several concurrent requests (the server's dynamic batcher merges
them). A batch refused for a bad image is retried image by image, so one bad file costs only itself;
every unusable row is reported with its reason and the rest go on.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from lookalike_client import InvalidRequestError, LookalikeClient

from .artifacts import EmbedderManifest
from .catalog import CatalogItem, Problem, read_catalog
from .index_types import IndexChoice, choose
from .preprocessing import ImageError, ImageLimits, PreprocessConfig
from .publishing import clean_stale_staging, publish_index
from .repository import Repository
from .search import Product, ProductIndex


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
    images: int = 0  # catalog rows embedded (a product may have several)


def _read(item: CatalogItem, max_bytes: int) -> bytes | Problem:
    """The file's bytes, unless it is over the server's upload limit: checked from its size first,
    so that an oversized file is never read into memory."""
    try:
        size = item.image.stat().st_size
        if size > max_bytes:
            return Problem(item.where, f"{item.image.name}: image too large: {size:,} bytes, the limit is {max_bytes:,} bytes")
        return item.image.read_bytes()
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
) -> IndexReport:
    """Embeds the catalog through the server and publishes it. `index` (auto|flat|hnsw|ivf-pq) with
    `index_options` (hnsw_m, ef_search, nlist, m, nprobe) picks the FAISS index (`lookalike.index_types`);
    `factory`, a FAISS index_factory string, overrides it for experts."""
    import time

    started = time.perf_counter()
    manifest = repository.manifest()
    clean_stale_staging(repository, log=lambda m: print(f"lookalike index: {m}", file=sys.stderr))
    items, problems = read_catalog(catalog)
    client.wait_until_ready(timeout_s=120.0, model="embed_image")
    limits = repository.image_limits()
    config = repository.preprocessing()
    if not factory:  # refuse impossible settings before hours of embedding, on the expected vector count
        choose(index, len(items) * (1 + len(config.catalog_views)), manifest.dim, **(index_options or {}))
    good, vectors, embed_problems = embed_items(
        client, items, batch_size=batch_size, concurrency=concurrency, progress=progress,
        max_bytes=limits.max_bytes, config=config, limits=limits,
    )
    problems += embed_problems
    if not good:
        raise EmptyCatalogError(problems)
    rows = sum(len(block) for block in vectors)
    if factory:
        choice = IndexChoice("custom", factory, "FAISS factory string given")
    else:
        choice = choose(index, rows, manifest.dim, **(index_options or {}))
    built = build_index(good, vectors, manifest, choice=choice)
    version = publish_index(repository, built, client, keep_versions=keep_versions)
    return IndexReport(version, len(built), problems, time.perf_counter() - started, choice, rows, len(good))


def build_index(items: Sequence[CatalogItem], vectors: Sequence[np.ndarray], manifest: EmbedderManifest, *,
                choice: IndexChoice | None = None) -> ProductIndex:
    """The index of `items` (catalog rows), each with its vectors (packshot, then catalog views), for
    the embedder of `manifest`, of the kind `choice` (default: flat). Rows of one product id become one
    product whose vectors are all its images' (it scores its best vector), in the order the ids first
    appear; its image for display is its first row's."""
    choice = choice or IndexChoice("flat", "Flat", "default")
    dim = manifest.dim
    for block in vectors:
        if block.shape[1] != dim:
            raise RuntimeError(f"server returned {block.shape[1]}-d embeddings, the embedder manifest says {dim}")
    blocks: dict[str, list[np.ndarray]] = {}
    products: dict[str, Product] = {}
    for item, block in zip(items, vectors):
        products.setdefault(item.product_id, Product(item.product_id, item.category, str(item.image)))
        blocks.setdefault(item.product_id, []).append(block)
    grouped = [np.concatenate(blocks[pid]) for pid in products]
    return ProductIndex.build(
        list(products.values()),
        np.concatenate(grouped) if grouped else np.zeros((0, dim), np.float32),
        dim=dim,
        factory=choice.factory,
        embedder_fingerprint=manifest.fingerprint,
        vectors=[len(block) for block in grouped],
        search=choice.search,
    )
