"""The `lookalike` command: serve | export | engine | index | query | similar | eval | sample-catalog |
info | health.

Every subcommand is a thin layer over a `lookalike` module. `export` and `engine` are not defined here:
they come from the export package (`lookalike_export.cli`), which registers them through the entry-point
group `lookalike.commands` (pyproject.toml). This package never imports `lookalike_export`, which itself
builds on `lookalike`: `main` finds whatever registered itself, and without it (the export package not
installed) `lookalike --help` still works and `lookalike export` says what is missing.

Help: every flag says what it does, with its unit, and its default (`HelpFormatter`). Renamed flags keep
their old spelling, hidden from --help, with a deprecation warning on stderr (`deprecated_alias`).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import Any, Callable

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


def version() -> str:
    """The installed distribution's version, else (run from a checkout without installing) the package's."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as distribution_version

    try:
        return distribution_version("lookalike")
    except PackageNotFoundError:
        from lookalike import __version__

        return __version__


_SAYS_DEFAULT = re.compile(r"\bdefault\b")


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, with " (default: X)" after the help of each flag whose help does not say its
    default itself. A default of None, of a switch (False) or an empty list is never shown as such: the
    help of such a flag says what leaving it out means."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default is argparse.SUPPRESS or default == []
                or "%(default)" in text or _SAYS_DEFAULT.search(text)
                or not (action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE))):
            return text
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that shows defaults (`HelpFormatter`); its subcommands' parsers are Parsers too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


class _Deprecated(argparse.Action):
    """The old spelling of a renamed flag: stores into the new flag's dest, warning on stderr."""

    def __init__(self, option_strings: list[str], dest: str, instead: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.instead = instead

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"{parser.prog}: {option_string} is deprecated; use {self.instead}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def deprecated_alias(parser: argparse.ArgumentParser, old: str, new: argparse.Action) -> None:
    """Accepts `old` as a deprecated spelling of the flag `new` (what add_argument returned): the same
    dest, type and choices, hidden from --help, and a warning on stderr when it is used."""
    typed: dict[str, Any] = {"type": new.type} if new.type is not None else {}
    parser.add_argument(old, dest=new.dest, choices=new.choices, metavar=new.metavar, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS, action=_Deprecated, instead=new.option_strings[0], **typed)


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _host_port(text: str) -> str:
    """HOST:PORT (or http://HOST:PORT), the port a number."""
    host, _, port = text.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return text


def add_repository_argument(parser: argparse.ArgumentParser, what: str = "") -> None:
    """--model-repository, the Triton model repository (`what`: what the command does with it)."""
    parser.add_argument("--model-repository", type=Path, default=default_repository(), metavar="DIR",
                        help="the Triton model repository" + (f": {what}" if what else "")
                        + " (default: $LOOKALIKE_MODEL_REPOSITORY, else ./model_repository)")


DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}


def _add_server(parser: argparse.ArgumentParser, timeout_s: float, repeatable: bool = False) -> None:
    """--url, --protocol and --timeout: the server to call, as `query` and the others do."""
    if repeatable:
        parser.add_argument("--url", action="append", default=None, metavar="HOST:PORT",
                            help="a server's address, its gRPC or HTTP port per --protocol (default: localhost:8001 "
                                 "for grpc, localhost:8000 for http). Repeat it for several servers on this repository "
                                 "(a shared volume): the batches are spread over all of them, and each must load and "
                                 "confirm the new version, or none serves it; --rollback rolls back each")
    else:
        parser.add_argument("--url", default=None, metavar="HOST:PORT",
                            help="the server's address, its gRPC or HTTP port per --protocol (default: localhost:8001 "
                                 "for grpc, localhost:8000 for http)")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc",
                        help="talk to the server over gRPC or HTTP/REST, KServe v2 either way")
    parser.add_argument("--timeout", type=float, default=timeout_s, metavar="SECONDS",
                        help="seconds each call to the server may take, its retries included")


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--category", default=None,
                        help="only products of this category (an unknown one: no results; default: every category)")
    parser.add_argument("--exclude", action="append", default=[], metavar="PRODUCT_ID",
                        help="never this product (repeatable; default: none excluded)")


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
    where = ("written into product_search/config.pbtxt, which every later load reads (default: as that file says)"
             if serve else "default: what product_search/config.pbtxt of --model-repository says")
    parser.add_argument("--search-backend", choices=c.SEARCH_BACKENDS, default=None,
                        help=f"faiss (the index files in the model repository) or milvus (a Milvus collection); {where}")
    parser.add_argument("--milvus-uri", default=None, metavar="URI",
                        help=f"the Milvus server as pymilvus takes it, e.g. http://milvus:19530 (token: ${c.MILVUS_TOKEN_ENV}); "
                             "needed with --search-backend milvus (default: none)")
    parser.add_argument("--milvus-collection", default=None, metavar="ALIAS",
                        help="the alias that names the served collection (default: lookalike)")


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
    return LookalikeClient(args.url or DEFAULT_URLS[protocol], protocol=protocol, timeout_s=args.timeout)


