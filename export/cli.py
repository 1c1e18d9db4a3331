"""`lookalike export` and `lookalike engine`: the command line of this package. They register with the
`lookalike` command through the entry-point group `lookalike.commands` (pyproject.toml names
`register_export` and `register_engine`), so `lookalike` never imports this package, which builds on
`lookalike`. This module imports torch only when a command runs, so `lookalike --help` works without the
export extra."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from lookalike_client import contract as c

if TYPE_CHECKING:
    from lookalike.indexing.catalog import CatalogItem


def register_export(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds `lookalike export` to the `lookalike` command's subcommands (entry point `export` of the group
    `lookalike.commands`)."""
    from lookalike.cli import add_repository_argument

    p = subparsers.add_parser(
        "export", help="export an embedder to ONNX into the model repository",
        description="Exports an embedder (torch) to ONNX into the model repository's embedder model, with its "
        "preprocessing.json, manifest.json and configs, after a torch/ONNX Runtime parity check on real images. "
        "Needs the export extra (torch): pip install -e '.[export]'.")
    add_repository_argument(p, "the embedder is written into it")
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def register_engine(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds `lookalike engine` to the `lookalike` command's subcommands (entry point `engine` of the group
    `lookalike.commands`)."""
    from lookalike.cli import add_repository_argument

    p = subparsers.add_parser(
        "engine", help="build the embedder's TensorRT engine from its exported model.onnx "
        "(on a GPU with TensorRT: make engine), gated, fingerprint unchanged",
        description="Builds the TensorRT engine of the embedder in the model repository from its own model.onnx "
        "(never re-exported), checks it against ONNX Runtime on real images (the gate), and keeps the embedder's "
        "fingerprint: the index stays valid. Needs a GPU with TensorRT (make engine runs it in the NGC image).")
    add_repository_argument(p, "its embedder's model.onnx is read and the engine written next to it")
    add_engine_arguments(p)
    p.set_defaults(func=run_engine)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="efficientnet_lite0",
                   help="the backbone: efficientnet_lite0, efficientnet_lite1, efficientnet_lite2 (weights packaged, "
                        "work offline), resnet50, vit_b_16, dinov2_vits14, clip_vit_b16")
    p.add_argument("--weights", default="DEFAULT", metavar="DEFAULT|FILE",
                   help="DEFAULT (Lite0: the packaged weights; the others: torchvision's or the HF hub's, downloaded) "
                        "or a state_dict file (.pth, .safetensors) for offline use")
    p.add_argument("--format", default="onnx", choices=("onnx", "tensorrt"),
                   help="onnx (served by ONNX Runtime) or tensorrt (also builds the engine: a GPU with TensorRT)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "int8"),
                   help="int8 with --format onnx: a Q/DQ ONNX (explicit quantization, gated in ONNX Runtime); "
                        "fp16/int8 with --format tensorrt: the engine's precision")
    p.add_argument("--calibration", type=Path, default=None, metavar="CATALOG",
                   help="catalog (CSV or folder) whose images calibrate INT8 (default: none; --precision int8 needs it)")
    p.add_argument("--calibration-images", type=int, default=512, metavar="IMAGES",
                   help="at most this many --calibration images calibrate INT8")
    p.add_argument("--random-weights", action="store_true",
                   help="random init: only to test the export machinery; the manifest records it")
    p.add_argument("--max-batch", type=int, default=c.MAX_BATCH_SIZE, metavar="IMAGES",
                   help="the exported model's max_batch_size: images per request it accepts")
    p.add_argument("--parity-images", type=int, default=8, metavar="IMAGES",
                   help="real images for the torch/ONNX parity check")


def run(args: argparse.Namespace) -> int:
    try:
        from .backbones import get_backbone
        from .onnx_export import ExportError, export_embedder
    except ImportError as exc:
        print(f"lookalike export needs the export extra (torch): {exc}", file=sys.stderr)
        return 1
    from lookalike.indexing.catalog import read_catalog
    from lookalike.quality.sample_data import real_photos
    from lookalike.serving.images import encode

    try:
        backbone = get_backbone(args.model)
        images = [encode(image) for _, image in list(real_photos())[: args.parity_images]]
        calibration: list[bytes] = []
        if args.calibration is not None:
            items, _ = read_catalog(args.calibration)
            calibration = read_catalog_images(items, args.calibration_images, "lookalike export")
        manifest = export_embedder(backbone, args.model_repository, images,
                                   weights=None if args.random_weights else args.weights,
                                   max_batch_size=args.max_batch, fmt=args.format, precision=args.precision,
                                   calibration_images=calibration)
    except (ExportError, RuntimeError, ValueError, OSError) as exc:
        print(f"lookalike export: {exc}", file=sys.stderr)
        return 1
    p = manifest.parity_onnx_vs_torch
    print(f"exported {backbone.name} ({manifest.weights_source}) -> {Path(args.model_repository) / c.EMBEDDER_MODEL}\n"
          f"  dim {manifest.dim}, input {list(manifest.input)}, fingerprint {manifest.fingerprint}\n"
          f"  parity ONNX Runtime vs torch on {p['images']} real images: mean cosine {p['mean_cosine']:.7f}, "
          f"max abs diff {p['max_abs_diff']:.2e}")
    quantized = manifest.quantization
    if quantized:
        q, r = quantized["parity_vs_fp32"], quantized["retrieval_check"]
        print(f"  INT8 Q/DQ ({quantized['calibration_images']} calibration images, {len(quantized['fp32_nodes'])} "
              f"nodes kept FP32): mean cosine to FP32 {q['mean_cosine']:.4f} on {q['images']} images (gate "
              f"{q['threshold']}); recall@1 on {r['products']} products {r['recall_at_1_int8']:.3f} vs FP32 "
              f"{r['recall_at_1_fp32']:.3f} (max loss {r['max_recall_loss']})")
    engine = manifest.tensorrt_engine
    if engine:
        e = engine["parity_vs_onnx"]
        print(f"  TensorRT {engine['tensorrt']} {engine['precision']} engine on {engine['gpu']} (sm {engine['compute_capability']}): "
              f"mean cosine vs ONNX {e['mean_cosine']:.6f} (gate {e['threshold']})")
    if manifest.random_weights:
        print("  WARNING: random weights (for testing the export machinery only)")
    return 0


def read_catalog_images(items: Sequence[CatalogItem], count: int, command: str) -> list[bytes]:
    """The bytes of the first `count` catalog images that are regular files within the server's default
    upload limit (`ImageLimits().max_bytes`); each one refused is skipped, saying why, on stderr."""
    from lookalike.serving.preprocessing import ImageLimits
    from lookalike_client.files import FileRefusedError, read_file

    max_bytes = ImageLimits().max_bytes
    images: list[bytes] = []
    for item in items:
        if len(images) >= count:
            break
        try:
            images.append(read_file(item.image, max_bytes))
        except FileRefusedError as exc:
            print(f"{command}: skipped {item.where}: {exc}", file=sys.stderr)
    return images


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    from lookalike.cli import deprecated_alias

    from .engine import ENGINE_PRECISIONS, OPT_BATCH_SIZE

    p.add_argument("--precision", default=None, choices=ENGINE_PRECISIONS,
                   help="the engine's precision (default: int8 when model.onnx is the Q/DQ export of lookalike export "
                        "--precision int8, else fp16: an FP16-typed copy of model.onnx, made here)")
    p.add_argument("--allow-tf32", action="store_true", help="let FP32 layers use TF32 (off: fp32 means FP32)")
    p.add_argument("--opt-batch", type=int, default=OPT_BATCH_SIZE, metavar="IMAGES",
                   help="the optimization profile's opt batch size, in images (min 1, max: the export's max_batch_size)")
    catalog = p.add_argument("--catalog", type=Path, default=None, metavar="CATALOG",
                             help="catalog (CSV or folder) whose images feed the gates (default: the packaged sample photos)")
    deprecated_alias(p, "--images", catalog)
    p.add_argument("--gate-images", type=int, default=16, metavar="IMAGES",
                   help="images the parity gates compare the engine with ONNX Runtime on")


def run_engine(args: argparse.Namespace) -> int:
    """`lookalike engine`: the TensorRT engine of the embedder in the model repository, from its own
    model.onnx (never re-exported), gated, with the fingerprint unchanged."""
    from lookalike.indexing.catalog import read_catalog
    from lookalike.serving.images import encode

    from .engine import EngineError, build_repository_engine

    try:
        if args.catalog is not None:
            items, _ = read_catalog(args.catalog)
            images = read_catalog_images(items, args.gate_images, "lookalike engine")
        else:
            from lookalike.quality.sample_data import real_photos

            images = [encode(image) for _, image in list(real_photos())[: args.gate_images]]
        manifest = build_repository_engine(args.model_repository, images, args.precision,
                                           allow_tf32=args.allow_tf32, opt_batch_size=args.opt_batch)
    except (EngineError, ValueError, OSError) as exc:
        print(f"lookalike engine: {exc}", file=sys.stderr)
        return 1
    engine = manifest.tensorrt_engine or {}
    e = engine["parity_vs_onnx"]
    print(f"TensorRT {engine['tensorrt']} {engine['precision']} engine (strongly typed, TF32 "
          f"{'on' if engine['tf32'] else 'off'}) on {engine['gpu']} (sm {engine['compute_capability']}) -> "
          f"{Path(args.model_repository) / c.EMBEDDER_MODEL}\n"
          f"  from {engine['built_from']['file']} (fingerprint {manifest.fingerprint}, unchanged)\n"
          f"  worst mean cosine vs ONNX Runtime at batch {'/'.join(engine['parity_by_batch'])}: {e['mean_cosine']:.6f} "
          f"(gate {e['threshold']}); timing cache {engine['timing_cache']['file']} "
          f"({'reused' if engine['timing_cache']['reused'] else 'new'})\n"
          f"  serve it: lookalike serve --model-config-name tensorrt (the NGC tritonserver image)")
    return 0
