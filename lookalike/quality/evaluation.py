"""`lookalike eval`: how often the running server finds the product in a shopper's photo, without
changing what the server serves.

The catalog goes through `embed_image` (catalog-side preprocessing, catalog views) and each query photo
through `preprocess_query`, the first step of `visual_search`: the server's own query views, embedded
by the served embedder. The evaluation index (the catalog minus a few left-out products per
category) is built and searched in this process with the code `product_search` runs
(`lookalike.serving.product_search.search_requests`: each view searched, the views fused as the preprocessing
file's `query_fusion` says). Nothing is published: the served index, the repository's index versions
and its embedding store stay exactly as they were, and other clients see the whole catalog throughout.
Latency and throughput are measured on `visual_search` itself, as clients call it.

Queries are real shopper photos (`--queries`, CSV `image,product_id`) and/or synthetic ones made from
the catalog's packshots (`--simulate N`, lookalike.quality.shopper). Reported: recall@1/5/10 and MRR, broken
down by what was done to each synthetic photo; precision@10 of same-category results for products
left out of the index; the same metrics for a colour-histogram baseline computed in the same run;
latency at concurrency 1 and throughput under load. An image that cannot be read or that the server
refuses is a miss, listed with its reason; it is never dropped from the counts.
"""

from __future__ import annotations

import csv
import html
import io
import json
import random
import statistics
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from lookalike.indexing.catalog import CatalogItem, Problem, csv_records, read_catalog
from lookalike.indexing.indexer import build_index, embed_items
from lookalike.indexing.repository import Repository
from lookalike.quality.report import figure, thumbnail_uri
from lookalike.quality.sample_data import perturb
from lookalike.quality.shopper import DIMENSIONS, ShopperSimulator, background_photos, exclude_lookalikes, signature
from lookalike.serving.images import encode
from lookalike.serving.index_files import Product
from lookalike.serving.preprocessing import ImageError, ImageLimits, decode
from lookalike.serving.product_search import search_views
from lookalike.serving.search import ProductIndex
from lookalike_client import FileRefusedError, LookalikeClient, LookalikeError
from lookalike_client import contract as c
from lookalike_client.calls import Call, image_batch
from lookalike_client.contract import quoted
from lookalike_client.files import open_file, read_file

KS = (1, 5, 10)
NEAR_DUPLICATE = "near_duplicate"  # a query's source tag: a re-shot catalog packshot, not a shopper photo
LATENCY_QUERIES = 100  # visual_search calls, one at a time, for the latency at concurrency 1
PACKSHOT_MAX_SIDE = 1024  # packshots are shrunk to this before simulation: the photos are at most 2340 px


@dataclass
class Query:
    name: str  # the file, or "simulated:<product id>#<n>"
    product_id: str  # the right answer
    data: bytes | None  # encoded image; None when it could not be read
    tags: dict[str, str] = field(default_factory=dict)
    error: str = ""  # why it could not be read
    left_out: bool = False  # its product is not in the index: a category-relevance query


@dataclass
class Outcome:
    query: Query
    ids: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    error: str = ""
    views: int = 0  # query views the server embedded

    def rank(self) -> int | None:
        """1-based rank of the right product in the results, None when missing or failed."""
        return self.ids.index(self.query.product_id) + 1 if self.query.product_id in self.ids else None


def retrieval_metrics(ranks: Sequence[int | None]) -> dict[str, Any]:
    """recall@1/5/10 and MRR (1/rank, 0 when not in the results) over all queries, misses included."""
    n = len(ranks)
    out: dict[str, Any] = {"queries": n}
    for k in KS:
        out[f"recall@{k}"] = sum(1 for r in ranks if r is not None and r <= k) / n if n else None
    out["mrr"] = sum(1.0 / r for r in ranks if r is not None) / n if n else None
    return out


