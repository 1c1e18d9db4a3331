"""FP16 parity of each backbone with torch on a CUDA GPU (no TensorRT needed): how far FP16 moves the
embeddings from FP32, for plain `.half()` and for autocast (which keeps LayerNorm, softmax and the
reductions in FP32, the policy our TensorRT FP16 engines use for ViT). Also embedder throughput.

    python -m lookalike_export.gpu_check --out results/gpu_fp16.json

ResNet-50 and ViT-B/16 run with random weights unless --weights-dir holds resnet50.pth / vit_b_16.pth;
the figures then say so. Real photos through our own preprocessing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from lookalike.quality.sample_data import real_photos
from lookalike.serving.images import encode
from lookalike.serving.preprocessing import Preprocessor

from .backbones import BACKBONES
from .onnx_export import Embedder
from .parity import row_cosines


def cosine(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return row_cosines(a.float().cpu().numpy(), b.float().cpu().numpy())


def throughput(fn, batch: torch.Tensor, repeats: int = 20) -> float:
    for _ in range(3):
        fn(batch)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn(batch)
    torch.cuda.synchronize()
    return repeats * batch.shape[0] / (time.perf_counter() - start)


def check(name: str, images: list[bytes], weights_dir: Path | None) -> dict:
    backbone = BACKBONES[name]
    weights: str | None = None
    if name.startswith("efficientnet_lite"):
        weights = "DEFAULT"
    elif weights_dir is not None and (weights_dir / f"{name}.pth").exists():
        weights = str(weights_dir / f"{name}.pth")
    torch.manual_seed(0)
    module = Embedder(backbone.build(weights)).eval()
    pixels = torch.from_numpy(Preprocessor(backbone.preprocessing).batch(images))
    with torch.no_grad():
        cpu = module(pixels)
        gpu = module.cuda()
        x = pixels.cuda()
        fp32 = gpu(x)
        with torch.autocast("cuda", dtype=torch.float16):
            autocast = gpu(x)
        half = gpu.half()(x.half())
        gpu.float()
        big = x.repeat(64 // len(x) + 1, 1, 1, 1)[:64].contiguous()
        fp32_rate = throughput(gpu, big)
        half_model = gpu.half()
        fp16_rate = throughput(lambda b: half_model(b), big.half())
    return {
        "model": name,
        "weights": "random" if weights is None else weights if weights != "DEFAULT" else backbone.weights_source,
        "images": len(images),
        "gpu_fp32_vs_cpu_fp32_mean_cosine": float(cosine(fp32, cpu.cuda()).mean()),
        "fp16_half_vs_fp32": {"mean_cosine": float(cosine(half, fp32).mean()), "min_cosine": float(cosine(half, fp32).min())},
        "fp16_autocast_vs_fp32": {"mean_cosine": float(cosine(autocast, fp32).mean()),
                                  "min_cosine": float(cosine(autocast, fp32).min())},
        "torch_images_per_s_batch64": {"fp32": round(fp32_rate, 1), "fp16": round(fp16_rate, 1)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/gpu_fp16.json"))
    parser.add_argument("--weights-dir", type=Path, default=None)
    parser.add_argument("--models", nargs="+", default=list(BACKBONES))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible to torch")
    torch.backends.cuda.matmul.allow_tf32 = False  # a true FP32 reference
    torch.backends.cudnn.allow_tf32 = False
    images = [encode(image, "JPEG", quality=92) for _, image in list(real_photos())[:16]]
    major, minor = torch.cuda.get_device_capability()
    report = {"device": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}",
              "torch": torch.__version__, "models": [check(name, images, args.weights_dir) for name in args.models]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['device']} (sm {report['compute_capability']}), torch {report['torch']}")
    print("| model | weights | FP16 .half() mean / min cosine | FP16 autocast mean / min cosine | img/s fp32 | img/s fp16 |")
    print("|---|---|---|---|---|---|")
    for m in report["models"]:
        h, a, r = m["fp16_half_vs_fp32"], m["fp16_autocast_vs_fp32"], m["torch_images_per_s_batch64"]
        weights = "random" if m["weights"] == "random" else "ImageNet"
        print(f"| {m['model']} | {weights} | {h['mean_cosine']:.5f} / {h['min_cosine']:.5f} | "
              f"{a['mean_cosine']:.5f} / {a['min_cosine']:.5f} | {r['fp32']} | {r['fp16']} |")


if __name__ == "__main__":
    main()