def cmd_index(args: argparse.Namespace) -> int:
    from contextlib import ExitStack

    from lookalike.indexing.indexer import index_catalog
    from lookalike_client import LookalikeClient, LookalikeError

    repository = Repository(args.model_repository)
    if args.rollback == (args.catalog is not None):
        print("lookalike index: give a CATALOG, or --rollback alone", file=sys.stderr)
        return 2
    urls = args.url or [DEFAULT_URLS[args.protocol]]
    try:
        milvus = milvus_target(args, repository)
        with ExitStack() as stack:
            clients = [stack.enter_context(LookalikeClient(url, protocol=args.protocol, timeout_s=args.timeout))
                       for url in urls]
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
            options = {"hnsw_m": args.hnsw_m, "ef_search": args.hnsw_ef_search, "nlist": args.ivfpq_nlist,
                       "m": args.ivfpq_m, "nprobe": args.ivfpq_nprobe}
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
                          concurrency=args.throughput_clients, failures=args.failures, near_duplicates=args.near_duplicates)
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


def _unreachable(command: str, args: argparse.Namespace, exc: Exception) -> int:
    url = args.url or DEFAULT_URLS[args.protocol]
    print(printable(f"lookalike {command}: the server at {url} ({args.protocol}) did not answer: "
                    f"{type(exc).__name__}: {exc}"), file=sys.stderr)
    return 1


def cmd_info(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from lookalike_client import LookalikeError

    try:
        with _client(args) as client:
            info = client.info()
    except (LookalikeError, OSError, ValueError) as exc:
        return _unreachable("info", args, exc)
    if args.json:
        print(json.dumps(dataclasses.asdict(info), indent=1))
        return 0
    rows = [
        ("server", f"{info.url} ({info.protocol})"),
        ("tritonserver", info.server_version + (f" (id {info.server_id})" if info.server_id else "")),
        ("index", f"version {info.index_version}: {info.products:,} products, {info.index_kind}"
                  + (f" (id {info.index_id})" if info.index_id else "")),
        ("search", info.backend + (f" on {info.device}" if info.device and info.device != info.backend else "")),
        ("embedder", f"{info.embedder_model}, dim {info.dim}, fingerprint {info.embedder_fingerprint}"),
        ("models", ", ".join(f"{name} {'ready' if ok else 'NOT READY'}" for name, ok in info.models.items())),
    ]
    for name, value in rows:
        print(printable(f"{name:<13} {value}"))
    return 0


def supervisor_ready(address: str, timeout_s: float) -> tuple[bool, str]:
    """GET /ready of `lookalike serve`'s supervisor at HOST:PORT (its --health-port): whether it answered
    200, and what it said (its reason, or why it could not be asked). Never through a proxy."""
    import json
    import urllib.error
    import urllib.request

    url = (address if "://" in address else f"http://{address}").rstrip("/") + "/ready"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout_s) as answer:
            status, body = answer.status, answer.read(1 << 16)
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read(1 << 16)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return False, f"{url} did not answer: {getattr(exc, 'reason', exc)}"
    try:
        reason = str(json.loads(body).get("reason", ""))
    except (ValueError, AttributeError):
        reason = body[:200].decode("utf-8", "replace")
    return status == 200, f"{url}: HTTP {status}" + (f", {reason}" if reason else "")


