"""The Triton model repository on disk: where each model and artefact lives, and which index versions
of `product_search` exist. Layout only: the artefacts' schemas are in `lookalike.serving.artifacts`, the
embedder's generated configs in `lookalike.indexing.model_configs`, writing and choosing index versions in
`lookalike.indexing.publishing`.

    model_repository/
      preprocess/, preprocess_query/  config.pbtxt, 1/model.py              (committed)
      embedder/        1/model.py                                           (committed)
                       1/model.onnx, preprocessing.json, manifest.json,
                       config.pbtxt, configs/<variant>.pbtxt                (written by `lookalike export`)
      product_search/  config.pbtxt, model.py                               (committed)
                       <N>/model.py + index files                           (written by `lookalike index`)
                       .staging-*/, .rejected/                              (being written, set aside)
                       .serving/<host>-<pid>.json       (which version each `lookalike serve` serves)
      embed_image/, visual_search/                                          (committed ensembles)
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from lookalike.indexing import model_configs
from lookalike.serving.artifacts import MANIFEST_FILE, PREPROCESSING_FILE, ArtifactError, EmbedderManifest, onnx_path, plan_path
from lookalike.serving.preprocessing import ImageLimits, PreprocessConfig
from lookalike_client import contract as c

# Inside product_search/: index versions being written, and versions set aside as unservable.
STAGING_PREFIX = ".staging-"
STAGING_OWNER_FILE = ".owner.json"
REJECTED_DIR = ".rejected"
KEEP_VERSIONS = 2  # index versions (faiss) or generations (Milvus) `lookalike index` keeps by default
# Inside product_search/: one record per running `lookalike serve` of the version it serves (`publishing`).
SERVING_DIR = ".serving"


def default_repository() -> Path:
    """$LOOKALIKE_MODEL_REPOSITORY, else ./model_repository."""
    return Path(os.environ.get("LOOKALIKE_MODEL_REPOSITORY", "model_repository"))


@dataclass(frozen=True)
class Repository:
    root: Path

    @property
    def embedder_dir(self) -> Path:
        return self.root / c.EMBEDDER_MODEL

    @property
    def search_dir(self) -> Path:
        return self.root / c.SEARCH_MODEL

    @property
    def preprocessing_file(self) -> Path:
        return self.embedder_dir / PREPROCESSING_FILE

    @property
    def manifest_file(self) -> Path:
        return self.embedder_dir / MANIFEST_FILE

    @property
    def onnx_file(self) -> Path:
        return onnx_path(self.embedder_dir)

    @property
    def plan_file(self) -> Path:
        return plan_path(self.embedder_dir)

    def manifest(self) -> EmbedderManifest:
        if not self.manifest_file.exists():
            raise FileNotFoundError(
                f"no embedder in {self.embedder_dir} (missing {MANIFEST_FILE}): run `lookalike export` first"
            )
        try:
            return EmbedderManifest.load(self.manifest_file)
        except ArtifactError as exc:
            raise ArtifactError(f"{exc}: run `lookalike export` again") from None

    def preprocessing(self) -> PreprocessConfig:
        return PreprocessConfig.load(self.preprocessing_file)

    def image_limits(self) -> ImageLimits:
        """The upload limits that `preprocess` enforces, from its config.pbtxt parameters."""
        config = model_configs.read(self.root / c.PREPROCESS_MODEL / model_configs.CONFIG_FILE)
        return ImageLimits.from_parameters(model_configs.parameters(config))

    # -- product_search versions -----------------------------------------------------------------
    @property
    def rejected_dir(self) -> Path:
        """Where index versions that cannot be served are set aside (`lookalike.indexing.publishing`); Triton
        ignores it, as it ignores every non-numeric directory."""
        return self.search_dir / REJECTED_DIR

    @property
    def serving_dir(self) -> Path:
        return self.search_dir / SERVING_DIR

    def models(self) -> list[str]:
        """The models of the repository: its folders with a config.pbtxt."""
        return sorted(p.parent.name for p in self.root.glob(f"*/{model_configs.CONFIG_FILE}"))

    def ensembles_using(self, model: str) -> list[str]:
        """The ensembles that have `model` as a step (tritonserver reloads a step from its config on disk
        when such an ensemble is loaded plainly)."""
        users = []
        for name in self.models():
            config = model_configs.read(self.root / name / model_configs.CONFIG_FILE)
            if any(step.model_name == model for step in config.ensemble_scheduling.step):
                users.append(name)
        return users

    def writable(self) -> bool:
        """Whether this process may write into product_search/: False on a volume mounted read-only (as the
        index volume is in the Kubernetes pods) as for missing permissions. A write can still fail where
        this says True (a server-side read-only export): `publishing.ensure_servable_index` checks both."""
        return os.access(self.search_dir, os.W_OK)

    def index_versions(self) -> list[int]:
        if not self.search_dir.is_dir():
            return []
        return sorted(int(p.name) for p in self.search_dir.iterdir() if p.is_dir() and p.name.isdigit())

    def latest_index_dir(self) -> Path | None:
        versions = self.index_versions()
        return self.search_dir / str(versions[-1]) if versions else None

    def staging_dirs(self) -> list[Path]:
        if not self.search_dir.is_dir():
            return []
        return sorted(p for p in self.search_dir.iterdir() if p.is_dir() and p.name.startswith(STAGING_PREFIX))


def copy_repository(source: Path, target: Path, *, with_indexes: bool = False) -> Repository:
    """A copy of a model repository (for tests and benchmarks), by default without index versions."""

    def ignore(directory: str, names: list[str]) -> set[str]:
        skipped = {n for n in names if n in ("__pycache__", REJECTED_DIR, SERVING_DIR)
                   or n.startswith((STAGING_PREFIX, ".export-", ".engine-"))}
        if not with_indexes and Path(directory).name == c.SEARCH_MODEL:
            skipped |= {n for n in names if n.isdigit()}
        return skipped

    shutil.copytree(source, target, ignore=ignore)
    return Repository(target)
