"""The embedder's TensorRT engine, built from the exact `model.onnx` the host exported (`lookalike engine`,
`make engine`), or from the ONNX an export has just checked (`lookalike export --format tensorrt`).

`model.onnx` and `preprocessing.json` are read, never written, so the embedder's fingerprint (and every
index built under it) survives the engine build. The network TensorRT parses is strongly typed:
- fp32: `model.onnx` itself (TF32 off unless asked);
- fp16: its FP16-typed copy (`fp16.py`), made in a staging folder and checked in ONNX Runtime first;
- int8: `model.onnx` itself, which must then be the Q/DQ export (`lookalike export --precision int8`).
The engine is gated against ONNX Runtime on `model.onnx` (the FP32 file for fp32 and fp16, the Q/DQ
file for int8) at batch 1, opt and max. Passed: `1/model.plan`, `configs/tensorrt.pbtxt` and the
manifest's `tensorrt_engine` are written; failed: nothing is. The timing cache stays in the embedder's
`tensorrt-cache/`, where the next build finds it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from lookalike.indexing.model_configs import write_embedder_configs
from lookalike.indexing.repository import Repository
from lookalike.serving.artifacts import PLAN_FILE, ArtifactError, EmbedderManifest, file_digest, fingerprint
from lookalike.serving.preprocessing import Preprocessor

from .parity import MIN_COSINE

ENGINE_PRECISIONS = tuple(MIN_COSINE)  # fp32, fp16, int8: each with its gate
TENSORRT_CACHE_DIR = "tensorrt-cache"  # the embedder dir's timing caches, kept between builds
OPT_BATCH_SIZE = 16
STAGING_PREFIX = ".engine-"  # in the embedder dir (same file system: the plan is moved, not copied)


class EngineError(RuntimeError):
    pass


def engine_precision(manifest: EmbedderManifest, requested: str | None) -> str:
    """The precision to build: `requested`, or int8 for a Q/DQ `model.onnx` and fp16 otherwise."""
    quantized = manifest.quantization is not None
    if requested is None:
        return "int8" if quantized else "fp16"
    if requested not in ENGINE_PRECISIONS:
        raise EngineError(f"precision must be one of {ENGINE_PRECISIONS}, got {requested!r}")
    if requested == "int8" and not quantized:
        raise EngineError("an INT8 engine is built from a Q/DQ model.onnx, and this one is FP32: on the host, run "
                          "lookalike export --precision int8 --calibration CATALOG (and index again), then build")
    if requested != "int8" and quantized:
        raise EngineError(f"model.onnx is the Q/DQ INT8 export, whose engine is int8 (the file states its "
                          f"precisions): build --precision int8, or export FP32 again for a {requested} engine")
    return requested


def decodable_pixels(preprocessor: Preprocessor, images: Sequence[bytes]) -> np.ndarray:
    """The pixels of the images that decode (a catalog may hold a few that do not, or are too large)."""
    from lookalike.serving.preprocessing import ImageError

    out = []
    for data in images:
        try:
            out.append(preprocessor(data))
        except ImageError:
            continue
    return np.stack(out) if out else np.zeros((0, *preprocessor.output_shape), np.float32)


def profile_batches(pixels: np.ndarray, opt: int, max_batch_size: int) -> list[np.ndarray]:
    """The gate's inputs at the profile's batch sizes 1, opt and max (the images repeated to fill)."""
    sizes = sorted({1, max(1, min(opt, max_batch_size)), max_batch_size})
    return [np.resize(pixels, (size, *pixels.shape[1:])).astype(np.float32) for size in sizes]


def build_gated_engine(onnx_path: Path, staging: Path, pixels: np.ndarray, precision: str, *, height: int,
                       width: int, max_batch_size: int, cache_dir: Path, allow_tf32: bool = False,
                       opt_batch_size: int = OPT_BATCH_SIZE, what: str = "the embedder") -> dict[str, Any]:
    """Writes `staging/model.plan` for `onnx_path` once it passed its gate; returns what the manifest
    records. Needs TensorRT 10 and a CUDA GPU (NGC's TensorRT image: `make engine`)."""
    try:
        from . import tensorrt_build
    except ImportError as exc:
        raise EngineError(f"a TensorRT engine needs TensorRT ({exc}): build it in NGC's TensorRT image on the "
                          "GPU that serves it: make engine") from None
    if not tensorrt_build.cuda_available():
        raise EngineError("a TensorRT engine needs a CUDA GPU")
    from lookalike.serving.embedding import OnnxEmbedder

    network_onnx, network = onnx_path, {"format": "onnx-qdq" if precision == "int8" else "onnx"}
    if precision == "fp16":
        from .fp16 import Fp16Error, check_fp16, convert_fp16

        network_onnx = staging / "model.fp16.onnx"
        try:
            network = convert_fp16(onnx_path, network_onnx)
            network["parity_vs_fp32"] = check_fp16(onnx_path, network_onnx, pixels, what)
        except Fp16Error as exc:
            raise EngineError(str(exc)) from None
    plan_path = staging / PLAN_FILE
    try:
        engine = tensorrt_build.build_engine(
            network_onnx, plan_path, height=height, width=width, precision=precision,
            max_batch_size=max_batch_size, cache_dir=cache_dir, opt_batch_size=opt_batch_size, allow_tf32=allow_tf32)
        reference = OnnxEmbedder(onnx_path, providers=["CPUExecutionProvider"])
        gates = {}
        for batch in profile_batches(pixels, engine["profile"]["opt"], max_batch_size):
            gates[str(len(batch))] = tensorrt_build.cosine_gate(
                reference(batch), tensorrt_build.run_engine(plan_path, batch), precision, f" at batch {len(batch)}")
    except tensorrt_build.EngineBuildError as exc:
        raise EngineError(str(exc)) from None
    engine["parity_vs_onnx"] = min(gates.values(), key=lambda g: g["mean_cosine"])
    engine["parity_by_batch"] = gates
    engine["network_onnx"] = network
    engine["built_from"] = {"file": onnx_path.name, **file_digest(onnx_path)}
    return engine


def build_repository_engine(
    repository: Path,
    images: Sequence[bytes],
    precision: str | None = None,
    *,
    allow_tf32: bool = False,
    opt_batch_size: int = OPT_BATCH_SIZE,
    build: Callable[..., dict[str, Any]] = build_gated_engine,
    log: Callable[[str], None] = print,
) -> EmbedderManifest:
    """Builds the engine of the embedder already exported into `repository` (see the module docstring);
    returns the updated manifest. `images` (encoded photos) feed the gates. `build` is the step that
    needs TensorRT; everything around it (which file, which precision, what is published) is here."""
    repo = Repository(Path(repository))
    try:
        manifest = repo.manifest()
    except (ArtifactError, OSError) as exc:
        raise EngineError(f"no exported embedder in {repo.embedder_dir} ({exc}): run lookalike export first") from None
    exported = fingerprint(repo.embedder_dir)
    if exported != manifest.fingerprint:
        raise EngineError(f"{repo.onnx_file} or its preprocessing changed since it was exported (fingerprint "
                          f"{exported}, the manifest says {manifest.fingerprint}): run lookalike export again")
    precision = engine_precision(manifest, precision)
    pre = repo.preprocessing()
    pixels = decodable_pixels(Preprocessor(pre), images)
    if not len(pixels):
        raise EngineError(f"the engine's gate needs images, and none of the {len(images)} given decodes")
    for stale in repo.embedder_dir.glob(f"{STAGING_PREFIX}*"):  # left by a build that was killed
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=repo.embedder_dir))
    try:
        log(f"building the {precision} TensorRT engine from {repo.onnx_file} (fingerprint {manifest.fingerprint})")
        record = build(repo.onnx_file, staging, pixels, precision, height=pre.height, width=pre.width,
                       max_batch_size=manifest.max_batch_size, cache_dir=repo.embedder_dir / TENSORRT_CACHE_DIR,
                       allow_tf32=allow_tf32, opt_batch_size=opt_batch_size, what=manifest.model)
        os.replace(staging / PLAN_FILE, repo.plan_file)
        write_embedder_configs(repo.embedder_dir, height=pre.height, width=pre.width, dim=manifest.dim,
                               max_batch_size=manifest.max_batch_size, tensorrt=True)
        updated = dataclasses.replace(manifest, tensorrt_engine=record)
        if fingerprint(repo.embedder_dir) != manifest.fingerprint:  # nothing above may touch the embedding space
            raise EngineError("the engine build changed the embedder's fingerprint")
        updated.save(repo.manifest_file)
        return updated
    finally:
        shutil.rmtree(staging, ignore_errors=True)