def cmd_health(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    try:
        with _client(args) as client:
            health = client.health()
    except (OSError, ValueError) as exc:  # health() itself never raises: the client could not be made
        return _unreachable("health", args, exc)
    supervisor = supervisor_ready(args.supervisor, args.timeout) if args.supervisor else None
    healthy = health.ok and (supervisor is None or supervisor[0])
    if args.json:
        out: dict[str, Any] = {"healthy": healthy, "server": {**dataclasses.asdict(health), "ok": health.ok}}
        if supervisor is not None:
            out["supervisor"] = {"address": args.supervisor, "ready": supervisor[0], "answer": supervisor[1]}
        print(json.dumps(out, indent=1))
        return 0 if healthy else 1
    print(printable(f"server       {args.url or DEFAULT_URLS[args.protocol]} ({args.protocol})"))
    if health.error:
        print(printable(f"live         NO: {health.error}"))
    else:
        print(f"live         {'yes' if health.live else 'NO'}")
        print("models       " + ", ".join(f"{name} {'ready' if ok else 'NOT READY'}" for name, ok in health.models.items()))
        print(f"triton ready {'yes' if health.ready else 'no'} (Triton's server readiness, not used here: it also "
              "counts models on their way out, so it dips while an index reload unloads the old version)")
    if supervisor is not None:
        print(printable(f"supervisor   {'ready' if supervisor[0] else 'NOT READY'}: {supervisor[1]}"))
    if healthy:
        print("healthy      yes: live and every model ready" + (", the supervisor ready" if supervisor is not None else ""))
    else:
        why = ["not live"] if not health.live else [f"{name} not ready" for name, ok in health.models.items() if not ok]
        if supervisor is not None and not supervisor[0]:
            why.append("the supervisor not ready")
        print("healthy      NO: " + ", ".join(why))
    if supervisor is None:
        print("(for load balancers and probes, trust the supervisor's /ready over Triton's readiness: "
              "lookalike health --supervisor HOST:8003, the --health-port of lookalike serve)", file=sys.stderr)
    return 0 if healthy else 1


# -- the parser ----------------------------------------------------------------------------------

# `lookalike --help` lists the commands in this order; commands that other packages register (entry
# points of COMMANDS_GROUP) and that are not named here come after, by name.
COMMAND_ORDER = ("serve", "export", "engine", "index", "query", "similar", "eval", "sample-catalog", "info", "health")
COMMANDS_GROUP = "lookalike.commands"
# Commands the export package registers: what `lookalike --help` says of them when it is not installed.
EXPORT_COMMANDS = {
    "export": "export an embedder to ONNX into the model repository",
    "engine": "build the embedder's TensorRT engine from its exported model.onnx",
}


def _register_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="start tritonserver on the model repository, under a supervisor",
                       description="Starts tritonserver on the model repository under a supervisor that restarts a dead "
                       "model process or server, and answers GET /ready, /live, /status on --health-port.")
    add_repository_argument(p, "what tritonserver serves")
    p.add_argument("--host", default="127.0.0.1",
                   help=f"bind address of every port (default: 127.0.0.1, loopback only; beyond loopback, model control "
                        f"and /status need ${c.ADMIN_KEY_ENV})")
    p.add_argument("--http-port", type=int, default=8000, metavar="PORT", help="Triton's HTTP/REST port (KServe v2)")
    p.add_argument("--grpc-port", type=int, default=8001, metavar="PORT", help="Triton's gRPC port (KServe v2)")
    p.add_argument("--metrics-port", type=int, default=8002, metavar="PORT",
                   help="Triton's Prometheus metrics port (GET /metrics)")
    p.add_argument("--health-port", type=int, default=8003, metavar="PORT",
                   help="the supervisor's GET /ready, /live, /status (0: off). Point readiness probes here: "
                        "unlike Triton's, /ready turns 503 while a model process is dead or being replaced")
    p.add_argument("--require-admin-key", action="store_true",
                   help=f"require ${c.ADMIN_KEY_ENV} for model control and /status on loopback too (a host whose "
                        "other users reach loopback); beyond loopback it is always required")
    p.add_argument("--tritonserver", default=None, metavar="PATH",
                   help="the tritonserver binary (default: tritonserver on PATH, else nvidia-pytriton's)")
    p.add_argument("--model-config-name", default=None, metavar="NAME",
                   help="serve configs/NAME.pbtxt where a model has one, e.g. 'onnxruntime' or 'tensorrt' in the NGC "
                        "image (default: each model's config.pbtxt)")
    p.add_argument("--log-verbose", type=int, default=0, metavar="LEVEL",
                   help="tritonserver's --log-verbose level (0: off; 1 or more: more detail)")
    _add_search_backend(p, serve=True)
    p.set_defaults(func=cmd_serve)