def breakdown(tags: Sequence[dict[str, str]], ranks: Sequence[int | None]) -> dict[str, dict[str, dict]]:
    """retrieval_metrics per value of each tag dimension."""
    out: dict[str, dict[str, dict]] = {}
    for dimension in DIMENSIONS:
        groups: dict[str, list[int | None]] = defaultdict(list)
        for tag, rank in zip(tags, ranks):
            if dimension in tag:
                groups[tag[dimension]].append(rank)
        if groups:
            out[dimension] = {value: retrieval_metrics(groups[value]) for value in sorted(groups)}
    return out


def category_precision(results: Sequence[tuple[str, Sequence[str]]], categories: dict[str, str], k: int = 10) -> dict:
    """Mean share of the top-k results in the query product's own category (failed queries count 0)."""
    values = []
    for category, ids in results:
        values.append(sum(1 for i in ids[:k] if categories.get(i) == category) / k)
    return {"queries": len(values), f"precision@{k}": float(np.mean(values)) if values else None}


class ColourHistogram:
    """Baseline: an 8x8x8 RGB histogram of the non-white pixels, square-rooted (Hellinger) and L2-normalised."""

    bins = 8

    def __call__(self, image: Image.Image) -> np.ndarray:
        small = image.convert("RGB")
        small.thumbnail((256, 256))
        pixels = np.asarray(small).reshape(-1, 3)
        keep = pixels[(pixels < 240).any(axis=1)]
        if len(keep) == 0:
            keep = pixels
        index = (keep // (256 // self.bins)).astype(np.int64)
        flat = index[:, 0] * self.bins * self.bins + index[:, 1] * self.bins + index[:, 2]
        hist = np.sqrt(np.bincount(flat, minlength=self.bins**3).astype(np.float32))
        return hist / (float(np.linalg.norm(hist)) + 1e-12)


def read_queries(path: Path, max_bytes: int = ImageLimits().max_bytes) -> list[Query]:
    """Real shopper photos: CSV `image,product_id`, images relative to the CSV (or absolute). Unreadable
    rows become queries with an error (counted as misses), never silently dropped: a line the CSV
    parser refuses, an image that is not a regular file (a FIFO, a device, a directory: never opened)
    or is over `max_bytes` (never read)."""
    queries: list[Query] = []

    def refused(problem: Problem) -> None:  # a line the CSV parser refused
        queries.append(Query(problem.where, "", None, {"source": "photo"}, error=f"cannot read: {problem.reason}"))

    with open_file(path) as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as handle:
        records = csv_records(csv.reader(handle), path.name, refused)
        first = next(records, None)
        fieldnames = [cell.strip() for cell in first[1]] if first is not None and first[0] == 1 else None
        if not fieldnames or not {"image", "product_id"} <= set(fieldnames):
            raise ValueError(f"{path}: needs the columns image,product_id (found {fieldnames})")
        image_at, id_at = fieldnames.index("image"), fieldnames.index("product_id")
        for line, row in records:
            if not row:
                continue
            name = row[image_at].strip() if image_at < len(row) else ""
            product_id = row[id_at].strip() if id_at < len(row) else ""
            where = f"{path.name}:{line} {name if len(name) <= 200 else quoted(name)}"
            try:
                if not name:
                    raise OSError("no image given")
                data = read_file(name, max_bytes, base=path.parent)
            except OSError as exc:
                reason = exc.reason if isinstance(exc, FileRefusedError) else exc.strerror or exc
                queries.append(Query(where, product_id, None, {"source": "photo"}, error=f"cannot read: {reason}"))
                continue
            queries.append(Query(str(path.parent / name), product_id, data, {"source": "photo"}))
    return queries


def _packshot(item: CatalogItem, limits: ImageLimits, config) -> Image.Image | None:
    """The catalog image, decoded as the server would (None if it refuses it), shrunk for simulation."""
    try:
        image = decode(read_file(item.image, limits.max_bytes), config, limits)
    except (OSError, ImageError):
        return None
    image.thumbnail((PACKSHOT_MAX_SIDE, PACKSHOT_MAX_SIDE))
    return image


@dataclass
class EvalOptions:
    catalog: Path
    queries_csv: Path | None = None
    simulate: int = 0  # synthetic photos per sampled product
    sample: int = 200  # products sampled for simulation
    leave_out: int = 1  # products per category left out of the index (categories with >= 5 products)
    seed: int = 0
    top_k: int = 10
    concurrency: int = 4  # clients of the throughput pass (0: skip it)
    load_repeat: int = 1  # passes over the queries in the throughput pass
    failures: int = 40  # worst failures shown in failures.html
    near_duplicates: int = 0  # indexed products whose re-shot packshot is also a query (reported apart)


def run_eval(options: EvalOptions, repository: Repository, client: LookalikeClient,
             log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
             embedded: tuple[list[CatalogItem], list[np.ndarray], list[Problem]] | None = None) -> dict:
    """`embedded`: the catalog's embeddings from an earlier run against the same embedder (embed_items'
    answer), reused instead of embedding the catalog again (`report["_embedded"]` holds them)."""
    started = time.perf_counter()
    items, problems = read_catalog(options.catalog)
    unreadable_rows = len(problems)
    if not items:
        raise ValueError(f"{options.catalog}: no usable rows")
    config = repository.preprocessing()
    limits = repository.image_limits()
    client.wait_until_ready(timeout_s=120.0, model="embed_image")

    catalog_side = config.for_side("catalog")
    if embedded is None:
        log(f"embedding {len(items)} catalog images through embed_image")
        embedded = embed_items(client, items, progress=False, max_bytes=limits.max_bytes, config=config, limits=limits)
    good, vectors, embed_problems = embedded
    problems += embed_problems
    by_id: dict[str, CatalogItem] = {}
    for item in good:  # a product with several images: its first (as the index shows it)
        by_id.setdefault(item.product_id, item)
    categories = {item.product_id: item.category for item in good}

    queries: list[Query] = read_queries(options.queries_csv, limits.max_bytes) if options.queries_csv is not None else []
    for query in queries:  # a photo of a product the server cannot have indexed is a miss with a reason
        if not query.error and query.product_id not in by_id:
            query.error = f"product id {query.product_id!r} is not among the catalog's indexed products"
    wanted = {query.product_id for query in queries}

    rng = random.Random(options.seed)
    per_category: dict[str, list[str]] = defaultdict(list)
    for item in by_id.values():
        if item.category and item.product_id not in wanted:  # real photos' products stay indexed
            per_category[item.category].append(item.product_id)
    left_out: set[str] = set()
    for _category, ids in sorted(per_category.items()):
        if len(ids) >= 5 and options.leave_out > 0:
            left_out.update(rng.sample(sorted(ids), min(options.leave_out, len(ids) - 4)))
    indexed = [item for item in good if item.product_id not in left_out]
    indexed_vectors = [v for item, v in zip(good, vectors) if item.product_id not in left_out]

    log("decoding packshots (backgrounds must not look like any of them; baseline histograms)")
    histogram = ColourHistogram()
    packshots: dict[str, Image.Image] = {}
    signatures, hist_ids, hist_vectors = [], [], []
    simulate_ids: list[str] = []
    if options.simulate > 0:
        pool = sorted({item.product_id for item in indexed})
        simulate_ids = rng.sample(pool, min(options.sample, len(pool))) + sorted(left_out)
    for item in good:
        if by_id[item.product_id] is not item:  # further images of a product: the simulator and the
            continue  # baseline use its first, the server's index has them all
        image = _packshot(item, limits, catalog_side)
        if image is None:
            continue
        signatures.append(signature(image))
        if item.product_id not in left_out:
            hist_ids.append(item.product_id)
            hist_vectors.append(histogram(image))
        if item.product_id in simulate_ids:
            packshots[item.product_id] = image

    background_info: dict[str, Any] = {}
    if options.simulate > 0:
        backgrounds = background_photos()
        kept, dropped = exclude_lookalikes(backgrounds, signatures)
        background_info = {"used": [name for name, _ in kept], "dropped_as_catalog_lookalikes": dropped}
        simulator = ShopperSimulator(kept)
        log(f"simulating {options.simulate} shopper photo(s) of each of {len(simulate_ids)} products "
            f"({len(left_out)} left out of the index) on {len(kept)} background photos")
        for i, product_id in enumerate(simulate_ids):
            if product_id not in packshots:
                continue
            for n in range(options.simulate):
                photo = simulator(packshots[product_id], seed=options.seed * 1_000_003 + i * 101 + n)
                queries.append(Query(f"simulated:{product_id}#{n}", product_id, photo.jpeg(), photo.tags,
                                     left_out=product_id in left_out))

    if options.near_duplicates > 0:
        near = rng.sample(sorted({item.product_id for item in indexed}), min(options.near_duplicates, len(indexed)))
        log(f"re-shooting the packshots of {len(near)} indexed products as near-duplicate queries")
        for n, product_id in enumerate(near):
            image = _packshot(by_id[product_id], limits, catalog_side)
            if image is not None:
                queries.append(Query(f"near-duplicate:{product_id}", product_id,
                                     encode(perturb(image, seed=options.seed * 7919 + n), "JPEG", quality=75),
                                     {"source": NEAR_DUPLICATE}))

    manifest = repository.manifest()
    served_before = _served(client)
    log(f"building the evaluation index of {len(indexed)} products ({len(left_out)} left out) in this process; "
        f"the server keeps serving {served_before}")
    eval_index = build_index(indexed, indexed_vectors, manifest)
    fusion = config.query_fusion
    log(f"searching {len(queries)} queries: their views embedded by {c.PREPROCESS_QUERY_MODEL}, fused by {fusion}")
    outcomes = [_search(client, eval_index, query, options.top_k, fusion, manifest.dim) for query in queries]
    views = max((o.views for o in outcomes), default=0)
    loadable = [q.data for q in queries if q.data is not None and not q.error]
    log(f"latency of {c.VISUAL_SEARCH_MODEL} at concurrency 1 and throughput at {options.concurrency} clients "
        f"(the served index)")
    latency = _latency(client, loadable[:LATENCY_QUERIES], options.top_k)
    throughput = (_throughput(client, loadable * max(1, options.load_repeat), options.concurrency, options.top_k)
                  if options.concurrency > 0 else None)
    served_after = _served(client)

    # the colour-histogram baseline on the same queries and the same indexed products
    hist_index = ProductIndex.build([Product(i) for i in hist_ids], np.stack(hist_vectors)) if hist_vectors else None
    baseline_outcomes = []
    for outcome in outcomes:
        query = outcome.query
        base = Outcome(query, error=outcome.error or query.error)
        if query.data is not None and not base.error and hist_index is not None:
            try:
                with Image.open(io.BytesIO(query.data)) as image:
                    found, scores = hist_index.search(histogram(image)[None], options.top_k)
                base.ids, base.scores = found[0], scores[0].tolist()
            except Exception as exc:
                base.error = f"{type(exc).__name__}: {exc}"
        baseline_outcomes.append(base)

    report = {
        "catalog": str(options.catalog),
        "products": {"catalog_rows": len(items) + unreadable_rows,
                     "embedded": len(good), "indexed": len(indexed), "left_out": sorted(left_out),
                     "skipped": [str(p) for p in problems]},
        "served_index": {"before": served_before, "after": served_after},
        "query_views": {"views": views, "names": _view_names(config, views), "fusion": fusion},
        "embedder": {k: v for k, v in manifest.to_dict().items()
                     if k in ("model", "pooling", "weights_source", "random_weights", "dim", "input", "fingerprint")},
        "catalog_views": catalog_side.catalog_views,
        "preprocessing": {"catalog": _settings(config.for_side("catalog")), "query": _settings(config.for_side("query"))},
        "options": {"simulate": options.simulate, "sample": options.sample, "leave_out": options.leave_out,
                    "seed": options.seed, "top_k": options.top_k,
                    "queries_csv": str(options.queries_csv) if options.queries_csv else None},
        "backgrounds": background_info,
        "served": _summary(outcomes, categories),
        "colour_histogram_baseline": _summary(baseline_outcomes, categories),
        "timing": {"latency_ms_concurrency_1": latency, "throughput": throughput},
        "seconds": round(time.perf_counter() - started, 1),
    }
    report["_outcomes"] = outcomes  # for the HTML page; not serialised
    report["_embedded"] = embedded
    report["_by_id"] = by_id
    return report


def _settings(config) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in ("notes", "query", "catalog_views", "query_views", "query_fusion")}


