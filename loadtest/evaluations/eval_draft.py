"""How far can a JPEG query be DCT-downscaled while decoding (`draft_oversample`) before search quality
moves? In process: shopper photos of catalog products (`lookalike.quality.shopper`, at its frame sizes) and the
same scenes as 12-megapixel phone JPEGs (`phone_photos.py`), searched against the repository's newest
index version (the one `make demo` built) with the query-side preprocessing at each --oversample value.
Reports recall@1/@10, the embeddings' cosine to the first value's, and preprocessing ms a photo.

    .venv/bin/python -m loadtest.evaluations.eval_draft --catalog data/sample_catalog/catalog.csv --photos 150
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path

import numpy as np
from PIL import Image

from loadtest.phone_photos import PHONE_FRAMES, camera_jpeg
from lookalike.indexing.catalog import read_catalog
from lookalike.indexing.repository import Repository
from lookalike.quality.shopper import ShopperSimulator, background_photos
from lookalike.serving.embedding import OnnxEmbedder
from lookalike.serving.preprocessing import Preprocessor
from lookalike.serving.search import ProductIndex

ROOT = Path(__file__).resolve().parents[2]


def photos(catalog: Path, count: int, seed: int) -> tuple[list[str], list[bytes], list[bytes]]:
    """(product ids, shopper JPEGs at the simulator's sizes, the same as 12 MP phone JPEGs)."""
    items, _ = read_catalog(catalog)
    first = {}
    for item in items:
        first.setdefault(item.product_id, item)
    picked = random.Random(seed).sample(sorted(first.values(), key=lambda i: i.product_id), min(count, len(first)))
    simulator = ShopperSimulator(background_photos())
    ids, small, phone = [], [], []
    for i, item in enumerate(picked):
        packshot = Image.open(item.image).convert("RGBA")
        packshot.thumbnail((1024, 1024))
        shot = simulator(packshot, seed * 1_000_003 + i)
        ids.append(item.product_id)
        small.append(shot.jpeg())
        frame = PHONE_FRAMES["landscape" if shot.image.width > shot.image.height else "portrait"]
        phone.append(camera_jpeg(shot.image, frame, seed=i, noise=3.0, quality=90))
    return ids, small, phone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", type=Path, default=ROOT / "data" / "sample_catalog" / "catalog.csv")
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--photos", type=int, default=150)
    parser.add_argument("--oversample", type=float, nargs="+", default=[2.0, 1.5, 1.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "eval_draft.json")
    args = parser.parse_args()

    repo = Repository(args.model_repository)
    index_dir = repo.latest_index_dir()
    if index_dir is None:
        raise SystemExit("no index version in the repository: run `make demo` first")
    index = ProductIndex.load(index_dir)
    embedder = OnnxEmbedder(repo.onnx_file)
    query = repo.preprocessing().for_side("query")
    ids, small, phone = photos(args.catalog, args.photos, args.seed)
    results: dict = {"index_version": index_dir.name, "photos": len(ids), "rows": {}}
    reference: dict[str, np.ndarray] = {}
    print(f"| photos | draft_oversample | recall@1 | recall@10 | cosine to {args.oversample[0]} (mean / min) | preprocess ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind, data in (("shopper frames (<= 2340 px)", small), ("12 MP phone", phone)):
        for oversample in args.oversample:
            preprocessor = Preprocessor(dataclasses.replace(query, draft_oversample=oversample))
            start = time.perf_counter()
            pixels = np.stack([preprocessor(d) for d in data])
            ms = (time.perf_counter() - start) / len(data) * 1000
            vectors = embedder(pixels)
            found, _ = index.search(vectors, 10)
            ranks = [hits.index(pid) if pid in hits else None for pid, hits in zip(ids, found)]
            reference.setdefault(kind, vectors)
            cosine = (vectors * reference[kind]).sum(1)
            row = {"recall@1": float(np.mean([r == 0 for r in ranks])),
                   "recall@10": float(np.mean([r is not None for r in ranks])),
                   "cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()), "preprocess_ms": ms}
            results["rows"][f"{kind}, draft_oversample {oversample}"] = row
            print(f"| {kind} | {oversample} | {row['recall@1']:.3f} | {row['recall@10']:.3f} | "
                  f"{row['cosine_mean']:.4f} / {row['cosine_min']:.4f} | {ms:.1f} |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
