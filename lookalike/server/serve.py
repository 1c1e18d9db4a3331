"""`lookalike serve`: tritonserver (`lookalike.server.launcher`) over a model repository made servable before each
start (`lookalike.indexing.publishing.ensure_servable_index`), kept serving by the supervisor, with its health
endpoint, the ready banner, signal forwarding and the exit code.

A repository that this process cannot write (the index volume of the Kubernetes pods, mounted read-only)
is served as it is: the newest index version that can be served, loaded pinned when a newer one that
cannot be served is on disk, and no start at all when there is none (`publishing.servable_read_only`).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from lookalike.indexing.model_configs import VARIANTS_DIR
from lookalike.indexing.publishing import NothingToServeError, ensure_servable_index, newest_servable_version
from lookalike.indexing.repository import Repository
from lookalike.server.launcher import LaunchError, ServerOptions, TritonServer, processes_hidden_from_other_users
from lookalike_client import contract as c

if TYPE_CHECKING:
    from lookalike.server.supervisor import SupervisorOptions


def log(message: object) -> None:
    print(f"lookalike: {message}", file=sys.stderr, flush=True)


def check_model_config_name(repository: Repository, name: str | None) -> None:
    """Refuses (LaunchError) a --model-config-name that the embedder has no configs/<name>.pbtxt for:
    tritonserver would silently fall back to its config.pbtxt, the Python/ONNX Runtime CPU variant,
    and serve that under the name of, say, a TensorRT engine that was never built."""
    if not name:
        return
    variants = repository.embedder_dir / VARIANTS_DIR
    if not (variants / f"{name}.pbtxt").is_file():
        found = sorted(p.stem for p in variants.glob("*.pbtxt")) if variants.is_dir() else []
        hint = " (written with an engine: `make engine`, i.e. `lookalike engine`)" if name == "tensorrt" else ""
        raise LaunchError(f"--model-config-name {name}: the embedder has no {VARIANTS_DIR}/{name}.pbtxt{hint}; "
                          f"it has {', '.join(found) or 'none'} (and config.pbtxt, the Python/ONNX Runtime CPU variant, "
                          "served without --model-config-name)")
    if name == "tensorrt" and not repository.plan_file.is_file():
        raise LaunchError(f"--model-config-name tensorrt: {repository.plan_file} is missing (build it: `make engine`)")


def lookalike_server(options: ServerOptions, log_file: Path | None = None) -> TritonServer:
    """tritonserver over `options.model_repository`, whose newest index version is made one it can
    serve before every start (see `ensure_servable_index`). On a read-only repository it loads the
    newest version on disk: `serve_forever` pins the newest servable one when they differ."""
    repository = Repository(Path(options.model_repository))

    def prepare() -> None:
        check_model_config_name(repository, options.model_config_name)
        try:
            ensure_servable_index(repository, log=log)
        except NothingToServeError as exc:
            raise LaunchError(str(exc)) from exc

    return TritonServer(options, log_file, prepare=prepare)


def serve_forever(options: ServerOptions, supervision: "SupervisorOptions | None" = None) -> int:
    """Foreground server for the CLI: the supervisor and its health endpoint, the ready banner,
    signal forwarding, and the exit code (0 after SIGINT/SIGTERM)."""
    from lookalike.server.supervisor import AdminError, HealthServer, Supervisor, SupervisorGaveUp

    server = lookalike_server(options)
    repository = Repository(Path(options.model_repository))
    stop = threading.Event()
    current: dict[str, Supervisor | None] = {"supervisor": None}
    health = None
    if options.health_port:
        try:
            # /status beyond loopback needs the admin key, as Triton's admin API does; /ready and /live never.
            health = HealthServer(lambda: current["supervisor"], options.host, options.health_port,
                                  status_key=options.effective_admin_key, require_key=options.restricted, log=log).start()
        except OSError as exc:
            log(f"health port {options.host}:{options.health_port}: {exc.strerror or exc} (another server running?)")
            return 1

    def forward(signum, _frame):
        stop.set()
        process = server.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    gave_up = False
    try:
        try:
            if repository.writable():
                server.start()
                server.wait_ready()
            else:
                # Nothing can be set aside on a read-only repository: the newest version that can be served is
                # loaded pinned when a newer one is on disk, as the supervisor restarts tritonserver on the
                # version that served (a plain start, where it is the newest or there is none).
                starter = Supervisor(server, supervision, log=log)
                starter.serving = newest_servable_version(repository)[0]
                starter._start_serving_the_same_version()
        except (LaunchError, AdminError) as exc:
            if not stop.is_set():
                log(exc)
                server.stop()
                return 1
        if not stop.is_set():
            print(
                f"lookalike: {c.VISUAL_SEARCH_MODEL} is ready\n"
                f"  gRPC     {options.grpc_url}\n"
                f"  HTTP     http://{options.http_url}\n"
                f"  metrics  http://{options.client_host}:{options.metrics_port}/metrics\n"
                + (f"  health   http://{options.client_host}:{options.health_port}/ready\n" if health else "")
                + f"  stop with Ctrl-C or: kill {os.getpid()}",
                file=sys.stderr,
                flush=True,
            )
            if options.effective_admin_key and not processes_hidden_from_other_users():
                log("note: tritonserver 2.51 takes the admin key only on its command line, where local users who "
                    "can list processes read it: run it in its own container or mount /proc with hidepid=2 "
                    "(docs/operations.md)")
            current["supervisor"] = Supervisor(server, supervision, log=log)
            try:
                current["supervisor"].run(stop)
            except SupervisorGaveUp:
                gave_up = True
        code = server.stop()
        if stop.is_set() and code == 1:
            supervisor = current["supervisor"]
            replaced = supervisor.replaced_after_crash if supervisor is not None else 0
            stuck = f"; {replaced} model(s) replaced after a crash, whose old instances tritonserver 2.51 may " \
                    "never unload" if replaced else ""
            log(f"tritonserver stopped at its exit timeout (--exit-timeout-secs=30: it waits for clients' open "
                f"HTTP connections and for every model to unload{stuck}): treated as a clean stop")
            code = 0
    finally:
        if health is not None:
            health.close()
    if gave_up:
        return 1
    return 0 if stop.is_set() and code in (0, -signal.SIGTERM) else code