def _served(client: LookalikeClient) -> dict[str, Any]:
    """What the server serves: its index version and products (before and after the run, in the report)."""
    info = client.info()
    return {"version": info.index_version, "products": info.products, "index_id": info.index_id}


def _view_names(config, views: int) -> list[str]:
    """The names of the server's query views: the preprocessing file's, when the server embedded as many
    (its `query_views` parameter may be off)."""
    from lookalike.serving.query_views import view_names, views_of

    named = view_names(views_of(config))
    return named if len(named) == views else [f"view {i}" for i in range(views)]


def query_views(client: LookalikeClient, data: bytes, dim: int) -> np.ndarray:
    """The server's embeddings of one photo's query views, [V, dim]: `preprocess_query`, the first step
    of `visual_search`, called on its own."""
    call = Call(c.PREPROCESS_QUERY_MODEL, {c.IMAGE: image_batch([data])}, (c.EMBEDDING,),
                lambda out: np.asarray(out[c.EMBEDDING], dtype=np.float32).reshape(-1, dim))
    return client._run(call)  # noqa: SLF001 - the SDK's own retrying call, for a model it has no method for


def _search(client: LookalikeClient, index: ProductIndex, query: Query, top_k: int, fusion: str, dim: int) -> Outcome:
    """One query: its views from the server, searched and fused in process as `product_search` does."""
    if query.data is None:
        return Outcome(query, error=query.error)
    try:
        embeddings = query_views(client, query.data, dim)
    except LookalikeError as exc:
        return Outcome(query, error=f"{type(exc).__name__}: {exc}")
    ids, scores = search_views(index, embeddings, len(embeddings), top_k, fusion)
    return Outcome(query, ids[0], scores[0].tolist(), views=len(embeddings))


