"""Measure preprocessing choices on near-duplicates, in process: recall@1/@5 of re-shot copies
(off-centre crop, rescale, relight, JPEG) of catalog images against the catalog, for the exported
embedder under several preprocessing variants, each with its catalog side for the catalog (and its
catalog views, when it has some) and its query side for the queries: its query views, searched and
fused with the server's own code (lookalike.serving.query_views, product_search.search_requests). The exported
variant is the one to beat; shopper photos are `lookalike eval`'s job (which also reports
near-duplicates served: --near-duplicates).

    .venv/bin/python -m loadtest.evaluations.eval_preprocessing --catalog data/sample_catalog --queries 200
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

from lookalike.indexing.repository import Repository
from lookalike.quality.sample_data import perturb
from lookalike.serving.embedding import OnnxEmbedder
from lookalike.serving.images import encode, over_background
from lookalike.serving.index_files import Product
from lookalike.serving.preprocessing import ImageError, Preprocessor
from lookalike.serving.product_search import search_views
from lookalike.serving.query_views import ViewPreprocessor
from lookalike.serving.search import ProductIndex


def flatten(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return over_background(image).copy()  # an RGB image comes back as itself: copy it before the file closes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", type=Path, default=Path("data/sample_catalog"))
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("results/eval_preprocessing.json"))
    args = parser.parse_args()

    repo = Repository(args.model_repository)
    exported = repo.preprocessing()
    base = dataclasses.replace(exported.for_side("catalog"), catalog_views=[])
    variants = {
        "exported (letterbox catalog + views, crop queries)"
        if exported.catalog_views else "exported": exported,
        "exported without catalog views": dataclasses.replace(exported, catalog_views=[]),
        "exported without query views": dataclasses.replace(exported, query_views=[]),
        "letterbox both sides, no views": dataclasses.replace(base, query_views=[]),
        "resize 256 + centre crop 224 both sides, no views": dataclasses.replace(base, resize_mode="crop", resize_size=256,
                                                                                  query_views=[]),
    }
    embedder = OnnxEmbedder(repo.onnx_file)
    with open(args.catalog / "catalog.csv") as handle:
        rows = list(csv.DictReader(handle))
    data = {r["product_id"]: (args.catalog / r["image"]).read_bytes() for r in rows}
    rng = random.Random(0)
    query_ids = rng.sample(sorted(data), min(args.queries, len(data)))
    queries = {}
    for i, pid in enumerate(query_ids):
        try:
            queries[pid] = encode(perturb(flatten(data[pid]), seed=i), "JPEG", quality=75)
        except (OSError, Image.DecompressionBombError):
            continue

    results = {}
    for name, config in variants.items():
        pre = Preprocessor(config.for_side("catalog"))
        query_views = ViewPreprocessor(config)
        ids, blocks = [], []
        for pid, blob in data.items():
            try:
                images = [blob, *config.render_views(blob, pre.limits)]
                blocks.append(embedder(pre.batch(images)))
                ids.append(pid)
            except ImageError:
                continue
        index = ProductIndex.build([Product(i) for i in ids], np.concatenate(blocks), vectors=[len(b) for b in blocks])
        qids = [q for q in queries if q in set(ids)]
        # the query views and their fusion, as the server runs them (lookalike.serving.query_views, lookalike.serving.fusion)
        found = [search_views(index, embedder(query_views(queries[q])), len(query_views), 5, config.query_fusion)[0][0]
                 for q in qids]
        r1 = float(np.mean([f[0] == q for f, q in zip(found, qids)]))
        r5 = float(np.mean([q in f for f, q in zip(found, qids)]))
        results[name] = {"recall@1": r1, "recall@5": r5, "queries": len(qids), "catalog": len(ids)}
        print(f"{name:<52} recall@1 {r1:.3f}  recall@5 {r5:.3f}  ({len(qids)} queries, {len(ids)} products)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