def _register_index(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "index", help="embed a catalog through the server and serve it as a new index version "
        "(incremental: unchanged images are not embedded again), or --rollback",
        description="Embeds a catalog through the running server(s) (--url: its embed_image model; incremental, "
        "images already embedded with the same embedder are not embedded again), builds the index here, and writes "
        "the new index version into the local --model-repository: the repository the server serves, so this machine "
        "must see it (the same path, or a volume shared with the server) with write access. Each server then loads "
        "the new version and confirms it, or none serves it. With the milvus search backend (--search-backend milvus, "
        "or product_search/config.pbtxt saying so) the vectors go to the Milvus collection instead, and the "
        "repository is only read (the embedder's manifest and preprocessing).")
    p.add_argument("catalog", type=Path, nargs="?", default=None,
                   help="CSV product_id,image[,category] (images relative to the CSV) or a folder of category folders; "
                        "default: none, for --rollback, which takes no catalog")
    p.add_argument("--rollback", action="store_true",
                   help="serve the previous index version again (the newest is set aside), instead of indexing")
    p.add_argument("--full", action="store_true", help="embed every image again, even those the store holds")
    p.add_argument("--keep-versions", type=_at_least_one, default=KEEP_VERSIONS, metavar="N",
                   help=f"index versions kept on disk, the new one included (default: {KEEP_VERSIONS}, one step of "
                        "--rollback); older ones are deleted, except a version that another lookalike serve on this "
                        "repository still serves")
    add_repository_argument(p, "the new index version is written into it (write access), unless the search backend is milvus")
    _add_server(p, timeout_s=60.0, repeatable=True)
    p.add_argument("--index", default="auto", choices=("auto", "flat", "hnsw", "ivf-pq"),
                   help="FAISS index: exact (flat), graph (hnsw) or compressed (ivf-pq); auto picks by catalog size")
    p.add_argument("--hnsw-m", type=int, default=None, metavar="LINKS", help="hnsw: links per node (default: 32)")
    new = p.add_argument("--hnsw-ef-search", type=int, default=None, metavar="CANDIDATES",
                         help="hnsw: candidates explored per query (default: 128, growing with sqrt(vectors) beyond "
                              "250,000: 256 at 10^6, at most 512; product_search's ef_search parameter overrides)")
    deprecated_alias(p, "--ef-search", new)
    new = p.add_argument("--ivfpq-nlist", type=int, default=None, metavar="CELLS",
                         help="ivf-pq: k-means cells (default: about 4 sqrt(vectors))")
    deprecated_alias(p, "--nlist", new)
    new = p.add_argument("--ivfpq-m", type=int, default=None, metavar="BYTES",
                         help="ivf-pq: bytes per vector (PQ sub-quantizers), a divisor of the embedding dim (default: dim/16)")
    deprecated_alias(p, "--m", new)
    new = p.add_argument("--ivfpq-nprobe", type=int, default=None, metavar="CELLS",
                         help="ivf-pq: cells searched per query (default: 32; product_search's nprobe parameter overrides)")
    deprecated_alias(p, "--nprobe", new)
    p.add_argument("--index-factory", default=None, metavar="FACTORY",
                   help="expert: a FAISS index_factory string (inner product), instead of --index (default: none)")
    _add_search_backend(p, serve=False)
    p.add_argument("--category-partition", action="store_true",
                   help="milvus: a new generation with category as its partition key, for catalogs whose searches are "
                        "mostly filtered by category (see docs/beyond-one-machine.md)")
    p.add_argument("--batch-size", type=_at_least_one, default=16, metavar="IMAGES",
                   help="images per embedding request")
    p.add_argument("--concurrency", type=_at_least_one, default=4, metavar="REQUESTS",
                   help="embedding requests in flight per server")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_index)


