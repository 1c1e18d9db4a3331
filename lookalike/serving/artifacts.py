"""The files that `lookalike export` and `lookalike index` write, with their schemas: one place for their
names and their fields, read and written only through the classes here.

    embedder/
      1/model.onnx          the exported embedder (1/model.plan: its TensorRT engine)
      preprocessing.json    `lookalike.serving.preprocessing.PreprocessConfig`
      manifest.json         `EmbedderManifest`: what was exported, how, and the fingerprint
    product_search/<N>/
      index.faiss           the FAISS index
      products.json         ids, categories, images, vectors per product (`lookalike.serving.search`)
      index.json            `IndexMeta`: dim, count, factory, fingerprint, and the sizes and hashes of
                            the two files above (written last, so it vouches for them)

Loading validates: a file that is missing, unreadable or not of its schema raises `ArtifactError`
(a ValueError) naming the file and the field, before anything uses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# -- file names --------------------------------------------------------------------------------------
EMBEDDER_VERSION = "1"  # the embedder's only version directory
ONNX_FILE = "model.onnx"
PLAN_FILE = "model.plan"
PREPROCESSING_FILE = "preprocessing.json"
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.faiss"
PRODUCTS_FILE = "products.json"
VECTORS_FILE = "vectors.npy"  # the catalog embeddings, float32 [vectors, dim], in FAISS order
META_FILE = "index.json"


class ArtifactError(ValueError):
    """An artefact file that is missing, unreadable or not of its schema."""


def onnx_path(embedder_dir: Path) -> Path:
    return Path(embedder_dir) / EMBEDDER_VERSION / ONNX_FILE


def plan_path(embedder_dir: Path) -> Path:
    return Path(embedder_dir) / EMBEDDER_VERSION / PLAN_FILE


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def file_digest(path: Path) -> dict[str, Any]:
    """{"bytes": size, "sha256": hex digest} of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return {"bytes": Path(path).stat().st_size, "sha256": digest.hexdigest()}


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from `path`; ArtifactError naming `what` when it is missing or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ArtifactError(f"no {what} ({path})") from None
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{what} ({path}): {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{what} ({path}): not a JSON object")
    return data


def _check(data: dict[str, Any], what: str, name: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
    value = data.get(name)
    if value is None and optional:
        return None
    # bool is an int in Python: an int field must not take True.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ArtifactError(f"{what}: field {name!r} must be {expected}, got {value!r}")
    return value


def _write_json(path: Path, data: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


# -- embedder ----------------------------------------------------------------------------------------
def fingerprint(embedder_dir: Path) -> str:
    """Identifies an embedding space: the ONNX model's bytes plus the preprocessing that feeds them
    (its notes aside). An index built under one fingerprint is meaningless under another. The query
    views and their fusion (`query_views`, `query_fusion`) change only how a query is searched, never
    a catalog vector: they are left out, so that changing them needs no re-index. The `query` keys stay
    in: the catalog view `as_query` embeds each packshot framed by them."""
    digest = hashlib.sha256()
    with open(onnx_path(embedder_dir), "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    preprocessing = read_json(Path(embedder_dir) / PREPROCESSING_FILE, PREPROCESSING_FILE)
    for key in ("notes", "query_views", "query_fusion"):
        preprocessing.pop(key, None)
    digest.update(json.dumps(preprocessing, sort_keys=True).encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class EmbedderManifest:
    """embedder/manifest.json: what `lookalike export` wrote. Written last, after the checks passed."""

    model: str  # backbone name (lookalike_export.backbones)
    dim: int  # embedding width
    input: tuple[int, int, int]  # [3, H, W] of PIXELS
    fingerprint: str  # see `fingerprint`
    random_weights: bool = False  # exported for tests: results are meaningless
    pooling: str = ""
    format: str = "onnx"
    weights: str = ""
    weights_source: str = ""
    max_batch_size: int = 64
    opset: int = 0
    parity_onnx_vs_torch: dict[str, Any] = field(default_factory=dict)
    tensorrt_engine: dict[str, Any] | None = None  # what export/engine.py recorded, when an engine was built
    quantization: dict[str, Any] | None = None  # export/quantize.py's report, when model.onnx is Q/DQ INT8
    export_seconds: float = 0.0
    exported: str = ""
    versions: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        what = MANIFEST_FILE
        if not self.model:
            raise ArtifactError(f"{what}: no model name")
        if not (isinstance(self.dim, int) and self.dim > 0):
            raise ArtifactError(f"{what}: dim must be a positive integer, got {self.dim!r}")
        if len(self.input) != 3 or self.input[0] != 3 or min(self.input) < 1:
            raise ArtifactError(f"{what}: input must be [3, H, W], got {list(self.input)}")
        if not self.fingerprint:
            raise ArtifactError(f"{what}: no fingerprint")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EmbedderManifest":
        what = MANIFEST_FILE
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        _check(data, what, "model", str)
        _check(data, what, "dim", int)
        _check(data, what, "fingerprint", str)
        shape = _check(data, what, "input", list)
        if not all(isinstance(v, int) for v in shape):
            raise ArtifactError(f"{what}: input must be [3, H, W] integers, got {shape!r}")
        values["input"] = tuple(shape)
        _check(data, what, "random_weights", bool, optional=True)
        _check(data, what, "tensorrt_engine", dict, optional=True)
        _check(data, what, "quantization", dict, optional=True)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["input"] = list(self.input)
        return data

    @classmethod
    def load(cls, path: Path) -> "EmbedderManifest":
        return cls.from_dict(read_json(path, MANIFEST_FILE))

    def save(self, path: Path) -> None:
        _write_json(path, self.to_dict())


# -- index -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IndexMeta:
    """product_search/<N>/index.json. `files` (name -> {"bytes", "sha256"}) is filled by `sealed`, when
    the other files of the version are written; versions written before it existed have none."""

    dim: int
    count: int  # products
    vectors: int  # FAISS rows (a product may have several: its packshot, then its catalog views)
    factory: str = "Flat"
    metric: str = "inner_product"
    embedder_fingerprint: str = ""
    created: str = ""
    files: dict[str, dict[str, Any]] | None = None
    # Search-time defaults of this version ({"efSearch": n} for HNSW, {"nprobe": n} for IVF); the
    # product_search config parameters override them.
    search: dict[str, int] = field(default_factory=dict)
    # Per-category sub-indexes of a graph index (category -> file name in the version directory), for
    # filtered search (`lookalike.serving.search`).
    subindexes: dict[str, str] = field(default_factory=dict)
    # A random id given when the index is built: which index a server serves, beyond its version number
    # (another model repository may have a version of the same number). "" for older versions.
    index_id: str = ""

    @classmethod
    def new(cls, *, dim: int, count: int, vectors: int, factory: str, embedder_fingerprint: str,
            search: dict[str, int] | None = None, subindexes: dict[str, str] | None = None) -> "IndexMeta":
        return cls(dim=dim, count=count, vectors=vectors, factory=factory,
                   embedder_fingerprint=embedder_fingerprint, created=utc_now(), search=dict(search or {}),
                   subindexes=dict(subindexes or {}), index_id=uuid.uuid4().hex)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "IndexMeta":
        what = META_FILE
        dim, count = _check(data, what, "dim", int), _check(data, what, "count", int)
        files = _check(data, what, "files", dict, optional=True)
        if files is not None and not all(isinstance(v, dict) for v in files.values()):
            raise ArtifactError(f"{what}: 'files' is not a table of files")
        search = _check(data, what, "search", dict, optional=True) or {}
        if not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v > 0 for k, v in search.items()):
            raise ArtifactError(f"{what}: 'search' must map parameter names to positive integers, got {search!r}")
        subindexes = _check(data, what, "subindexes", dict, optional=True) or {}
        if not all(isinstance(k, str) and isinstance(v, str) and v and "/" not in v and not v.startswith(".")
                   for k, v in subindexes.items()):
            raise ArtifactError(f"{what}: 'subindexes' must map categories to file names in the version directory")
        return cls(
            dim=dim, count=count, vectors=int(data.get("vectors", count)), factory=str(data.get("factory", "Flat")),
            metric=str(data.get("metric", "inner_product")),
            embedder_fingerprint=str(data.get("embedder_fingerprint") or ""), created=str(data.get("created", "")),
            files=files, search=dict(search), subindexes=dict(subindexes),
            index_id=str(data.get("index_id") or ""),
        )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.files is None:
            del data["files"]
        return data

    def sealed(self, directory: Path, names: tuple[str, ...] = (INDEX_FILE, PRODUCTS_FILE)) -> "IndexMeta":
        """This metadata with the sizes and hashes of `names` in `directory`."""
        return dataclasses.replace(self, files={name: file_digest(Path(directory) / name) for name in names})

    @classmethod
    def load(cls, directory: Path) -> "IndexMeta":
        return cls.from_dict(read_json(Path(directory) / META_FILE, META_FILE))

    def save(self, directory: Path) -> None:
        _write_json(Path(directory) / META_FILE, self.to_dict())
