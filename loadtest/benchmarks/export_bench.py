"""The export table: each backbone exported to ONNX (ResNet-50 and ViT-B/16 with random weights, which
change neither size nor speed), its parity figures, and embedder throughput with ONNX Runtime on this
machine's CPU at batch 1 and 8, all in one run.

    .venv/bin/python -m loadtest.benchmarks.export_bench --out results
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from lookalike.indexing.repository import Repository
from lookalike.quality.sample_data import real_photos
from lookalike.serving.embedding import OnnxEmbedder
from lookalike.serving.images import encode
from lookalike.serving.preprocessing import Preprocessor
from lookalike_export.backbones import BACKBONES
from lookalike_export.onnx_export import export_embedder


def rate(embedder: OnnxEmbedder, pixels: np.ndarray, seconds: float = 5.0) -> float:
    embedder(pixels)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        embedder(pixels)
        done += len(pixels)
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    images = [encode(image, "JPEG", quality=92) for _, image in list(real_photos())[:8]]
    rows = []
    for name, backbone in BACKBONES.items():
        with tempfile.TemporaryDirectory() as tmp:
            weights = "DEFAULT" if name.startswith("efficientnet_lite") else None
            manifest = export_embedder(backbone, Path(tmp), images, weights=weights)
            onnx_path = Repository(Path(tmp)).onnx_file
            embedder = OnnxEmbedder(onnx_path)
            pixels = Preprocessor(backbone.preprocessing).batch(images)
            parity = manifest.parity_onnx_vs_torch
            rows.append({
                "model": name, "dim": backbone.dim, "weights": "ImageNet" if weights else "random",
                "onnx_mb": round(onnx_path.stat().st_size / 1e6, 1),
                "parity_mean_cosine": parity["mean_cosine"], "parity_max_abs_diff": parity["max_abs_diff"],
                "cpu_images_per_s_batch1": round(rate(embedder, pixels[:1]), 1),
                "cpu_images_per_s_batch8": round(rate(embedder, pixels), 1),
            })
    print(f"ONNX Runtime on {os.cpu_count()} CPU cores")
    print("| model | dim | weights | ONNX MB | parity mean cosine | max abs diff | CPU img/s b1 | CPU img/s b8 |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['dim']} | {r['weights']} | {r['onnx_mb']} | {r['parity_mean_cosine']:.7f} | "
              f"{r['parity_max_abs_diff']:.1e} | {r['cpu_images_per_s_batch1']} | {r['cpu_images_per_s_batch8']} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "export_bench.json").write_text(json.dumps({"cpu_count": os.cpu_count(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