def _register_query(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("query", help="find the catalog products most similar to photos")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="photos to search with (image files; one request each)")
    p.add_argument("--top-k", type=int, default=c.DEFAULT_TOP_K, metavar="K",
                   help=f"products returned per photo ({c.MIN_TOP_K} to {c.MAX_TOP_K})")
    _add_server(p, timeout_s=30.0)
    add_repository_argument(p, "read for the categories shown next to the results, when the index is local")
    p.add_argument("--html", default=None, metavar="FILE",
                   help="write a page with thumbnails of queries and results to FILE (default: no page)")
    _add_filters(p)
    p.set_defaults(func=cmd_query)


def _register_similar(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("similar", help="catalog products most similar to catalog products (no photo): "
                       "\"customers also viewed\"")
    p.add_argument("product_ids", nargs="+", metavar="PRODUCT_ID", help="catalog products of the served index")
    p.add_argument("--top-k", type=int, default=c.DEFAULT_TOP_K, metavar="K",
                   help=f"products returned per product ({c.MIN_TOP_K} to {c.MAX_TOP_K})")
    _add_server(p, timeout_s=30.0)
    add_repository_argument(p, "read for the categories shown next to the results, when the index is local")
    _add_filters(p)
    p.set_defaults(func=cmd_query)


def _register_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="recall of shopper photos through the running server (simulated and/or real); changes nothing it serves",
        description="Recall of shopper photos through the running server. The catalog is embedded by embed_image, each "
        "query's views by preprocess_query (visual_search's first step); the evaluation index (the catalog minus a few "
        "left-out products) is built and searched in this process with product_search's own code and fusion. The "
        "server's index, the repository's index versions and its embedding store are left exactly as they were: "
        "other clients see the whole catalog throughout. Latency and throughput are measured on visual_search.")
    p.add_argument("catalog", type=Path, help="the catalog the server should search (CSV or folder, as for index)")
    p.add_argument("--queries", type=Path, default=None, metavar="CSV",
                   help="real shopper photos: CSV image,product_id (default: none, simulated photos only)")
    p.add_argument("--simulate", type=int, default=None, metavar="PHOTOS",
                   help="synthetic shopper photos per sampled product (default: 1 without --queries, 0 with it)")
    p.add_argument("--sample", type=int, default=200, metavar="PRODUCTS", help="products sampled for --simulate")
    p.add_argument("--leave-out", type=int, default=1, metavar="PRODUCTS",
                   help="products per category (of 5 or more) left out of the index, for category relevance")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed of the sampling and of the simulated photos: the same seed, the same queries")
    p.add_argument("--top-k", type=int, default=10, metavar="K", help="results per query scored (recall@1 to recall@K)")
    new = p.add_argument("--throughput-clients", type=int, default=4, metavar="CLIENTS",
                         help="concurrent clients of the throughput pass on visual_search (0: skip it)")
    deprecated_alias(p, "--concurrency", new)
    p.add_argument("--failures", type=int, default=40, metavar="QUERIES", help="worst failures shown in failures.html")
    p.add_argument("--near-duplicates", type=int, default=0, metavar="PRODUCTS",
                   help="indexed products whose re-shot packshot is also a query (reported apart from shopper photos)")
    p.add_argument("--out", type=Path, default=Path("results/eval"), metavar="DIR",
                   help="folder for eval.md, eval.json and failures.html")
    _add_server(p, timeout_s=60.0)
    add_repository_argument(p, "read only (the embedder's manifest and preprocessing, the served index)")
    p.set_defaults(func=cmd_eval)


def _register_sample_catalog(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample-catalog", help="build the demo catalog from images that installed packages ship")
    p.add_argument("--out", type=Path, default=Path("data/sample_catalog"), metavar="DIR",
                   help="folder written: catalog.csv, images/, queries/ and queries.csv")
    p.add_argument("--per-category", type=int, default=45, metavar="PRODUCTS", help="products per category")
    p.set_defaults(func=cmd_sample_catalog)


def _register_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="what the server serves: index version, products, index kind, embedder, models",
                       description="What the server serves, all from the server itself (the SDK's "
                       "LookalikeClient.info()): tritonserver's version, the served index version, its products and "
                       "kind, the search backend, the embedder and its fingerprint, and each model's readiness. "
                       "Exit status 1 when the server does not answer.")
    _add_server(p, timeout_s=10.0)
    p.add_argument("--json", action="store_true", help="print it as JSON")
    p.set_defaults(func=cmd_info)


