"""Where a FAISS index runs: the GPU placement of a loaded index (one resources object per model instance,
with bounded scratch memory) and the CPU thread count. FAISS GPU classes exist only in GPU builds; here
they are reached through `Any`, and every function says why the GPU cannot be used when it cannot."""

from __future__ import annotations

import logging
from typing import Any

import faiss

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "gpu")
DEFAULT_GPU_TEMP_MEMORY = 256 << 20  # FAISS reserves about 512 MB of scratch per resources object by default


class GpuUnavailableError(RuntimeError):
    """device "gpu" where FAISS cannot put this index on a GPU: a load error that says why."""


def gpu_unavailable() -> str | None:
    """Why FAISS cannot use a GPU in this process, or None when it can."""
    if not hasattr(faiss, "StandardGpuResources"):
        return f"this FAISS build ({faiss.__version__}) has no GPU support (faiss-cpu; a GPU build is faiss-gpu)"
    if faiss.get_num_gpus() < 1:
        return "FAISS sees no GPU (none visible to this process: driver, CUDA_VISIBLE_DEVICES)"
    return None


def to_gpu(index: faiss.Index, device: int = 0, temp_memory_bytes: int = DEFAULT_GPU_TEMP_MEMORY) -> faiss.Index | None:
    """`index` copied to GPU `device` with a resources object of its own (one per model instance) whose
    scratch memory is bounded; None for an index kind FAISS has no GPU version of (HNSW; CAGRA, its
    GPU graph, needs a cuVS build and a rebuild, not a copy). Needs `gpu_unavailable()` to be None."""
    if isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
        return None
    gpu: Any = faiss  # the GPU classes exist only in GPU builds of the SWIG module
    resources = gpu.StandardGpuResources()
    resources.setTempMemory(int(temp_memory_bytes))
    options = gpu.GpuClonerOptions()
    options.useFloat16LookupTables = True  # IVF-PQ with many sub-quantisers: its tables must fit shared memory
    gpu_index = gpu.index_cpu_to_gpu(resources, device, index, options)
    gpu_index.referenced_resources = resources  # keep the resources alive with the index (FAISS's own idiom)
    log.info("FAISS index on GPU %d (scratch memory %d MB)", device, temp_memory_bytes >> 20)
    return gpu_index


def place(index: faiss.Index, device: str, *, gpu_device: int = 0,
          temp_memory_bytes: int = DEFAULT_GPU_TEMP_MEMORY) -> faiss.Index:
    """The index where `device` (auto|cpu|gpu) says: "gpu" raises GpuUnavailableError when it cannot be
    done; "auto" uses the GPU when FAISS can, else stays on the CPU."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu":
        return index
    reason = gpu_unavailable()
    moved = to_gpu(index, gpu_device, temp_memory_bytes) if reason is None else None
    if moved is not None:
        return moved
    if reason is None:
        reason = f"FAISS has no GPU version of a {type(faiss.downcast_index(index)).__name__} (use flat or ivf-pq)"
    if device == "gpu":
        raise GpuUnavailableError(f"device gpu: {reason}")
    log.info("device auto: searching on the CPU (%s)", reason)
    return index


def set_threads(count: int) -> None:
    """FAISS uses OpenMP; in a server with several model instances, each should use a share of cores."""
    if count > 0:
        faiss.omp_set_num_threads(count)
