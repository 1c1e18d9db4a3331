"""ONNX Runtime inference of an exported embedder: float32 [N, 3, H, W] -> float32 [N, D].

Used by the Python-backend `embedder` model and by anything that needs the same embeddings in
process (benchmarks, evaluation, export parity checks).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from lookalike_client import contract as c


class OnnxEmbedder:
    def __init__(self, onnx_path: str | Path, *, intra_op_threads: int = 0, spin: bool = True,
                 providers: list[str] | None = None) -> None:
        """intra_op_threads: ONNX Runtime's threads for one call (0: its default, one per core).
        spin: whether those threads busy-wait for work between calls (ONNX Runtime's default). In a
        server whose other processes need the same cores (decoding), spinning burns their CPU time."""
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads > 0:
            options.intra_op_num_threads = intra_op_threads
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.inter_op_num_threads = 1
        available = ort.get_available_providers()
        chosen = [p for p in (providers or ["CUDAExecutionProvider", "CPUExecutionProvider"]) if p in available]
        self.session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=chosen)
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        if c.PIXELS not in inputs or c.EMBEDDING not in outputs:
            raise ValueError(
                f"{onnx_path}: expected input {c.PIXELS} and output {c.EMBEDDING}, "
                f"found inputs {list(inputs)} and outputs {list(outputs)}"
            )
        width = outputs[c.EMBEDDING].shape[1]
        self.dim: int | None = width if isinstance(width, int) else None

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        return np.asarray(self.session.run([c.EMBEDDING], {c.PIXELS: pixels})[0])
