"""An index version on disk: a directory written once and never modified (file names and metadata schema
in `lookalike.serving.artifacts`): index.faiss (faiss.write_index), products.json (ids, categories, image
paths and how many vectors each product has, in FAISS order: a product's vectors are consecutive, its
packshot, then its catalog views), the category sub-indexes of a graph index, vectors.npy (the catalog
embeddings, memory-mapped when read) and index.json (`IndexMeta`, written last, vouching for the others).

`check_index_dir` refuses a damaged directory with a reason before FAISS parses any of it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from lookalike.serving.artifacts import INDEX_FILE, META_FILE, PRODUCTS_FILE, VECTORS_FILE, ArtifactError, IndexMeta, file_digest


class CorruptIndexError(ValueError):
    """An index directory that cannot be served: a missing, truncated or altered file."""


@dataclass(frozen=True)
class Product:
    product_id: str
    category: str = ""
    image: str = ""  # the product's first image, for display
    # Where its vectors came from, one entry per image in FAISS order: (image path, sha256 of the file,
    # vectors of that image). The embedding store of incremental updates (`lookalike.indexing.indexer`).
    sources: tuple[tuple[str, str, int], ...] = ()


@dataclass
class IndexFiles:
    """What an index directory holds, read or to be written: the (CPU) FAISS index, the products and
    their vector counts, the category sub-indexes by name, the stored embeddings and the metadata."""

    index: faiss.Index
    products: list[Product]
    vectors: list[int]
    meta: IndexMeta
    subindexes: dict[str, faiss.Index]
    stored: np.ndarray | None = None


def write_index_dir(directory: str | Path, files: IndexFiles) -> None:
    """Writes every file, then index.json sealing their sizes and hashes."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    faiss.write_index(files.index, str(directory / INDEX_FILE))
    products: dict[str, Any] = {
        "product_id": [p.product_id for p in files.products],
        "category": [p.category for p in files.products],
        "image": [p.image for p in files.products],
        "vectors": [int(v) for v in files.vectors],
    }
    if all(p.sources for p in files.products):
        products["sources"] = [[list(s) for s in p.sources] for p in files.products]
    (directory / PRODUCTS_FILE).write_text(json.dumps(products))
    names = [INDEX_FILE, PRODUCTS_FILE]
    for category, name in files.meta.subindexes.items():
        faiss.write_index(files.subindexes[category], str(directory / name))
        names.append(name)
    if files.stored is not None:
        np.save(directory / VECTORS_FILE, np.asarray(files.stored, dtype=np.float32))
        names.append(VECTORS_FILE)
    files.meta.sealed(directory, tuple(names)).save(directory)


def read_index_dir(directory: str | Path) -> IndexFiles:
    """Reads an index directory after `check_index_dir`, so a damaged file is refused with a reason
    before FAISS parses it. The stored embeddings are memory-mapped, not read."""
    directory = Path(directory)
    meta = check_index_dir(directory)
    products, vectors = _load_columns(directory)
    try:
        index = faiss.read_index(str(directory / INDEX_FILE))
    except RuntimeError as exc:
        raise CorruptIndexError(f"{INDEX_FILE}: FAISS cannot read it: {str(exc).splitlines()[0]}") from None
    stored = None
    if (directory / VECTORS_FILE).is_file():
        try:
            stored = np.load(directory / VECTORS_FILE, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise CorruptIndexError(f"{VECTORS_FILE}: {exc}") from None
    subindexes = {}
    for category, name in meta.subindexes.items():
        try:
            subindexes[category] = faiss.read_index(str(directory / name))
        except RuntimeError as exc:
            raise CorruptIndexError(f"{name}: FAISS cannot read it: {str(exc).splitlines()[0]}") from None
    return IndexFiles(index, products, vectors, meta, subindexes, stored)


def load_products(directory: str | Path) -> list[Product]:
    """The products of an index directory, in FAISS order, without loading the index."""
    return _load_columns(directory)[0]


def _load_columns(directory: str | Path) -> tuple[list[Product], list[int]]:
    try:
        columns = json.loads((Path(directory) / PRODUCTS_FILE).read_text())
        ids, categories, images = columns["product_id"], columns["category"], columns["image"]
        vectors = columns.get("vectors", [1] * len(ids))  # indexes from before catalog views: one each
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptIndexError(f"{PRODUCTS_FILE}: {type(exc).__name__}: {exc}") from None
    if not len(ids) == len(categories) == len(images) == len(vectors) or not all(isinstance(i, str) and i for i in ids):
        raise CorruptIndexError(f"{PRODUCTS_FILE}: columns of different lengths or an empty/non-string id")
    if not all(isinstance(v, int) and v >= 1 for v in vectors):
        raise CorruptIndexError(f"{PRODUCTS_FILE}: vector counts must be integers >= 1")
    sources = columns.get("sources") or [[] for _ in ids]  # versions before incremental updates have none
    try:
        sources = [tuple((str(path), str(sha), int(n)) for path, sha, n in entries) for entries in sources]
    except (TypeError, ValueError) as exc:
        raise CorruptIndexError(f"{PRODUCTS_FILE}: 'sources' must list [image, sha256, vectors] per image: {exc}") from None
    if len(sources) != len(ids) or any(entries and sum(n for _, _, n in entries) != v for entries, v in zip(sources, vectors)):
        raise CorruptIndexError(f"{PRODUCTS_FILE}: 'sources' disagree with the vector counts")
    return [Product(pid, cat, img, src) for pid, cat, img, src in zip(ids, categories, images, sources)], vectors


def check_index_dir(directory: str | Path) -> IndexMeta:
    """Returns the metadata of an index directory whose files are whole and unaltered; raises
    CorruptIndexError naming the first problem. The sizes and hashes come from index.json (indexes
    written before they were recorded are checked when FAISS and JSON parse them in `load`)."""
    directory = Path(directory)
    try:
        meta = IndexMeta.load(directory)
    except ArtifactError as exc:
        raise CorruptIndexError(str(exc).replace(f" ({directory / META_FILE})", "")) from None
    recorded_names: list[str] = [str(name) for name in (meta.files or {})]
    for name in dict.fromkeys([INDEX_FILE, PRODUCTS_FILE, *recorded_names]):
        path = directory / name
        if not path.is_file():
            raise CorruptIndexError(f"no {name}")
        recorded = (meta.files or {}).get(name)
        if recorded is None:
            continue
        size, want = path.stat().st_size, recorded.get("bytes")
        if size != want:
            raise CorruptIndexError(f"{name}: {size:,} bytes, but {META_FILE} recorded "
                                    + (f"{want:,}" if isinstance(want, int) else repr(want)))
        if file_digest(path)["sha256"] != recorded.get("sha256"):
            raise CorruptIndexError(f"{name}: its content changed since it was written (sha256 mismatch)")
    return meta


