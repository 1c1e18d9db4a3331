"""Search-quality candidates, each served for real and measured with `lookalike eval` in one run.

For each candidate: export the offline default embedder (EfficientNet-Lite0) with the candidate's
pooling into a copy of the model repository, write the candidate's query-side preprocessing, start
tritonserver on free loopback ports, run the same evaluation (same simulated shopper photos: same
seed) and record recall, latency at concurrency 1 and throughput. Writes OUT/candidates.json and
OUT/candidates.md.

    .venv/bin/python loadtest/eval_candidates.py --catalog data/sample_catalog/catalog.csv --out results/eval_candidates
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lookalike.views import DEFAULT_CATALOG_VIEWS  # noqa: E402  (the default's views)

CROP = {"resize_mode": "crop", "resize_size": 256}
A3 = [{"scale": 0.6, "background": [128, 128, 128]},
      {"scale": 0.9, "background": [255, 255, 255], "rotate": 20.0},
      {"scale": 0.9, "background": [255, 255, 255], "rotate": -20.0}]
A5 = [{"scale": 0.6, "background": [128, 128, 128]},
      {"scale": 0.6, "background": [40, 40, 40]},
      {"scale": 0.6, "background": [255, 255, 255]},
      {"scale": 0.9, "background": [255, 255, 255], "rotate": 20.0},
      {"scale": 0.9, "background": [255, 255, 255], "rotate": -20.0}]
A8 = A5 + [{"scale": 0.4, "background": [128, 128, 128]},
           {"scale": 0.6, "background": [128, 128, 128], "rotate": 20.0},
           {"scale": 0.6, "background": [128, 128, 128], "rotate": -20.0}]
A9 = [dict(view) for view in DEFAULT_CATALOG_VIEWS]  # A8 + the packshot exactly as queries are framed
# name -> (pooling, query-side overrides of the catalog settings, catalog views)
CANDIDATES: dict[str, tuple[str, dict, list]] = {
    "before: average pooling, letterbox queries": ("avg", {}, []),
    "average pooling, centre-crop queries": ("avg", CROP, []),
    "GeM, centre-crop queries": ("gem", CROP, []),
    "GeM, centre-crop queries, 3 catalog views": ("gem", CROP, A3),
    "GeM, centre-crop queries, 5 catalog views": ("gem", CROP, A5),
    "GeM, centre-crop queries, 8 catalog views": ("gem", CROP, A8),
    "GeM, letterbox queries, 5 catalog views": ("gem", {}, A5),
    "default: GeM, centre-crop queries, 9 catalog views (8 + the packshot as queries frame it)": ("gem", CROP, A9),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", type=Path, default=ROOT / "data/sample_catalog/catalog.csv")
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--simulate", type=int, default=1)
    parser.add_argument("--sample", type=int, default=200)
    parser.add_argument("--only", nargs="*", default=None,
                        help="names (substrings) of candidates to run; their rows replace those of an earlier run")
    parser.add_argument("--load-repeat", type=int, default=3, help="passes over the queries in the throughput run")
    parser.add_argument("--out", type=Path, default=ROOT / "results/eval_candidates")
    args = parser.parse_args()

    from lookalike.evaluation import EvalOptions, run_eval, write_reports
    from lookalike.images import encode
    from lookalike.repository import copy_repository
    from lookalike.sample_data import real_photos
    from lookalike.serve import lookalike_server
    from lookalike.server import ServerOptions, free_port
    from lookalike_client import LookalikeClient
    from lookalike_export.backbones import _efficientnet_lite0, get_backbone
    from lookalike_export.onnx_export import export_embedder

    base = get_backbone("efficientnet_lite0")
    parity_images = [encode(image) for _, image in list(real_photos())[:8]]
    rows: list[dict] = []
    args.out.mkdir(parents=True, exist_ok=True)
    if args.only and (args.out / "candidates.json").exists():  # keep the other candidates' rows
        rows = [r for r in json.loads((args.out / "candidates.json").read_text()) if r["candidate"] in CANDIDATES
                and not any(s in r["candidate"] for s in args.only)]
    for name, (pooling, query, views) in CANDIDATES.items():
        if args.only and not any(s in name for s in args.only):
            continue
        print(f"== {name}", file=sys.stderr)
        backbone = dataclasses.replace(
            base, pooling=pooling, build=functools.partial(_efficientnet_lite0, pooling=pooling),
            preprocessing=dataclasses.replace(base.preprocessing, query=query, catalog_views=views))
        with tempfile.TemporaryDirectory(prefix="lookalike-candidate-") as work:
            repo_dir = Path(work) / "repo"
            repo = copy_repository(args.model_repository, repo_dir)
            export_embedder(backbone, repo_dir, parity_images)
            options = ServerOptions(model_repository=repo_dir, http_port=free_port(), grpc_port=free_port(),
                                    metrics_port=free_port())
            with lookalike_server(options, log_file=Path(work) / "tritonserver.log") as server:
                server.wait_ready()
                with LookalikeClient(options.grpc_url, timeout_s=120) as client:
                    report = run_eval(EvalOptions(catalog=args.catalog, simulate=args.simulate, sample=args.sample,
                                                  load_repeat=args.load_repeat), repo, client)
        slug = "".join(ch if ch.isalnum() else "_" for ch in name.split(":")[0])[:60]
        write_reports(report, args.out / slug, 40)
        served = report["served"]
        frames = served["breakdown"].get("frame", {})
        scales = served["breakdown"].get("scale", {})
        rows.append({
            "candidate": name, "pooling": pooling, "query": report["preprocessing"]["query"],
            "catalog_views": len(views),
            "overall": served["overall"],
            "category_precision@10": (served["category_relevance_left_out"] or {}).get("precision@10"),
            "worst_frame": min(((v["recall@1"], k) for k, v in frames.items()), default=None),
            "worst_scale": min(((v["recall@1"], k) for k, v in scales.items()), default=None),
            "by_frame": {k: v["recall@1"] for k, v in frames.items()},
            "by_scale": {k: v["recall@1"] for k, v in scales.items()},
            "baseline_recall@1": report["colour_histogram_baseline"]["overall"]["recall@1"],
            "p50_ms": (report["timing"]["latency_ms_concurrency_1"] or {}).get("p50"),
            "images_per_s": (report["timing"]["throughput"] or {}).get("images_per_s"),
        })
        (args.out / "candidates.json").write_text(json.dumps(rows, indent=2) + "\n")
    rows.sort(key=lambda r: list(CANDIDATES).index(r["candidate"]))
    (args.out / "candidates.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| candidate | recall@1 | recall@5 | MRR | category p@10 | worst frame | worst scale | p50 ms (c=1) | img/s (c=4) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o = r["overall"]
        wf = f"{r['worst_frame'][1]} {r['worst_frame'][0]:.2f}" if r["worst_frame"] else "-"
        ws = f"{r['worst_scale'][1]} {r['worst_scale'][0]:.2f}" if r["worst_scale"] else "-"
        cp = r["category_precision@10"]
        lines.append(f"| {r['candidate']} | {o['recall@1']:.3f} | {o['recall@5']:.3f} | {o['mrr']:.3f} "
                     f"| {'-' if cp is None else f'{cp:.2f}'} | {wf} | {ws} "
                     f"| {r['p50_ms']} | {r['images_per_s']} |")
    (args.out / "candidates.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