def _throughput(client: LookalikeClient, images: list[bytes], concurrency: int, top_k: int) -> dict | None:
    if not images:
        return None
    errors = 0

    def one(data: bytes) -> None:
        nonlocal errors
        try:
            client.search(data, top_k=top_k)
        except LookalikeError:
            errors += 1

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, images))
    seconds = time.perf_counter() - started
    return {"concurrency": concurrency, "images": len(images), "errors": errors,
            "images_per_s": round(len(images) / seconds, 2)}


def _latency(client: LookalikeClient, images: list[bytes], top_k: int) -> dict | None:
    """visual_search one photo at a time: p50 and p90 in ms."""
    samples = []
    for data in images:
        started = time.perf_counter()
        try:
            client.search(data, top_k=top_k)
        except LookalikeError:
            continue
        samples.append((time.perf_counter() - started) * 1000)
    if not samples:
        return None
    return {"p50": round(statistics.median(samples), 1), "p90": round(float(np.percentile(samples, 90)), 1),
            "samples": len(samples)}


def _summary(outcomes: Sequence[Outcome], categories: dict[str, str]) -> dict:
    """Shopper photos (simulated and real) overall and by tag; near-duplicates apart (`near_duplicates`)."""
    everything = [o for o in outcomes if not o.query.left_out]
    near = [o for o in everything if o.query.tags.get("source") == NEAR_DUPLICATE]
    recall = [o for o in everything if o.query.tags.get("source") != NEAR_DUPLICATE]
    ranks = [o.rank() for o in recall]
    relevance = [(categories.get(o.query.product_id, ""), o.ids) for o in outcomes if o.query.left_out]
    return {
        "overall": retrieval_metrics(ranks),
        "near_duplicates": retrieval_metrics([o.rank() for o in near]) if near else None,
        "by_source": {source: retrieval_metrics([o.rank() for o in everything if o.query.tags.get("source", "simulated") == source])
                      for source in sorted({o.query.tags.get("source", "simulated") for o in everything})},
        "breakdown": breakdown([o.query.tags for o in recall], ranks),
        "category_relevance_left_out": category_precision(relevance, categories) if relevance else None,
        "failed": [{"query": o.query.name, "product_id": o.query.product_id, "error": o.error or o.query.error}
                   for o in outcomes if o.error or o.query.error],
    }


