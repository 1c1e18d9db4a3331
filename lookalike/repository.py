"""The Triton model repository on disk: where each artefact lives, the embedder's manifest and configs,
and the index versions of `product_search`.

    model_repository/
      preprocess/      config.pbtxt, 1/model.py                       (committed)
      embedder/        1/model.py                                      (committed)
                       1/model.onnx, preprocessing.json, manifest.json,
                       config.pbtxt, configs/onnxruntime.pbtxt         (written by `lookalike export`)
      product_search/  config.pbtxt, model.py                          (committed)
                       <N>/model.py + index files                      (written by `lookalike index`)
      embed_image/, visual_search/                                     (committed ensembles)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lookalike_client import contract as c

from .preprocessing import ImageLimits, PreprocessConfig

PREPROCESSING_FILE = "preprocessing.json"
MANIFEST_FILE = "manifest.json"
ONNX_FILE = "model.onnx"
PLAN_FILE = "model.plan"
# Serving variants of the embedder, chosen at serve time with tritonserver's --model-config-name.
# "python" is config.pbtxt itself: ONNX Runtime inside a Python-backend model, for the tritonserver of
# the nvidia-pytriton wheel, which has no other backend.
EMBEDDER_VARIANTS = ("python", "onnxruntime", "tensorrt")
# Inside product_search/: index versions being written, and versions set aside as unservable.
STAGING_PREFIX = ".staging-"
STAGING_OWNER_FILE = ".owner.json"
REJECTED_DIR = ".rejected"


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

    def manifest(self) -> dict[str, Any]:
        if not self.manifest_file.exists():
            raise FileNotFoundError(
                f"no embedder in {self.embedder_dir} (missing {MANIFEST_FILE}): run `lookalike export` first"
            )
        return json.loads(self.manifest_file.read_text())

    def preprocessing(self) -> PreprocessConfig:
        return PreprocessConfig.load(self.preprocessing_file)

    def image_limits(self) -> ImageLimits:
        """The upload limits that `preprocess` enforces, from its config.pbtxt parameters."""
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2

        path = self.root / c.PREPROCESS_MODEL / "config.pbtxt"
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        params = {key: value.string_value for key, value in config.parameters.items()}
        return ImageLimits.from_parameters(params)

    # -- product_search versions -----------------------------------------------------------------
    @property
    def rejected_dir(self) -> Path:
        """Where index versions that cannot be served are set aside (`lookalike.publishing`); Triton
        ignores it, as it ignores every non-numeric directory."""
        return self.search_dir / REJECTED_DIR

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

    def _next_version(self) -> int:
        """One more than any version ever written here, set-aside ones included, so that a number
        never names two different indexes."""
        used = self.index_versions()
        if self.rejected_dir.is_dir():
            used += [int(p.name.split("-")[0]) for p in self.rejected_dir.iterdir() if p.name.split("-")[0].isdigit()]
        return max(used, default=0) + 1

    def write_index_version(self, save: "Any") -> int:
        """Creates the next version directory of `product_search` atomically: `save(path)` writes the
        index into a staging directory, the model code is copied beside it, and one rename publishes
        it, so Triton never sees a half-written version. Returns the new version number. The staging
        directory names its owner (host, pid), so that one left by a killed writer can be told from
        one being written (`lookalike.publishing.clean_stale_staging`)."""
        version = self._next_version()
        staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{version}-", dir=self.search_dir))
        owner = staging / STAGING_OWNER_FILE
        try:
            owner.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}))
            save(staging)
            shutil.copy2(self.search_dir / "model.py", staging / "model.py")
            owner.unlink()
            os.chmod(staging, 0o755)
            os.rename(staging, self.search_dir / str(version))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return version

    def prune_index_versions(self, keep: int = 2) -> list[int]:
        """Deletes all but the newest `keep` index versions (Triton serves only the newest)."""
        versions = self.index_versions()
        removed = versions[:-keep] if keep > 0 else versions
        for version in removed:
            shutil.rmtree(self.search_dir / str(version), ignore_errors=True)
        return removed


def copy_repository(source: Path, target: Path, *, with_indexes: bool = False) -> Repository:
    """A copy of a model repository (for tests and benchmarks), by default without index versions."""

    def ignore(directory: str, names: list[str]) -> set[str]:
        skipped = {n for n in names if n == "__pycache__" or n == REJECTED_DIR or n.startswith((STAGING_PREFIX, ".export-"))}
        if not with_indexes and Path(directory).name == c.SEARCH_MODEL:
            skipped |= {n for n in names if n.isdigit()}
        return skipped

    shutil.copytree(source, target, ignore=ignore)
    return Repository(target)


def fingerprint(embedder_dir: Path, model_file: str = ONNX_FILE) -> str:
    """Identifies an embedding space: the model bytes plus the preprocessing that feeds them. An index
    built under one fingerprint is meaningless under another."""
    digest = hashlib.sha256()
    with open(embedder_dir / "1" / model_file, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    preprocessing = json.loads((embedder_dir / PREPROCESSING_FILE).read_text())
    preprocessing.pop("notes", None)
    digest.update(json.dumps(preprocessing, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def _dims(values: Any) -> str:
    return "[ " + ", ".join(str(int(v)) for v in values) + " ]"


def render_embedder_config(variant: str, *, height: int, width: int, dim: int, max_batch_size: int,
                           instances: int = 1, intra_op_threads: int = 0) -> str:
    """config.pbtxt text of the embedder for one serving variant. The tensors are the same in all."""
    if variant not in EMBEDDER_VARIANTS:
        raise ValueError(f"variant must be one of {EMBEDDER_VARIANTS}")
    preferred = [b for b in (4, 8, 16, 32, 64) if b <= max_batch_size]
    lines = [f'name: "{c.EMBEDDER_MODEL}"']
    if variant == "python":
        lines.append('backend: "python"')
    elif variant == "onnxruntime":
        lines += ['backend: "onnxruntime"', f'default_model_filename: "{ONNX_FILE}"']
    else:
        lines += ['platform: "tensorrt_plan"', f'default_model_filename: "{PLAN_FILE}"']
    lines += [
        f"max_batch_size: {max_batch_size}",
        f'input [ {{ name: "{c.PIXELS}" data_type: TYPE_FP32 dims: {_dims((3, height, width))} }} ]',
        f'output [ {{ name: "{c.EMBEDDING}" data_type: TYPE_FP32 dims: {_dims((dim,))} }} ]',
        "dynamic_batching {",
        f"  preferred_batch_size: {_dims(preferred)}",
        "  max_queue_delay_microseconds: 2000",
        "}",
    ]
    if variant == "python":
        # One process per instance (GIL); ONNX Runtime threads inside it. 0 = ORT's default (all cores).
        lines += [
            f"instance_group [ {{ kind: KIND_CPU count: {instances} }} ]",
            f'parameters {{ key: "onnx_file" value {{ string_value: "{ONNX_FILE}" }} }}',
            f'parameters {{ key: "intra_op_threads" value {{ string_value: "{intra_op_threads}" }} }}',
        ]
    elif variant == "onnxruntime":
        # No instance kind: one instance per visible GPU, or on the CPU where there is none.
        lines += [f"instance_group [ {{ count: {instances} }} ]"]
    else:
        lines += [f"instance_group [ {{ kind: KIND_GPU count: {instances} }} ]"]
    return "\n".join(lines) + "\n"


def write_embedder_configs(embedder_dir: Path, *, height: int, width: int, dim: int, max_batch_size: int,
                           tensorrt: bool = False) -> None:
    """config.pbtxt (Python + ONNX Runtime) and configs/<variant>.pbtxt for the other backends; the
    tensorrt variant only when a model.plan was built for it."""
    (embedder_dir / "configs").mkdir(parents=True, exist_ok=True)
    common = dict(height=height, width=width, dim=dim, max_batch_size=max_batch_size)
    (embedder_dir / "config.pbtxt").write_text(render_embedder_config("python", **common))
    (embedder_dir / "configs" / "onnxruntime.pbtxt").write_text(render_embedder_config("onnxruntime", **common))
    plan_config = embedder_dir / "configs" / "tensorrt.pbtxt"
    if tensorrt:
        plan_config.write_text(render_embedder_config("tensorrt", **common))
    elif plan_config.exists():
        plan_config.unlink()  # a new ONNX export makes an older engine stale