def _register_health(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "health", help="whether the server is live with every model ready, and (--supervisor) the supervisor's /ready",
        description="The server's health from the SDK's LookalikeClient.health(): live, and each model ready. "
        "Triton's own server readiness is shown but not trusted: it dips while an index reload unloads the old version, "
        "and it stays 200 while a model process is dead. Operators (load balancers, readiness probes) should trust the "
        "supervisor's GET /ready instead: the one `lookalike serve` answers on its --health-port (8003 by default), "
        "503 while a model process is dead or being replaced. --supervisor HOST:PORT asks it too. "
        "Exit status 0 only when healthy (and, with --supervisor, the supervisor ready), else 1.")
    _add_server(p, timeout_s=10.0)
    p.add_argument("--supervisor", type=_host_port, default=None, metavar="HOST:PORT",
                   help="also GET /ready of lookalike serve's supervisor there (its --health-port, e.g. localhost:8003), "
                        "which operators should trust over Triton's readiness (default: not asked)")
    p.add_argument("--json", action="store_true", help="print it as JSON")
    p.set_defaults(func=cmd_health)


BUILTIN_COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "serve": _register_serve, "index": _register_index, "query": _register_query, "similar": _register_similar,
    "eval": _register_eval, "sample-catalog": _register_sample_catalog, "info": _register_info, "health": _register_health,
}


def command_plugins() -> dict[str, Callable[[argparse._SubParsersAction], Any] | str]:
    """The commands that installed packages register (entry points of COMMANDS_GROUP): each one's register
    function, or why it could not be loaded. A name that a built-in command has is ignored."""
    from importlib.metadata import entry_points

    found: dict[str, Callable[[argparse._SubParsersAction], Any] | str] = {}
    for point in entry_points(group=COMMANDS_GROUP):
        if point.name in found or point.name in BUILTIN_COMMANDS:
            continue
        try:
            found[point.name] = point.load()
        except Exception as exc:  # a broken plugin must not take `lookalike --help` down
            found[point.name] = f"{type(exc).__name__}: {exc}"
    return found


def _not_installed(name: str, why: str) -> str:
    return (f"lookalike {name}: not available here: {why}. `lookalike {name}` comes from the export package "
            f"(lookalike_export), which registers it as an entry point of the group {COMMANDS_GROUP!r}: install lookalike "
            "from its repository with the export extra, pip install -e '.[export]' (make setup does)")


def build_parser(plugins: dict[str, Callable[[argparse._SubParsersAction], Any] | str] | None = None,
                 ) -> tuple[argparse.ArgumentParser, dict[str, str]]:
    """The `lookalike` parser with the built-in commands and those `plugins` register (default: the installed
    entry points), and the commands that could not be registered, each with what to tell the user."""
    plugins = command_plugins() if plugins is None else plugins
    parser = Parser(prog="lookalike", description="Similar-product image search on NVIDIA Triton Inference Server. "
                    "`lookalike COMMAND --help` describes each command and its flags.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}",
                        help="print lookalike's version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    missing: dict[str, str] = {}
    names = list(COMMAND_ORDER) + sorted(set(plugins) - set(COMMAND_ORDER))
    for name in names:
        register = BUILTIN_COMMANDS.get(name) or plugins.get(name)
        if callable(register):
            try:
                register(sub)
                continue
            except Exception as exc:  # the plugin failed to register: as if it were not installed
                why = f"registering it failed ({type(exc).__name__}: {exc})"
        elif isinstance(register, str):
            why = f"its entry point could not be loaded ({register})"
        elif name in EXPORT_COMMANDS:
            why = f"no {COMMANDS_GROUP!r} entry point named {name!r} is installed"
        else:
            continue
        missing[name] = _not_installed(name, why)
        if name not in sub.choices:
            p = sub.add_parser(name, help=f"{EXPORT_COMMANDS.get(name, name)} [not installed]", add_help=False)
            p.set_defaults(func=lambda args, text=missing[name]: print(text, file=sys.stderr) or 1)
    return parser, missing


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, missing = build_parser()
    if argv and argv[0] in missing:  # `lookalike export ...` without the export package: say so, whatever its flags
        print(missing[argv[0]], file=sys.stderr)
        return 1
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