# --- reports --------------------------------------------------------------------------------------

def _fmt(value: Any) -> str:
    return "-" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))


def render_markdown(report: dict) -> str:
    served, base = report["served"], report["colour_histogram_baseline"]
    lines = [f"# lookalike eval: {report['catalog']}", ""]
    e = report["embedder"]
    lines += [f"Embedder `{e['model']}` ({e['weights_source']}), fingerprint `{e['fingerprint']}`."
              + (" **RANDOM WEIGHTS: meaningless.**" if e.get("random_weights") else ""),
              f"Query preprocessing: `{json.dumps(report['preprocessing']['query'])}`; "
              f"{report['query_views']['views']} query view(s) ({', '.join(report['query_views']['names'])}), "
              f"fused by {report['query_views']['fusion']}.",
              f"Catalog preprocessing: `{json.dumps(report['preprocessing']['catalog'])}`.",
              f"Catalog views (extra vectors per product): `{json.dumps(report['catalog_views'])}`.",
              f"Index: {report['products']['indexed']} products, {len(report['products']['left_out'])} left out "
              f"for category relevance; {len(report['products']['skipped'])} catalog rows skipped.", ""]
    lines += ["| | queries | recall@1 | recall@5 | recall@10 | MRR | same-category precision@10 (left-out products) |",
              "|---|---|---|---|---|---|---|"]
    for name, summary in (("served `visual_search`", served), ("colour-histogram baseline", base)):
        o, cp = summary["overall"], summary["category_relevance_left_out"] or {}
        lines.append(f"| {name} | {o['queries']} | {_fmt(o['recall@1'])} | {_fmt(o['recall@5'])} | {_fmt(o['recall@10'])} "
                     f"| {_fmt(o['mrr'])} | {_fmt(cp.get('precision@10'))} |")
        near = summary.get("near_duplicates")
        if near:
            lines.append(f"| ... near-duplicates (re-shot packshots), apart | {near['queries']} | {_fmt(near['recall@1'])} "
                         f"| {_fmt(near['recall@5'])} | {_fmt(near['recall@10'])} | {_fmt(near['mrr'])} | |")
    lines.append("")
    for dimension, groups in served["breakdown"].items():
        lines += [f"**By {dimension}** (served; baseline recall@1 in brackets)", "",
                  "| " + dimension + " | queries | recall@1 | recall@5 | recall@10 | MRR |", "|---|---|---|---|---|---|"]
        base_groups = base["breakdown"].get(dimension, {})
        for value, m in groups.items():
            b = base_groups.get(value, {}).get("recall@1")
            lines.append(f"| {value} | {m['queries']} | {_fmt(m['recall@1'])} ({_fmt(b)}) | {_fmt(m['recall@5'])} "
                         f"| {_fmt(m['recall@10'])} | {_fmt(m['mrr'])} |")
        lines.append("")
    t = report["timing"]
    if t["latency_ms_concurrency_1"]:
        lines.append(f"Latency at concurrency 1: p50 {t['latency_ms_concurrency_1']['p50']} ms, "
                     f"p90 {t['latency_ms_concurrency_1']['p90']} ms.")
    if t["throughput"]:
        lines.append(f"Throughput: {t['throughput']['images_per_s']} img/s with {t['throughput']['concurrency']} "
                     f"concurrent clients ({t['throughput']['errors']} errors).")
    failed = served["failed"]
    lines += ["", f"**Queries that failed to load or were refused: {len(failed)}** (counted as misses)"]
    lines += [f"- {f['query']} ({f['product_id']}): {f['error']}" for f in failed[:50]]
    if report["backgrounds"]:
        lines += ["", f"Backgrounds: {', '.join(report['backgrounds']['used'])}; not used because they look like a "
                      f"catalog image: {', '.join(report['backgrounds']['dropped_as_catalog_lookalikes']) or 'none'}."]
    before, after = report["served_index"]["before"], report["served_index"]["after"]
    lines += ["", f"Served index: version {before['version']} ({before['products']} products) before the run, "
                  f"version {after['version']} ({after['products']} products) after it; the evaluation index was "
                  f"searched in process. {report['seconds']} s."]
    return "\n".join(lines) + "\n"


