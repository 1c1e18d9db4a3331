"""The `lookalike` command: serve | export | engine | index | query | similar | eval | sample-catalog.

Every subcommand is a thin layer over a `lookalike` module, except `export`, which this CLI dispatches
to the export package (`lookalike_export.cli`, torch imported only when it runs): that dispatch is the
one import from `lookalike` into `lookalike_export`, which itself builds on `lookalike`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from lookalike.indexing.repository import KEEP_VERSIONS, Repository, default_repository
from lookalike_client import contract as c


def printable(text: str) -> str:
    """`text` safe to print to a terminal: control characters (ANSI escapes, carriage returns),
    bidirectional overrides and other invisible format characters (Unicode categories Cc, Cf, Zl,
    Zp) are shown as escapes, so that a catalog's ids cannot rewrite or reorder what is shown."""
    import unicodedata

    return "".join(
        (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") else ch
        for ch in text
    )


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _add_repository(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-repository", type=Path, default=default_repository(),
                        help="Triton model repository (default: $LOOKALIKE_MODEL_REPOSITORY or ./model_repository)")


def _add_url(parser: argparse.ArgumentParser, protocol: bool = False) -> None:
    parser.add_argument("--url", default=None, help="server address host:port (default localhost:8001 for gRPC, :8000 for HTTP)")
    if protocol:
        parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--category", default=None, help="only products of this category (unknown: no results)")
    parser.add_argument("--exclude", action="append", default=[], metavar="PRODUCT_ID",
                        help="never this product (repeatable)")


def _search_backend_choice(args: argparse.Namespace, command: str) -> dict[str, str] | None:
    """product_search's search-backend parameters from --search-backend/--milvus-uri/--milvus-collection
    (None when --search-backend is not given); ValueError naming a bad value."""
    from lookalike.indexing.model_configs import search_backend_parameters

    if args.search_backend is None:
        if args.milvus_uri or args.milvus_collection:
            raise ValueError(f"{command}: --milvus-uri and --milvus-collection go with --search-backend milvus")
        return None
    return search_backend_parameters(args.search_backend, args.milvus_uri, args.milvus_collection)


def set_search_backend(repository: Repository, values: dict[str, str]) -> bool:
    """Writes the search backend into product_search/config.pbtxt, where every load of the model reads it
    (a later `lookalike index` reload, the supervisor's restarts): returns whether it changed. On a
    read-only repository that says otherwise, OSError says what to do."""
    from lookalike.indexing.model_configs import CONFIG_FILE, write_parameters

    path = repository.search_dir / CONFIG_FILE
    try:
        return write_parameters(path, values)
    except OSError as exc:
        wanted = ", ".join(f"{k} {v!r}" for k, v in values.items())
        raise OSError(f"cannot write {path} ({exc.strerror or exc}): the repository is read-only; set {wanted} "
                      "in that file where the repository is built (the image, the volume)") from None


def _add_search_backend(parser: argparse.ArgumentParser, serve: bool) -> None:
    where = ("written into product_search/config.pbtxt, which every later load reads" if serve else
             "default: what product_search/config.pbtxt of --model-repository says")
    parser.add_argument("--search-backend", choices=c.SEARCH_BACKENDS, default=None,
                        help=f"faiss (the index files in the model repository) or milvus (a Milvus collection); {where}")
    parser.add_argument("--milvus-uri", default=None,
                        help=f"the Milvus server, e.g. http://milvus:19530 (token: ${c.MILVUS_TOKEN_ENV})")
    parser.add_argument("--milvus-collection", default=None,
                        help="the alias that names the served collection (default lookalike)")


def milvus_target(args: argparse.Namespace, repository: Repository):
    """Where `lookalike index` writes: --search-backend/--milvus-uri/--milvus-collection, else what
    product_search/config.pbtxt of the repository says (the servers read the same file). None: faiss."""
    from lookalike.indexing.model_configs import CONFIG_FILE, parameters, read

    chosen = _search_backend_choice(args, "lookalike index")
    if chosen is None:
        try:
            chosen = parameters(read(repository.search_dir / CONFIG_FILE))
        except OSError:
            chosen = {}
    if (chosen.get("search_backend") or "faiss") != "milvus":
        return None
    from lookalike.indexing.milvus_publish import MilvusTarget
    from lookalike.serving.milvus_search import MilvusSettings

    return MilvusTarget(MilvusSettings.from_params(chosen), partition_key=args.category_partition)


def cmd_serve(args: argparse.Namespace) -> int:
    from lookalike.server.launcher import LaunchError, ServerOptions
    from lookalike.server.serve import serve_forever

    try:
        backend = _search_backend_choice(args, "lookalike serve")
        if backend is not None and set_search_backend(Repository(args.model_repository), backend):
            print(f"lookalike serve: {c.SEARCH_MODEL} searches with {backend['search_backend']}"
                  + (f" at {backend['milvus_uri']}" if "milvus_uri" in backend else "")
                  + " (written into its config.pbtxt)", file=sys.stderr)
    except (ValueError, OSError) as exc:
        print(f"lookalike serve: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1

    options = ServerOptions(
        model_repository=args.model_repository, host=args.host, http_port=args.http_port,
        grpc_port=args.grpc_port, metrics_port=args.metrics_port, health_port=args.health_port or None,
        tritonserver=args.tritonserver,
        model_config_name=args.model_config_name, log_verbose=args.log_verbose,
        restrict_admin=True if args.require_admin_key else None,
    )
    try:
        return serve_forever(options)
    except (LaunchError, FileNotFoundError, ValueError) as exc:
        print(f"lookalike serve: {exc}", file=sys.stderr)
        return 1


def _client(args: argparse.Namespace):
    from lookalike_client import LookalikeClient

    protocol = getattr(args, "protocol", "grpc")
    url = args.url or ("localhost:8001" if protocol == "grpc" else "localhost:8000")
    return LookalikeClient(url, protocol=protocol, timeout_s=args.timeout)


def cmd_index(args: argparse.Namespace) -> int:
    from contextlib import ExitStack

    from lookalike.indexing.indexer import index_catalog
    from lookalike_client import LookalikeClient, LookalikeError

    repository = Repository(args.model_repository)
    if args.rollback == (args.catalog is not None):
        print("lookalike index: give a CATALOG, or --rollback alone", file=sys.stderr)
        return 2
    urls = args.url or ["localhost:8001"]
    try:
        milvus = milvus_target(args, repository)
        with ExitStack() as stack:
            clients = [stack.enter_context(LookalikeClient(url, timeout_s=args.timeout)) for url in urls]
            if args.rollback and milvus is not None:
                from lookalike.indexing.milvus_index import MilvusWriter
                from lookalike.indexing.milvus_publish import rollback_milvus

                with MilvusWriter(milvus.settings) as writer:
                    old, now = rollback_milvus(writer, clients)
                print(f"rolled back: alias {milvus.settings.alias} names generation {now} again (generation {old} is "
                      "marked rejected); confirmed by " + ("each server" if len(clients) > 1 else "the server"))
                return 0
            if args.rollback:
                from lookalike.indexing.publishing import rollback_index

                old, now = rollback_index(repository, clients)
                where = f" on {len(clients)} servers" if len(clients) > 1 else ""
                print(f"rolled back: {c.SEARCH_MODEL} serves version {now} again{where} (version {old} set aside in "
                      f"{repository.rejected_dir})")
                return 0
            options = {"hnsw_m": args.hnsw_m, "ef_search": args.ef_search, "nlist": args.nlist, "m": args.m,
                       "nprobe": args.nprobe}
            report = index_catalog(args.catalog, repository, clients, index=args.index, index_options=options,
                                   factory=args.index_factory, batch_size=args.batch_size,
                                   concurrency=args.concurrency, progress=not args.quiet, reuse=not args.full,
                                   keep_versions=args.keep_versions, milvus=milvus)
    except (LookalikeError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(printable(f"lookalike index: {exc}"), file=sys.stderr)
        return 1
    for problem in report.problems:
        print(printable(f"skipped {problem}"), file=sys.stderr)
    if report.index is not None:
        search = "".join(f", {k} {v}" for k, v in report.index.search.items())
        print(f"index: {report.index.kind} ({report.index.factory}{search}): {report.index.reason}")
    since = f"since version {report.previous}" if report.previous is not None else "(first version)"
    print(f"changes {since}: {report.added} added, {report.changed} changed, {report.removed} removed, "
          f"{report.recategorized} recategorized; images: {report.reused} reused, {report.embedded} embedded, "
          f"{report.failed} failed")
    if len(report.embedded_by) > 1:
        print(printable("embedded per server: " + ", ".join(f"{url} {n}" for url, n in report.embedded_by.items())))
    for url in report.went_away:
        print(printable(f"the server at {url} went away while embedding: the others embedded its batches; it was "
                        "serving again before the new version was written"), file=sys.stderr)
    if report.milvus is not None:
        written = report.milvus
        how = (f"as generation {written.generation}, a new collection the alias now names" if written.full else
               f"into generation {written.generation} in place: {written.upserted} rows upserted, {written.deleted} deleted")
        print(f"indexed {report.products} products ({report.images} images, {report.vectors} vectors, "
              f"{len(report.problems)} rows skipped) in {report.seconds:.1f} s {how}")
        print(printable(f"{c.SEARCH_MODEL} searches Milvus alias {milvus.settings.alias if milvus else '?'}: generation "
                        f"{written.generation}, state {written.state_id}, {written.products} products (confirmed by "
                        + ("each server" if len(report.servers) > 1 else "the server") + ")"))
        if written.dropped:
            print(f"dropped generation(s) {', '.join(map(str, written.dropped))} (the newest {args.keep_versions} are kept)")
        return 0
    print(f"indexed {report.products} products ({report.images} images, {report.vectors} vectors, "
          f"{len(report.problems)} rows skipped) in {report.seconds:.1f} s as index version {report.version}")
    on = f" on {len(report.servers)} servers ({', '.join(report.servers)})" if len(report.servers) > 1 else ""
    confirmed = "confirmed by each server" if len(report.servers) > 1 else "confirmed by the server"
    if report.superseded_by is not None:
        print(printable(f"{c.SEARCH_MODEL} loaded version {report.version}{on}, and now serves version {report.superseded_by}, "
                        f"which another `lookalike index` published meanwhile ({confirmed})"))
    else:
        print(printable(f"{c.SEARCH_MODEL} now serves version {report.version}{on} ({report.products} products; {confirmed})"))
    if report.pruned:
        print(f"removed index version(s) {', '.join(map(str, report.pruned))} (the newest {args.keep_versions} are kept)")
    for version, servers in sorted(report.kept_for.items()):
        print(printable(f"kept index version {version}: still served by {'; '.join(map(str, servers))}"))
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from lookalike.serving.index_files import load_products
    from lookalike_client import LookalikeError

    products = {}
    latest = Repository(args.model_repository).latest_index_dir()
    if latest is not None:  # categories and images for display, when the index is local
        try:
            products = {p.product_id: p for p in load_products(latest)}
        except (OSError, ValueError, KeyError):
            products = {}
    failed = 0
    similar = args.command == "similar"
    with _client(args) as client:
        def one(query: str):
            try:
                if similar:
                    found = client.similar(query, top_k=args.top_k, category=args.category, exclude_ids=args.exclude)
                else:
                    found = client.search(query, top_k=args.top_k, category=args.category, exclude_ids=args.exclude)
                return query, [(m.rank, m.product_id, m.score) for m in found]
            except LookalikeError as exc:  # the server's reason, without Triton's "in ensemble 'X', " prefix
                return query, f"{type(exc).__name__}: {exc.detail}"
            except OSError as exc:
                return query, f"{type(exc).__name__}: {exc}"

        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(one, args.product_ids if similar else args.images))
    for path, matches in results:
        print(f"\n{printable(path)}")
        if isinstance(matches, str):
            failed += 1
            print(f"  error: {printable(matches)}")
            continue
        for rank, product_id, score in matches:
            category = products[product_id].category if product_id in products else ""
            print(f"  {rank:>3}  {printable(product_id):<40} {score:.4f}  {printable(category)}")
    if getattr(args, "html", None):
        from lookalike.quality.report import render

        Path(args.html).write_text(render(results, products))
        print(f"\nwrote {Path(args.html).resolve()}")
    return 1 if failed else 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lookalike.indexing.publishing import PublishError
    from lookalike.quality.evaluation import EvalOptions, run_eval, write_reports
    from lookalike_client import LookalikeError

    simulate = args.simulate if (args.simulate is not None or args.queries) else 1
    options = EvalOptions(catalog=args.catalog, queries_csv=args.queries, simulate=simulate or 0,
                          sample=args.sample, leave_out=args.leave_out, seed=args.seed, top_k=args.top_k,
                          concurrency=args.concurrency, failures=args.failures, near_duplicates=args.near_duplicates)
    try:
        with _client(args) as client:
            report = run_eval(options, Repository(args.model_repository), client)
    except (LookalikeError, PublishError, OSError, ValueError, RuntimeError) as exc:
        print(printable(f"lookalike eval: {exc}"), file=sys.stderr)
        return 1
    paths = write_reports(report, args.out, options.failures)
    for line in paths[1].read_text().splitlines():
        print(printable(line))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def cmd_sample_catalog(args: argparse.Namespace) -> int:
    from lookalike.quality.sample_data import build_sample_catalog

    try:
        summary = build_sample_catalog(args.out, per_category=args.per_category)
    except FileNotFoundError as exc:
        print(f"lookalike sample-catalog: {exc}", file=sys.stderr)
        return 1
    print(f"sample catalog: {summary['products']} products in {summary['categories']} categories, "
          f"{summary['queries']} query photos not in the catalog -> {summary['path']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from lookalike_export import cli as export_cli  # the dispatch to the export package (see above)

    parser = argparse.ArgumentParser(prog="lookalike", description="similar-product image search on Triton")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="start tritonserver on the model repository")
    _add_repository(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; beyond it, "
                   f"model control needs ${c.ADMIN_KEY_ENV})")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--health-port", type=int, default=8003,
                   help="the supervisor's GET /ready, /live, /status (0: off). Point readiness probes here: "
                        "unlike Triton's, /ready turns 503 while a model process is dead or being replaced")
    p.add_argument("--require-admin-key", action="store_true",
                   help=f"require ${c.ADMIN_KEY_ENV} for model control and /status on loopback too (a host whose "
                        "other users reach loopback); beyond loopback it is always required")
    p.add_argument("--tritonserver", default=None, help="tritonserver binary (default: on PATH, else nvidia-pytriton's)")
    p.add_argument("--model-config-name", default=None,
                   help="serve configs/<name>.pbtxt where a model has one, e.g. 'onnxruntime' in the NGC image")
    p.add_argument("--log-verbose", type=int, default=0)
    _add_search_backend(p, serve=True)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="export an embedder to ONNX into the model repository")
    _add_repository(p)
    export_cli.add_arguments(p)
    p.set_defaults(func=export_cli.run)

    p = sub.add_parser("engine", help="build the embedder's TensorRT engine from its exported model.onnx "
                       "(on a GPU with TensorRT: make engine), gated, fingerprint unchanged")
    _add_repository(p)
    export_cli.add_engine_arguments(p)
    p.set_defaults(func=export_cli.run_engine)

    p = sub.add_parser("index", help="embed a catalog through the server and serve it as a new index version "
                       "(incremental: unchanged images are not embedded again), or --rollback")
    p.add_argument("catalog", type=Path, nargs="?", default=None,
                   help="CSV product_id,image[,category] or a folder of category folders")
    p.add_argument("--rollback", action="store_true",
                   help="serve the previous index version again (the newest is set aside), instead of indexing")
    p.add_argument("--full", action="store_true", help="embed every image again, even those the store holds")
    p.add_argument("--keep-versions", type=_at_least_one, default=KEEP_VERSIONS,
                   help=f"index versions kept on disk, the new one included (default {KEEP_VERSIONS}: one step of --rollback); "
                        "older ones are deleted, except a version that another lookalike serve on this repository "
                        "still serves")
    _add_repository(p)
    p.add_argument("--url", action="append", default=None, metavar="HOST:PORT",
                   help="a server's gRPC address (default localhost:8001). Repeat it for several servers on this "
                   "repository (a shared volume): the batches are spread over all of them, and each must load and "
                   "confirm the new version, or none serves it; --rollback rolls back each")
    p.add_argument("--index", default="auto", choices=("auto", "flat", "hnsw", "ivf-pq"),
                   help="FAISS index: exact (flat), graph (hnsw) or compressed (ivf-pq); auto picks by catalog size")
    p.add_argument("--hnsw-m", type=int, default=None, help="hnsw: links per node (default 32)")
    p.add_argument("--ef-search", type=int, default=None,
                   help="hnsw: candidates explored per query (default 128, growing with sqrt(vectors) beyond 250,000: "
                   "256 at 10^6, at most 512; product_search's ef_search overrides)")
    p.add_argument("--nlist", type=int, default=None, help="ivf-pq: k-means cells (default about 4 sqrt(vectors))")
    p.add_argument("--m", type=int, default=None, help="ivf-pq: bytes per vector, a divisor of the dim (default dim/16)")
    p.add_argument("--nprobe", type=int, default=None,
                   help="ivf-pq: cells searched per query (default 32; product_search's nprobe overrides)")
    p.add_argument("--index-factory", default=None, help="expert: a FAISS index_factory string (inner product), "
                   "instead of --index")
    _add_search_backend(p, serve=False)
    p.add_argument("--category-partition", action="store_true",
                   help="milvus: a new generation with category as its partition key, for catalogs whose searches are "
                        "mostly filtered by category (see docs/beyond-one-machine.md)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--concurrency", type=_at_least_one, default=4, help="embedding requests in flight per server (default 4)")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("query", help="find the catalog products most similar to photos")
    p.add_argument("images", nargs="+")
    p.add_argument("--top-k", type=int, default=c.DEFAULT_TOP_K)
    _add_url(p, protocol=True)
    _add_repository(p)
    p.add_argument("--html", default=None, help="write a page with thumbnails of queries and results")
    p.add_argument("--timeout", type=float, default=30.0)
    _add_filters(p)
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("similar", help="catalog products most similar to catalog products (no photo): "
                       "\"customers also viewed\"")
    p.add_argument("product_ids", nargs="+")
    p.add_argument("--top-k", type=int, default=c.DEFAULT_TOP_K)
    _add_url(p, protocol=True)
    _add_repository(p)
    p.add_argument("--timeout", type=float, default=30.0)
    _add_filters(p)
    p.set_defaults(func=cmd_query)

    p = sub.add_parser(
        "eval", help="recall of shopper photos through the running server (simulated and/or real); changes nothing it serves",
        description="Recall of shopper photos through the running server. The catalog is embedded by embed_image, each "
        "query's views by preprocess_query (visual_search's first step); the evaluation index (the catalog minus a few "
        "left-out products) is built and searched in this process with product_search's own code and fusion. The "
        "server's index, the repository's index versions and its embedding store are left exactly as they were: "
        "other clients see the whole catalog throughout. Latency and throughput are measured on visual_search.")
    p.add_argument("catalog", type=Path, help="the catalog the server should search (CSV or folder, as for index)")
    p.add_argument("--queries", type=Path, default=None, help="real shopper photos: CSV image,product_id")
    p.add_argument("--simulate", type=int, default=None,
                   help="synthetic shopper photos per sampled product (default 1 without --queries)")
    p.add_argument("--sample", type=int, default=200, help="products sampled for --simulate")
    p.add_argument("--leave-out", type=int, default=1,
                   help="products per category (of 5 or more) left out of the index, for category relevance")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--concurrency", type=int, default=4, help="clients of the throughput pass (0: skip it)")
    p.add_argument("--failures", type=int, default=40, help="worst failures shown in failures.html")
    p.add_argument("--near-duplicates", type=int, default=0,
                   help="indexed products whose re-shot packshot is also a query (reported apart from shopper photos)")
    p.add_argument("--out", type=Path, default=Path("results/eval"))
    _add_url(p, protocol=True)
    _add_repository(p)
    p.add_argument("--timeout", type=float, default=60.0)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sample-catalog", help="build the demo catalog from images that installed packages ship")
    p.add_argument("--out", type=Path, default=Path("data/sample_catalog"))
    p.add_argument("--per-category", type=int, default=45)
    p.set_defaults(func=cmd_sample_catalog)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
