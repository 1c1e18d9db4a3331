"""Query views and backbones, each served for real and measured with `lookalike eval` in one run.

For each backbone (an exported model repository: the project's own, and each `--backbone REPO`):
copy it, start tritonserver on free loopback ports, embed the catalog once (embed_image) and serve its
index. Then for each query-view set: write its `query_views` and `query_fusion` into the copy's
preprocessing file, reload `preprocess_query` and `product_search` (no re-index: the views are not part
of the embedder's fingerprint), and run the same evaluation (same simulated shopper photos and
near-duplicates: same seed). Recorded: shopper recall@1/5 overall and by frame and scale,
near-duplicate recall@1, p50 of visual_search at concurrency 1 and img/s with 4 clients, and that
throughput as a share of the single-view row of the same backbone (the same server, minutes apart).
Writes OUT/candidates.json and OUT/candidates.md.

    .venv/bin/python -m loadtest.evaluations.eval_candidates --catalog data/sample_catalog/catalog.csv --out results/eval_candidates
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CROP = {"name": "crop"}
ZOOM60 = {"name": "zoom 60%", "zoom": 0.6}
ZOOM45 = {"name": "zoom 45%", "zoom": 0.45}
LETTERBOX = {"name": "letterbox", "resize_mode": "letterbox"}
# name -> (query views, fusion); the first is the single-view row the others' cost is compared with.
VIEW_SETS: dict[str, tuple[list[dict], str]] = {
    "crop alone (views off)": ([], "max"),
    "crop + zoom 60%, max": ([CROP, ZOOM60], "max"),
    "crop + letterbox, max": ([CROP, LETTERBOX], "max"),
    "crop + zoom 60% + zoom 45%, max": ([CROP, ZOOM60, ZOOM45], "max"),
    "crop + zoom 60% + zoom 45%, mean of 2 best": ([CROP, ZOOM60, ZOOM45], "mean_top2"),
    "crop + zoom 60% + letterbox, max": ([CROP, ZOOM60, LETTERBOX], "max"),
    "crop + zoom 60% + letterbox, mean of 2 best": ([CROP, ZOOM60, LETTERBOX], "mean_top2"),
    "crop + zoom 60% + zoom 45% + letterbox, max": ([CROP, ZOOM60, ZOOM45, LETTERBOX], "max"),
    "crop + zoom 60% + zoom 45% + letterbox, mean of 2 best": ([CROP, ZOOM60, ZOOM45, LETTERBOX], "mean_top2"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", type=Path, default=ROOT / "data/sample_catalog/catalog.csv")
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--backbone", action="append", default=[], type=Path, metavar="REPO",
                        help="another model repository to measure, exported with lookalike export --model NAME")
    parser.add_argument("--views", nargs="*", default=None,
                        help="names (substrings) of the view sets to run (default: all); the single-view row always runs")
    parser.add_argument("--simulate", type=int, default=1)
    parser.add_argument("--sample", type=int, default=200)
    parser.add_argument("--near-duplicates", type=int, default=200)
    parser.add_argument("--load-repeat", type=int, default=1, help="passes over the queries in the throughput run")
    parser.add_argument("--out", type=Path, default=ROOT / "results/eval_candidates")
    args = parser.parse_args()

    from lookalike.indexing.catalog import read_catalog
    from lookalike.indexing.indexer import build_index, embed_items
    from lookalike.indexing.publishing import publish_index
    from lookalike.indexing.repository import Repository, copy_repository
    from lookalike.quality.evaluation import EvalOptions, run_eval, write_reports
    from lookalike.server.launcher import ServerOptions, free_port
    from lookalike.server.serve import lookalike_server
    from lookalike_client import LookalikeClient
    from lookalike_client import contract as c

    backbones = [args.model_repository, *args.backbone]
    names = [n for i, n in enumerate(VIEW_SETS) if i == 0 or args.views is None or any(s in n for s in args.views)]
    rows: list[dict] = []
    args.out.mkdir(parents=True, exist_ok=True)
    for source in backbones:
        with tempfile.TemporaryDirectory(prefix="lookalike-candidate-") as work:
            repo_dir = Path(work) / "repo"
            copy_repository(source, repo_dir)
            repo = Repository(repo_dir)
            model = repo.manifest().model
            exported = json.loads(repo.preprocessing_file.read_text())
            options = ServerOptions(model_repository=repo_dir, http_port=free_port(), grpc_port=free_port(),
                                    metrics_port=free_port())
            with lookalike_server(options, log_file=Path(work) / "tritonserver.log") as server:
                server.wait_ready()
                import tritonclient.grpc as grpcclient

                admin = grpcclient.InferenceServerClient(options.grpc_url)
                single = None
                with LookalikeClient(options.grpc_url, timeout_s=120) as client:
                    print(f"== {model}: embedding and serving the catalog", file=sys.stderr)
                    items, _ = read_catalog(args.catalog)
                    limits = repo.image_limits()
                    embedded = embed_items(client, items, progress=False, max_bytes=limits.max_bytes,
                                           config=repo.preprocessing(), limits=limits)
                    publish_index(repo, build_index(embedded[0], embedded[1], repo.manifest()), client)
                    for name in names:
                        views, fusion = VIEW_SETS[name]
                        print(f"== {model}: {name}", file=sys.stderr)
                        repo.preprocessing_file.write_text(
                            json.dumps({**exported, "query_views": views, "query_fusion": fusion}, indent=2) + "\n")
                        for model_name in (c.PREPROCESS_QUERY_MODEL, c.SEARCH_MODEL):
                            # tritonserver keeps a model's instances on a reload whose config did not
                            # change (and the preprocessing file is not in the model's directory): a
                            # parameter that changes each time makes new instances, which read the file.
                            answer = admin.get_model_config(model_name, as_json=True)
                            assert answer is not None
                            config = answer["config"]
                            config["parameters"]["candidate"] = {"string_value": name}
                            admin.load_model(model_name, config=json.dumps(config))
                        client.wait_until_ready(timeout_s=120.0)
                        report = run_eval(EvalOptions(catalog=args.catalog, simulate=args.simulate, sample=args.sample,
                                                      near_duplicates=args.near_duplicates,
                                                      load_repeat=args.load_repeat), repo, client, embedded=embedded)
                        slug = "".join(ch if ch.isalnum() else "_" for ch in f"{model} {name}")[:80]
                        write_reports(report, args.out / slug, 40)
                        row = _row(model, name, views, fusion, report)
                        if row["served_views"] != max(1, len(views)):
                            raise RuntimeError(f"the server embedded {row['served_views']} views, not {len(views)}")
                        single = single or row["images_per_s"]
                        row["throughput_vs_single_view"] = round(row["images_per_s"] / single, 2) if single else None
                        rows.append(row)
                        (args.out / "candidates.json").write_text(json.dumps(rows, indent=2) + "\n")
                admin.close()
    (args.out / "candidates.md").write_text(_table(rows))
    print(_table(rows))
    return 0


def _row(model: str, name: str, views: list, fusion: str, report: dict) -> dict:
    served = report["served"]
    frames = served["breakdown"].get("frame", {})
    scales = served["breakdown"].get("scale", {})
    near = served.get("near_duplicates") or {}
    return {
        "backbone": model, "views": name, "query_views": views, "fusion": fusion,
        "served_views": report["query_views"]["views"],
        "overall": served["overall"],
        "near_duplicates": near,
        "by_frame": {k: v["recall@1"] for k, v in frames.items()},
        "by_scale": {k: v["recall@1"] for k, v in scales.items()},
        "worst_bucket": min([(v["recall@1"], f"frame {k}") for k, v in frames.items()]
                            + [(v["recall@1"], f"scale {k}") for k, v in scales.items()], default=None),
        "p50_ms": (report["timing"]["latency_ms_concurrency_1"] or {}).get("p50"),
        "images_per_s": (report["timing"]["throughput"] or {}).get("images_per_s"),
    }


def _table(rows: list[dict]) -> str:
    frames = sorted({k for r in rows for k in r["by_frame"]})
    scales = sorted({k for r in rows for k in r["by_scale"]})
    head = (["backbone", "query views", "recall@1", "recall@5", "near-dup recall@1"] + [f"frame {f}" for f in frames]
            + [f"scale {s}" for s in scales] + ["p50 ms (c=1)", "img/s (c=4)", "vs 1 view"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        o, n = r["overall"], r["near_duplicates"]
        cells = [r["backbone"], r["views"], f"{o['recall@1']:.3f}", f"{o['recall@5']:.3f}",
                 f"{n['recall@1']:.3f}" if n else "-"]
        cells += [f"{r['by_frame'].get(f, float('nan')):.2f}" for f in frames]
        cells += [f"{r['by_scale'].get(s, float('nan')):.2f}" for s in scales]
        cells += [str(r["p50_ms"]), str(r["images_per_s"]), f"{r['throughput_vs_single_view']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
