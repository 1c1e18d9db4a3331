"""Launching tritonserver as a child process, and nothing else (the `lookalike serve` command around it
is `lookalike.server.serve`; what must be on disk before a start is the `prepare` hook's business).

Finds the binary (--tritonserver, else `tritonserver` on PATH, else the one inside the nvidia-pytriton
wheel with its Python-backend stub set up for this interpreter), builds its command line from
`ServerOptions`, waits until `visual_search` is ready, and makes the child die with its parent
(PR_SET_PDEATHSIG), so no orphaned server is left behind.
"""

from __future__ import annotations

import ctypes
import hashlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Sequence

from lookalike.server.stubs import ProcUnreadable, kill_stubs_of
from lookalike_client import ServerUnavailableError, wait_for
from lookalike_client import contract as c

# APIs that change or expose server state: restricted to holders of the admin key when the server is
# reachable beyond loopback (whoever reaches the port could otherwise unload the models).
RESTRICTED_APIS = ("model-repository", "shared-memory", "trace", "logging")


class LaunchError(RuntimeError):
    """tritonserver cannot be started, or did not get ready (not the client's `ServerError`, which is
    a server's answer to a request)."""


@dataclass
class ServerOptions:
    model_repository: Path = Path("model_repository")
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    health_port: int | None = 8003  # the supervisor's /ready, /live, /status (`lookalike serve` only)
    tritonserver: str | None = None
    model_config_name: str | None = None  # e.g. "onnxruntime" in the NGC image
    admin_key: str | None = None  # default: $LOOKALIKE_ADMIN_KEY
    # Restrict model control to holders of the admin key: None = only when bound beyond loopback.
    restrict_admin: bool | None = None
    log_verbose: int = 0
    extra_args: list[str] = field(default_factory=list)
    server_id: str | None = None  # tritonserver's --id, in its metadata; default `lookalike:<host>:<pid>`

    @property
    def triton_id(self) -> str:
        """The id tritonserver reports in its metadata (`ServerInfo.server_id`): the launcher's host and
        pid, so that a client can tell which `lookalike serve` it talks to (`publishing.ServingRecord`)."""
        return self.server_id or f"lookalike:{socket.gethostname()}:{os.getpid()}"

    @property
    def restricted(self) -> bool:
        """Whether model control needs the admin key: beyond loopback unless told otherwise."""
        return (not self.loopback) if self.restrict_admin is None else self.restrict_admin

    @property
    def effective_admin_key(self) -> str | None:
        """The admin key in force, when model control is restricted."""
        return (self.admin_key or os.environ.get(c.ADMIN_KEY_ENV)) if self.restricted else None

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "localhost") else self.host

    @property
    def grpc_url(self) -> str:
        return f"{self.client_host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.client_host}:{self.http_port}"


@dataclass(frozen=True)
class Binary:
    path: Path
    env: dict[str, str]  # variables to set for it
    backend_directory: Path | None  # None: the binary's own default (/opt/tritonserver/backends)


def _pytriton_root() -> Path | None:
    try:
        import pytriton
    except ImportError:
        return None
    return Path(pytriton.__file__).parent