def render_failures_html(report: dict, limit: int) -> str:
    by_id: dict[str, CatalogItem] = report["_by_id"]
    outcomes = [o for o in report["_outcomes"] if not o.query.left_out and o.rank() != 1]
    outcomes.sort(key=lambda o: (o.rank() is not None, -(o.rank() or 0)))
    thumbs: dict[str, str | None] = {}

    def product(pid: str) -> str | None:
        if pid not in thumbs:
            item = by_id.get(pid)
            thumbs[pid] = thumbnail_uri(item.image, 150) if item else None
        return thumbs[pid]

    rows = []
    for o in outcomes[:limit]:
        q = o.query
        rank = o.rank()
        tags = ", ".join(f"{k} {v}" for k, v in q.tags.items())
        head = figure(thumbnail_uri(q.data, 150), f"<b>query</b> {html.escape(q.name)}<br>{html.escape(tags)}", "query")
        want = figure(product(q.product_id), f"<b>wanted</b> {html.escape(q.product_id)}<br>"
                      + (f"rank {rank}" if rank else "not in top results"), "wanted")
        error = o.error or q.error
        found = (f'<p class="error">{html.escape(error)}</p>' if error else
                 "".join(figure(product(pid), f"#{i + 1} {html.escape(pid)}<br>{score:.3f}")
                         for i, (pid, score) in enumerate(zip(o.ids[:5], o.scores[:5]))))
        rows.append(f"<section>{head}{want}<div class='found'>{found}</div></section>")
    overall = report["served"]["overall"]
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>lookalike eval: worst failures</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; }}
section {{ display: flex; gap: 1em; border-bottom: 1px solid #ddd; padding: .8em 0; align-items: flex-start; }}
.found {{ display: flex; gap: .5em; flex-wrap: wrap; }}
figure {{ margin: 0; width: 150px; font-size: 11px; text-align: center; overflow-wrap: anywhere; }}
img {{ max-width: 150px; max-height: 150px; border: 1px solid #eee; }}
.query img {{ border: 2px solid #36c; }} .wanted img {{ border: 2px solid #2a2; }}
.error {{ color: #b00; }}
</style></head><body>
<h1>Worst failures ({min(limit, len(outcomes))} of {len(outcomes)} queries not answered first)</h1>
<p>recall@1 {_fmt(overall['recall@1'])}, recall@5 {_fmt(overall['recall@5'])} over {overall['queries']} queries.
Sorted: failed or not found first, then by how far down the right product came.</p>
{''.join(rows)}
</body></html>
"""


def write_reports(report: dict, out: Path, failures: int) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    serialisable = {k: v for k, v in report.items() if not k.startswith("_")}
    paths = [out / "eval.json", out / "eval.md", out / "failures.html"]
    paths[0].write_text(json.dumps(serialisable, indent=2) + "\n")
    paths[1].write_text(render_markdown(report))
    paths[2].write_text(render_failures_html(report, failures))
    return paths