def _prepare_wheel_backends(root: Path) -> Path:
    """A backends directory with the wheel's Python backend and the stub built for this Python.
    Cached per pytriton install and Python version; built in a temp dir and renamed into place."""
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = root / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise LaunchError(f"the nvidia-pytriton wheel has no Python-backend stub for Python {version}")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lookalike"
    target = cache / f"backends-py{version}-{hashlib.sha256(str(root).encode()).hexdigest()[:10]}"
    if (target / "python" / "triton_python_backend_stub").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(f"{target}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(root / "tritonserver" / "backends" / "python", staging / "python",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(stub, staging / "python" / "triton_python_backend_stub")
    try:
        os.rename(staging, target)
    except OSError:  # another launcher won the race
        shutil.rmtree(staging, ignore_errors=True)
    return target


def shared_libpython_dir() -> str | None:
    """The directory of this interpreter's shared libpython, when it was built with one.

    The wheel's stub links whichever libpython3.X.so.1.0 the loader finds first, e.g. the distribution's
    3.11.2 under a venv of another 3.11 (3.11.7): the stub then runs that libpython with this
    interpreter's standard library, and extension modules built against the newer one fail to import
    (`import ssl`: undefined symbol _PyModule_Add), and with ssl everything that needs it (pymilvus,
    the Milvus backend). With this directory first on the stub's LD_LIBRARY_PATH, the stub runs this
    interpreter's own libpython. An interpreter without a shared libpython (Py_ENABLE_SHARED 0, e.g. a
    default pyenv build) has no such directory: the stub keeps the system's libpython, which works when
    that is the same Python patch release, and otherwise fails on such imports, named in the model's
    load error (lookalike.serving.milvus_search.connect)."""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return None
    libdir = sysconfig.get_config_var("LIBDIR")
    name = sysconfig.get_config_var("INSTSONAME") or sysconfig.get_config_var("LDLIBRARY")
    if not libdir or not name or not (Path(libdir) / str(name)).exists():
        return None
    return str(libdir)


def find_tritonserver(explicit: str | None = None) -> Binary:
    if explicit:
        path = Path(explicit)
        if not path.exists():
            raise LaunchError(f"--tritonserver {explicit} does not exist")
        return Binary(path, {}, None)
    on_path = shutil.which("tritonserver")
    if on_path:
        return Binary(Path(on_path), {}, None)
    root = _pytriton_root()
    if root is None:
        raise LaunchError("no tritonserver: pass --tritonserver, put one on PATH, or install nvidia-pytriton (make setup)")
    binary = root / "tritonserver" / "bin" / "tritonserver"
    libs = root.parent / "nvidia_pytriton.libs"
    ld = os.pathsep.join(p for p in (shared_libpython_dir() or "", str(libs), os.environ.get("LD_LIBRARY_PATH", "")) if p)
    # The stub imports numpy, onnxruntime, faiss and lookalike from the environment whose bin/ is
    # first on PATH: make that this interpreter's environment.
    scripts = sysconfig.get_path("scripts")
    path = os.pathsep.join((str(Path(sys.executable).parent), scripts, os.environ.get("PATH", "")))
    return Binary(binary, {"LD_LIBRARY_PATH": ld, "PATH": path}, _prepare_wheel_backends(root))


def build_command(options: ServerOptions, binary: Binary, models: Sequence[str] | None = None) -> list[str]:
    """tritonserver's command line; `models`: the models to load at start (default: all of them)."""
    repo = Path(options.model_repository).resolve()
    args = [
        str(binary.path),
        f"--id={options.triton_id}",
        f"--model-repository={repo}",
        # Explicit control: every model at start, then `load_model` swaps in new index versions.
        "--model-control-mode=explicit",
        *([f"--load-model={m}" for m in models] if models is not None else ["--load-model=*"]),
        "--strict-readiness=true",
        "--exit-timeout-secs=30",
        f"--http-address={options.host}",
        f"--http-port={options.http_port}",
        f"--grpc-address={options.host}",
        f"--grpc-port={options.grpc_port}",
        f"--metrics-address={options.host}",
        f"--metrics-port={options.metrics_port}",
        f"--log-verbose={options.log_verbose}",
    ]
    if binary.backend_directory is not None:
        args.append(f"--backend-directory={binary.backend_directory}")
    if options.model_config_name:
        args.append(f"--model-config-name={options.model_config_name}")
    if options.restricted:
        key = options.effective_admin_key
        if not key:
            raise LaunchError(
                f"--host {options.host} is reachable beyond loopback: set {c.ADMIN_KEY_ENV} to a secret so that "
                f"model control ({', '.join(RESTRICTED_APIS)}) needs it"
            )
        restriction = f"{','.join(RESTRICTED_APIS)}:{c.ADMIN_KEY_HEADER}={key}"
        args += [f"--http-restricted-api={restriction}", f"--grpc-restricted-protocol={restriction}"]
    return args + list(options.extra_args)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def processes_hidden_from_other_users() -> bool:
    """Whether /proc is mounted with hidepid, so that other users cannot read our command lines."""
    try:
        mounts = Path("/proc/mounts").read_text()
    except OSError:
        return False
    return any(line.split()[1] == "/proc" and "hidepid=" in line and "hidepid=0" not in line
               and "hidepid=off" not in line for line in mounts.splitlines() if len(line.split()) > 3)


def port_is_free(host: str, port: int) -> bool:
    """Whether tritonserver can bind `port`: the check binds the way it does, with SO_REUSEADDR, so
    that the TIME-WAIT connections a stopped server leaves behind (about 60 s) do not count as in
    use, while a socket that another process listens on still does (without SO_REUSEPORT on our
    side, Linux refuses to share a port with a listener)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            return True
        except OSError:
            return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class TritonServer:
    """A tritonserver child process. Use as a context manager, or start()/stop(). `prepare` runs before
    every start (the first one and a supervisor's restarts): `lookalike.server.serve.lookalike_server` makes
    the model repository servable there."""

    def __init__(self, options: ServerOptions, log_file: Path | None = None,
                 prepare: Callable[[], None] | None = None) -> None:
        self.options = options
        self.log_file = log_file
        self.prepare = prepare
        self.process: subprocess.Popen[bytes] | None = None
        self._log_handle: IO[bytes] | None = None

    def start(self, models: Sequence[str] | None = None) -> "TritonServer":
        """Starts tritonserver (after `prepare`) loading `models` (default: every model of the
        repository; the supervisor holds some back to load them itself, pinned)."""
        opts = self.options
        for name, port in (("http", opts.http_port), ("grpc", opts.grpc_port), ("metrics", opts.metrics_port)):
            if not port_is_free(opts.host, port):
                raise LaunchError(f"{name} port {opts.host}:{port} is in use (another server running?)")
        if self.prepare is not None:
            self.prepare()
        binary = find_tritonserver(opts.tritonserver)
        command = build_command(opts, binary, models)
        env = {**os.environ, **binary.env}
        # One process per model instance already; keep OpenMP from spinning on idle cores.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        if self.log_file is not None:
            self._log_handle = open(self.log_file, "ab")
        self.process = subprocess.Popen(
            command, env=env, preexec_fn=_die_with_parent,
            stdout=self._log_handle, stderr=subprocess.STDOUT if self._log_handle else None,
        )
        return self

    def _answers(self, path: str) -> bool:
        """Whether GET `path` of tritonserver's HTTP API answers 200."""
        try:
            with urllib.request.urlopen(f"http://{self.options.http_url}{path}", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def ready(self, model: str = c.VISUAL_SEARCH_MODEL) -> bool:
        return self._answers(f"/v2/models/{model}/ready")

    def wait_live(self, timeout_s: float = 300.0) -> None:
        """Until tritonserver answers (its models may still be loading, or held back)."""
        self._wait(lambda: self._answers("/v2/health/live"), timeout_s, "tritonserver")

    def wait_ready(self, timeout_s: float = 300.0, model: str = c.VISUAL_SEARCH_MODEL) -> None:
        self._wait(lambda: self.ready(model), timeout_s, model)

    def _wait(self, check: Callable[[], bool], timeout_s: float, what: str) -> None:
        def exited() -> str | None:
            if self.process is not None and self.process.poll() is not None:
                return f"tritonserver exited with code {self.process.returncode} before {what} was ready"
            return None

        try:
            wait_for(check, timeout_s, what=what, abort=exited)
        except ServerUnavailableError as exc:
            raise LaunchError(f"{exc}" + (f"; see {self.log_file}" if self.log_file else "")) from None

    def stop(self, timeout_s: float = 40.0) -> int:
        """SIGTERM, then SIGKILL after `timeout_s`; then no stub of this tritonserver is left running
        (see `kill_stubs_of`). Returns tritonserver's exit code."""
        code = 0
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            code = self.process.returncode
            try:
                leftovers = kill_stubs_of(self.process.pid)
            except ProcUnreadable as exc:  # never a reason to fail a stop (or the supervisor's restart)
                leftovers = []
                print(f"lookalike: could not look for model processes that tritonserver (pid {self.process.pid}) "
                      f"left running: {exc}", file=sys.stderr, flush=True)
            if leftovers:
                print(f"lookalike: killed {len(leftovers)} model process(es) that tritonserver (pid "
                      f"{self.process.pid}) left running: {leftovers}", file=sys.stderr, flush=True)
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        return code

    def __enter__(self) -> "TritonServer":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
