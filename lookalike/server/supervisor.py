"""The supervisor of `lookalike serve`: keeps tritonserver serving when a part of it dies, and says
truthfully whether it is ready meanwhile.

Why: tritonserver 2.51 never restarts a Python-backend stub that dies (python_backend's "TODO:
Implement restart"). Its requests then fail ("Stub process 'preprocess_0_1' is not healthy", after
a one-second health-check timeout each), a plain `load_model` of the unchanged model is a no-op, and
Triton's live and ready endpoints keep answering 200.

Detection. The stubs are tritonserver's child processes `triton_python_backend_stub`, whose command
line names the model file (so the model and version) and the instance. Every `interval_s` the known
stubs are checked in /proc, and the whole process tree is listed every `scan_every_s` to find new
ones. A stub counts as dead when its process is gone or a zombie (tritonserver reaps the stubs it
stops itself, never one that crashed), or stopped (SIGSTOP) for longer than `stopped_grace_s`, and
no newer stub has taken its instance's place, while its model version is still READY in Triton's
repository index: a version being unloaded (an index swap) stops its stubs legitimately.

Recovery. The model is reloaded with a config override equal to the served config but for one
parameter, `lookalike_recovery`, which tritonserver must see changed to load anything. Like every
reload it loads new instances beside the old ones and then swaps. When the reload fails, when the
new stubs are not there afterwards, or when tritonserver itself exits, tritonserver is restarted
on the same repository and ports; more than `max_restarts` restarts within `restart_window_s` and
the supervisor gives up (`lookalike serve` exits non-zero, for an orchestrator to take over).

A repair keeps the index version that served: a stub's model is reloaded at the dead stub's version
(a config override with a specific version policy), and a restarted tritonserver loads
`product_search` at the version it served before (held back at start, then loaded pinned, then its
ensembles). Moving to a newer version on disk is `lookalike index`'s decision (or `--rollback`'s),
never a repair's; when the version that served is gone from disk, the repair says so and serves the
newest. The version served is recorded in the repository (`publishing.record_serving`), so that
`lookalike index` does not delete it under this server.

"I could not look" is never "it died": /proc or tritonserver's API failing for a reason of the
supervisor's own (out of file descriptors, say) is logged and retried; nothing is killed over it.

Readiness. `HealthServer` answers GET /ready with 200 only while tritonserver reports ready, no
stub is dead and no recovery is under way (503 and the reason otherwise), GET /live with 200 while
the supervisor runs, and GET /status with the incidents so far, as JSON (beyond loopback: only with
the admin key). It cannot be exhausted: one event loop, no thread per connection, a connection cap
and a read timeout.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from lookalike.indexing import model_configs
from lookalike.indexing.publishing import SERVING_HEARTBEAT_S, clear_serving, record_serving, version_problem
from lookalike.indexing.repository import Repository
from lookalike.server.stubs import DEAD_STATES, STOPPED_STATES, ProcUnreadable, StubId, StubProcess, list_stubs, read_state
from lookalike.serving.artifacts import ArtifactError
from lookalike_client import contract as c

if TYPE_CHECKING:
    from lookalike.server.launcher import TritonServer

Log = Callable[[str], None]

RECOVERY_PARAMETER = "lookalike_recovery"
# The models that clients call: /ready is 200 only while each of them is.
CLIENT_MODELS = (c.VISUAL_SEARCH_MODEL, c.SIMILAR_PRODUCTS_MODEL, c.EMBED_IMAGE_MODEL)


class SupervisorGaveUp(RuntimeError):
    pass


class AdminError(RuntimeError):
    pass


class LocalResourceError(AdminError):
    """A call to tritonserver failed for a reason of this process's own (out of file descriptors or
    memory): it says nothing about tritonserver."""


# errnos that say "this process could not", not "the other side is gone"
LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


def _local_errno(exc: BaseException) -> int | None:
    """The errno of `exc` (or of the OSError urllib wrapped in it) when it is one of LOCAL_ERRNOS."""
    for candidate in (exc, getattr(exc, "reason", None), exc.__cause__, exc.__context__):
        if isinstance(candidate, OSError) and candidate.errno in LOCAL_ERRNOS:
            return candidate.errno
    return None


@dataclass
class DeadStub:
    stub: StubId
    pid: int
    how: str  # "exited", "zombie (crashed)", "stopped for 5 s"


class StubWatch:
    """Which instances have lost their stub. Pure bookkeeping, fed with observations, so that it is
    tested without processes: stubs found by a listing, and `states` (pid -> state letter, None when
    gone) of the pids it tracks."""

    def __init__(self, stopped_grace_s: float = 5.0) -> None:
        self.stopped_grace_s = stopped_grace_s
        self.current: dict[StubId, StubProcess] = {}  # the newest stub of each instance
        self.stopped_since: dict[int, float] = {}
        self.reported: set[int] = set()  # pids returned by dead() once
        self.crashed: set[int] = set()  # of those, the ones confirmed (their version was still READY)

    def add(self, found: list[StubProcess], states: dict[int, str | None]) -> None:
        for process in found:
            if states.get(process.pid) is None or states.get(process.pid) in DEAD_STATES:
                continue
            known = self.current.get(process.stub)
            if known is None or process.started > known.started:  # a reload's new stub replaces the old
                self.current[process.stub] = process

    def dead(self, states: dict[int, str | None], now: float) -> list[DeadStub]:
        """Instances whose newest stub is dead or stopped too long, each reported once."""
        out = []
        for stub, process in sorted(list(self.current.items())):
            state = states.get(process.pid)
            if state in STOPPED_STATES:
                since = self.stopped_since.setdefault(process.pid, now)
                how = f"stopped (state {state}) for {now - since:.0f} s" if now - since >= self.stopped_grace_s else None
            else:
                self.stopped_since.pop(process.pid, None)
                how = "exited" if state is None else "crashed (zombie)" if state in DEAD_STATES else None
            if how and process.pid not in self.reported:
                self.reported.add(process.pid)
                out.append(DeadStub(stub, process.pid, how))
        return out

    def superseded(self, found: list[StubProcess], states: dict[int, str | None]) -> list[StubProcess]:
        """Live stubs of an instance that a newer stub has replaced (by a reload)."""
        return [f for f in found if states.get(f.pid) not in (None, *DEAD_STATES)
                and f.stub in self.current and self.current[f.stub].started > f.started]

    def forget(self, stub: StubId) -> None:
        """An instance that is gone for good (its version was unloaded)."""
        process = self.current.pop(stub, None)
        if process is not None:
            self.stopped_since.pop(process.pid, None)

    def confirm(self, dead: DeadStub) -> None:
        """A dead stub whose version is still served: a crash, not an unload."""
        self.crashed.add(dead.pid)

    def retry(self, dead: DeadStub) -> None:
        """Report this dead stub again next round: it could not be dealt with this time (the supervisor
        could not ask tritonserver, for a reason of its own)."""
        self.reported.discard(dead.pid)
        self.crashed.discard(dead.pid)

    def tracked(self) -> list[int]:
        return [process.pid for process in list(self.current.values())]

    def is_dead(self, stub: StubId) -> bool:
        process = self.current.get(stub)
        return process is not None and process.pid in self.crashed

    def healthy(self) -> bool:
        """No instance of a served version is without a live stub."""
        return not any(pid in self.crashed for pid in self.tracked())


# -- tritonserver's HTTP API ----------------------------------------------------------------------
class TritonAdmin:
    """The few calls the supervisor makes, over Triton's HTTP API, with the admin key when model
    control is restricted. Plain urllib: it runs in threads, outside any event loop."""

    def __init__(self, url: str, admin_key: str | None = None, timeout_s: float = 10.0) -> None:
        self.base = f"http://{url}"
        self.headers = {"Content-Type": "application/json"}
        if admin_key:
            self.headers[c.ADMIN_KEY_HEADER] = admin_key
        self.timeout_s = timeout_s

    def _call(self, method: str, path: str, body: dict | None = None, timeout_s: float | None = None) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout_s or self.timeout_s) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError as exc:
            if _local_errno(exc) is not None:
                raise LocalResourceError(f"{method} {path}: {exc}") from exc
            raise AdminError(f"{method} {path}: {exc}") from exc

    def ok(self, path: str) -> bool:
        """Whether GET `path` answers 200; False when tritonserver does not answer. LocalResourceError
        when this process could not ask."""
        try:
            return self._call("GET", path, timeout_s=2.0)[0] == 200
        except LocalResourceError:
            raise
        except AdminError:
            return False

    def search_problem(self, dim: int) -> str | None:
        """None when product_search answers a one-row search (a unit vector, TOP_K 1), else its error: the
        readiness of a search tier outside tritonserver (Milvus), which Triton's own readiness does not see."""
        vector = [1.0] + [0.0] * (dim - 1)
        body = {"inputs": [{"name": c.EMBEDDING, "shape": [1, dim], "datatype": "FP32", "data": vector},
                           {"name": c.TOP_K, "shape": [1, 1], "datatype": "INT32", "data": [1]}],
                "outputs": [{"name": c.INDEX_INFO}]}
        try:
            status, answer = self._call("POST", f"/v2/models/{c.SEARCH_MODEL}/infer", body, timeout_s=3.0)
        except AdminError as exc:
            return str(exc)
        if status == 200:
            return None
        try:
            return str(json.loads(answer).get("error") or answer[:300])
        except ValueError:
            return f"HTTP {status}"

    def model_states(self) -> dict[tuple[str, str], str]:
        """(model, version) -> READY | LOADING | UNLOADING | UNAVAILABLE, from the repository index."""
        status, body = self._call("POST", "/v2/repository/index", {})
        if status != 200:
            raise AdminError(f"repository index: HTTP {status}: {body[:200]!r}")
        return {(m["name"], str(m.get("version", ""))): m.get("state", "") for m in json.loads(body)}

    def reload(self, model: str, token: str, version: str | None = None, timeout_s: float = 300.0) -> None:
        """Loads `model` again even though nothing changed on disk: with its served config, in which
        only RECOVERY_PARAMETER differs from the config it was loaded with, and, given a `version`,
        that version pinned (else tritonserver would load the newest version on disk)."""
        status, body = self._call("GET", f"/v2/models/{model}/config")
        if status != 200:
            raise AdminError(f"config of {model}: HTTP {status}: {body[:200]!r}")
        config = json.loads(body)
        config.setdefault("parameters", {})[RECOVERY_PARAMETER] = {"string_value": token}
        if version is not None:
            config["version_policy"] = pinned_policy(version)
        self.load(model, config, timeout_s=timeout_s)

    def load(self, model: str, config: dict[str, Any] | None = None, timeout_s: float = 300.0) -> None:
        """Loads `model`, with `config` (Triton's JSON of a ModelConfig) instead of its config.pbtxt."""
        body = {"parameters": {"config": json.dumps(config)}} if config is not None else {}
        status, answer = self._call("POST", f"/v2/repository/models/{model}/load", body, timeout_s=timeout_s)
        if status != 200:
            raise AdminError(f"load of {model}: HTTP {status}: {answer[:300].decode(errors='replace')}")


def pinned_policy(version: str | int) -> dict[str, Any]:
    """A version policy that serves exactly `version`."""
    return {"specific": {"versions": [int(version)]}}


def disk_config(repository: Repository, model: str, version: int | None = None) -> dict[str, Any]:
    """`model`'s config.pbtxt as Triton's JSON (for a load with a config), `version` pinned if given."""
    config = model_configs.to_json(model_configs.read(repository.root / model / model_configs.CONFIG_FILE))
    if version is not None:
        config["version_policy"] = pinned_policy(version)
    return config


def search_tier(repository: Repository) -> tuple[int, str] | None:
    """(embedding width, "milvus at URI") when product_search searches a tier outside tritonserver (its
    config says search_backend milvus), so that readiness probes it; None for the faiss backend."""
    try:
        params = model_configs.parameters(model_configs.read(repository.search_dir / model_configs.CONFIG_FILE))
        if params.get("search_backend", "faiss") != "milvus":
            return None
        return repository.manifest().dim, f"milvus at {params.get('milvus_uri', '?')}"
    except (OSError, ValueError, ArtifactError):
        return None


# -- the supervisor -------------------------------------------------------------------------------
@dataclass
class Incident:
    started: float  # time.time()
    what: str
    action: str = ""
    recovered_after_s: float | None = None
    failed: str | None = None


@dataclass
class SupervisorOptions:
    interval_s: float = 0.25  # check the known stubs
    scan_every_s: float = 1.0  # list the process tree for new stubs
    stopped_grace_s: float = 5.0
    # A reload replaces the instances of a model; when one of its stubs died holding its health mutex,
    # tritonserver 2.51 never finishes unloading the old model, and its other stubs live on, serving
    # nothing. Killed after this long (time enough for any request they still held):
    orphan_grace_s: float = 30.0
    reload_timeout_s: float = 120.0
    max_restarts: int = 3
    restart_window_s: float = 600.0
    stop_timeout_s: float = 15.0  # SIGTERM, then SIGKILL, when restarting a broken tritonserver
    ready_timeout_s: float = 300.0
    # A killed tritonserver can take a moment to exit (its memory is torn down) while its stubs are
    # already gone and its ports closed: waited for this long before calling it hung rather than dead.
    exit_grace_s: float = 3.0


def exited_within(process: subprocess.Popen, timeout_s: float) -> bool:
    """True once `process` has exited, waiting at most `timeout_s` for it."""
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False
    return True


class Supervisor:
    def __init__(self, server: "TritonServer", options: SupervisorOptions | None = None, log: Log = print) -> None:
        self.server = server
        self.options = options or SupervisorOptions()
        self.log = log
        self.admin = TritonAdmin(server.options.http_url, server.options.effective_admin_key)
        self.repository = Repository(Path(server.options.model_repository))
        self.watch = StubWatch(self.options.stopped_grace_s)
        self.incidents: list[Incident] = []
        self.busy: str | None = None  # what the supervisor is repairing right now
        # Models replaced after a crash since tritonserver started: their old instances may never
        # finish unloading (tritonserver 2.51 waits, without a timeout, for the health mutex if the
        # killed stub held it), so its shutdown may run into --exit-timeout-secs and exit with 1.
        self.replaced_after_crash = 0
        self.restarts: list[float] = []
        # The product_search version that tritonserver serves (READY in its repository index), as last
        # seen: what a restart loads again.
        self.serving: int | None = None
        self._recorded: tuple[int, float] | None = None  # (version, when) of the record in the repository
        self._lock = threading.Lock()
        self._last_scan = 0.0
        self._orphans: dict[int, float] = {}  # superseded stub pid -> when first seen so
        self._ready_since: float | None = time.monotonic()  # of the current tritonserver; None: failed to start
        self._quick_restarts = 0
        self._blind_since: float | None = None  # when /proc or tritonserver's API last became unreadable to us
        self._blind_logged = 0.0
        self._blind_rounds = 0
        self._search_tier = search_tier(self.repository)

    # -- state for /ready and /status --------------------------------------------------------------
    def local_problem(self) -> str | None:
        """Why not ready, from what the supervisor knows without asking tritonserver (None: nothing)."""
        process = self.server.process
        if process is None or process.poll() is not None:
            return "tritonserver is not running"
        if self.busy:
            return self.busy
        if not self.watch.healthy():
            return "a Python-backend stub is dead"
        return None

    def readiness(self) -> tuple[bool, str]:
        problem = self.local_problem()
        if problem is not None:
            return False, problem
        ready, reason = self._asked_readiness()
        # tritonserver may answer only once a reload has finished (its readiness calls wait for it): a repair
        # that began meanwhile, or a stub that died meanwhile, is not answered with "ready"
        problem = self.local_problem()
        return (False, problem) if problem is not None else (ready, reason)

    def _asked_readiness(self) -> tuple[bool, str]:
        try:
            # Live, and each model that clients call ready. Not Triton's server readiness: it also counts
            # a model version on its way out, so it dips for a second after every index swap.
            if not self.admin.ok("/v2/health/live"):
                return False, "tritonserver does not answer"
            for model in CLIENT_MODELS:
                if not self.admin.ok(f"/v2/models/{model}/ready"):
                    return False, f"tritonserver reports {model} not ready"
            if self._search_tier is not None:  # Milvus: ready only while product_search can search it
                dim, where = self._search_tier
                problem = self.admin.search_problem(dim)
                if problem is not None:
                    return False, f"{c.SEARCH_MODEL} cannot search {where}: {problem}"
        except LocalResourceError as exc:
            return False, f"the supervisor cannot check tritonserver: {exc}"
        return True, "ready"

    def status(self) -> dict:
        ready, reason = self.readiness()
        with self._lock:
            incidents = [asdict(i) for i in self.incidents[-50:]]
        return {"ready": ready, "reason": reason, "tritonserver_pid": getattr(self.server.process, "pid", None),
                "stubs": {str(stub): p.pid for stub, p in sorted(list(self.watch.current.items()))},
                "index_version": self.serving, "restarts": len(self.restarts), "incidents": incidents}

    def _record(self, incident: Incident) -> Incident:
        with self._lock:
            self.incidents.append(incident)
        return incident

    # -- the loop ----------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Watches and repairs until `stop` is set. Raises SupervisorGaveUp after too many restarts."""
        try:
            while not stop.wait(self.options.interval_s):
                process = self.server.process
                if process is None or process.poll() is not None:
                    if stop.is_set():
                        return
                    self._restart(f"tritonserver exited with code {None if process is None else process.returncode}", stop)
                    continue
                try:
                    self.check(stop)
                except (ProcUnreadable, LocalResourceError) as exc:
                    self._cannot_look(exc)
                    continue
                self._can_look_again()
        finally:
            self.close()

    def _cannot_look(self, exc: OSError | AdminError) -> None:
        """/proc or tritonserver's API could not be read for a reason of this process's own: nothing
        is concluded from it. Logged when it starts and every 10 s while it lasts."""
        now = time.monotonic()
        self._blind_rounds += 1
        if self._blind_since is None:
            self._blind_since = now
        if now - self._blind_logged >= 10.0:
            self._blind_logged = now
            self.log(f"cannot watch tritonserver for {now - self._blind_since:.0f} s: {exc}; "
                     "retrying (tritonserver is left alone; this is the supervisor's own trouble)")

    def _can_look_again(self) -> None:
        if self._blind_since is not None:
            self.log(f"watching tritonserver again after {time.monotonic() - self._blind_since:.1f} s "
                     f"({self._blind_rounds} round(s) skipped)")
            self._blind_since, self._blind_logged, self._blind_rounds = None, 0.0, 0

    def check(self, stop: threading.Event | None = None) -> list[DeadStub]:
        """One round: find dead stubs, tell them from unloaded ones, repair their models. Raises
        ProcUnreadable / LocalResourceError when it could not look: then nothing is concluded."""
        now = time.monotonic()
        pid = self.server.process.pid if self.server.process else None
        if pid is None:
            return []
        found: list[StubProcess] = []
        if now - self._last_scan >= self.options.scan_every_s:
            found = list_stubs(pid)
            self._last_scan = now
            self._refresh_serving()
        states = {p: read_state(p) for p in {f.pid for f in found} | set(self.watch.tracked())}
        self.watch.add(found, states)
        if found:
            self._reap_orphans(self.watch.superseded(found, states), now)
        dead = self.watch.dead(states, now)
        if not dead:
            return []
        try:
            served = self.admin.model_states()
        except LocalResourceError:
            for d in dead:  # looked at again next round, when the supervisor can ask
                self.watch.retry(d)
            raise
        except AdminError as exc:
            process = self.server.process
            if process is not None and exited_within(process, self.options.exit_grace_s):  # its stubs died with it
                self._restart(f"tritonserver exited with code {process.returncode}", stop)
            else:
                self._restart(f"{len(dead)} stub(s) dead and tritonserver does not answer ({exc})", stop)
            return dead
        crashed = []
        for d in dead:
            if served.get((d.stub.model, d.stub.version)) == "READY":
                self.watch.confirm(d)
                crashed.append(d)
            else:  # its version is unloading or unloaded: a stub stopped by tritonserver itself
                self.watch.forget(d.stub)
        for model in sorted({d.stub.model for d in crashed}):
            self._recover(model, [d for d in crashed if d.stub.model == model], stop)
        return crashed

    # -- the version served ------------------------------------------------------------------------
    def _refresh_serving(self) -> None:
        """Which product_search version tritonserver serves, from its repository index (the newest READY
        one while a swap has two), recorded in the repository when it changes and every
        SERVING_HEARTBEAT_S. Unchanged while tritonserver does not answer."""
        try:
            states = self.admin.model_states()
        except LocalResourceError:
            raise
        except AdminError:
            return
        ready = [int(v) for (model, v), state in states.items() if model == c.SEARCH_MODEL and state == "READY" and v.isdigit()]
        if ready:
            self.serving = max(ready)
        self._publish_serving()

    def _publish_serving(self) -> None:
        if self.serving is None:
            return
        now = time.monotonic()
        if self._recorded is not None and self._recorded[0] == self.serving and now - self._recorded[1] < SERVING_HEARTBEAT_S:
            return
        options = self.server.options
        try:
            recorded = record_serving(self.repository, self.serving, options.triton_id, (options.grpc_url, options.http_url))
        except OSError as exc:
            if self._recorded is None or self._recorded[0] != self.serving:
                self.log(f"cannot record the index version served in {self.repository.serving_dir}: {exc} "
                         "(`lookalike index` may then delete it under this server)")
        else:
            if recorded is None and self._recorded is None:  # said once: it stays read-only
                self.log(f"the model repository is read-only: the index version served is not recorded in "
                         f"{self.repository.serving_dir} (a writer's `lookalike index` cannot see this server; "
                         "its --keep-versions must keep what the servers still serve)")
        self._recorded = (self.serving, now)

    def close(self) -> None:
        """Removes this server's record of the version it serves (it is stopping)."""
        try:
            clear_serving(self.repository)
        except OSError:
            pass

    def _pin(self, model: str, version: str) -> str | None:
        """The version of `model` to load again in a repair: the one that served, while it is still on
        disk; None (and the reason logged) when it is gone, so that the newest is loaded instead."""
        if (self.repository.root / model / version).is_dir():
            return version
        self.log(f"{model} version {version}, which served, is no longer on disk: the repair loads the newest "
                 "version instead")
        return None

    # -- repairs -----------------------------------------------------------------------------------
    def _recover(self, model: str, dead: list[DeadStub], stop: threading.Event | None) -> None:
        what = "; ".join(f"stub {d.stub} pid {d.pid} {d.how}" for d in dead)
        version = self._pin(model, max((d.stub.version for d in dead), key=lambda v: int(v) if v.isdigit() else -1))
        kept = f" version {version}" if version is not None else ""
        incident = self._record(Incident(time.time(), what, action=f"reload {model}{kept}"))
        self.busy = f"recovering {model}: {what}"
        self.log(f"{what}: reloading {model}{kept}")
        started = time.monotonic()
        try:
            self._while_tritonserver_runs(lambda: self.admin.reload(model, token=f"{time.time():.6f}", version=version),
                                          self.options.reload_timeout_s, f"reloading {model}")
        except LocalResourceError as exc:  # the supervisor's own trouble: try again next round
            incident.failed = f"could not ask tritonserver: {exc}"
            self.log(f"reloading {model}: {incident.failed}; trying again")
            for d in dead:
                self.watch.retry(d)
            self.busy = None
            return
        except AdminError as exc:
            incident.failed = str(exc)
            self.log(f"reloading {model} failed: {exc}")
            self.busy = None
            self._restart(f"reloading {model} did not help ({exc})", stop)
            return
        self._find_new_stubs(model)
        missing = [d.stub for d in dead if self.watch.is_dead(d.stub)]
        self.busy = None
        if missing:
            incident.failed = f"no new stub for {', '.join(map(str, missing))}"
            self._restart(f"reloading {model} left {incident.failed}", stop)
            return
        incident.recovered_after_s = round(time.monotonic() - started, 2)
        self.replaced_after_crash += 1
        self.log(f"recovered {model}: new stub(s) serving {incident.recovered_after_s:.1f} s after the reload began")

    def _while_tritonserver_runs(self, call: Callable[[], object], timeout_s: float, what: str) -> None:
        """Runs `call` (a request to tritonserver) but gives up as soon as tritonserver exits or the
        time is up: a connection that a stub inherited can outlive tritonserver itself."""
        outcome: dict[str, BaseException] = {}

        def run() -> None:
            try:
                call()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                outcome["error"] = exc

        worker = threading.Thread(target=run, name="lookalike-admin", daemon=True)
        worker.start()
        deadline = time.monotonic() + timeout_s
        while worker.is_alive():
            worker.join(0.2)
            process = self.server.process
            if worker.is_alive() and (process is None or process.poll() is not None):
                raise AdminError(f"tritonserver exited while {what}")
            if worker.is_alive() and time.monotonic() > deadline:
                raise AdminError(f"{what} took more than {timeout_s:.0f} s")
        if "error" in outcome:
            raise outcome["error"]

    def _reap_orphans(self, superseded: list[StubProcess], now: float) -> None:
        alive = {f.pid for f in superseded}
        self._orphans = {pid: since for pid, since in self._orphans.items() if pid in alive}
        for orphan in superseded:
            since = self._orphans.setdefault(orphan.pid, now)
            if now - since >= self.options.orphan_grace_s:
                try:
                    os.kill(orphan.pid, signal.SIGKILL)
                except OSError:
                    continue
                self.log(f"killed pid {orphan.pid}, a stub of {orphan.stub} replaced {now - since:.0f} s ago "
                         "that tritonserver did not stop")

    def _find_new_stubs(self, model: str) -> None:
        pid = self.server.process.pid if self.server.process else None
        if pid is not None:
            found = [f for f in list_stubs(pid) if f.stub.model == model]
            self.watch.add(found, {f.pid: read_state(f.pid) for f in found})

    def _restart(self, reason: str, stop: threading.Event | None) -> None:
        if stop is not None and stop.is_set():
            return
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < self.options.restart_window_s] + [now]
        incident = self._record(Incident(time.time(), reason, action="restart tritonserver"))
        if len(self.restarts) > self.options.max_restarts:
            incident.failed = f"more than {self.options.max_restarts} restarts in {self.options.restart_window_s:.0f} s"
            self.log(f"{reason}; giving up: {incident.failed}")
            raise SupervisorGaveUp(f"{reason}; {incident.failed}")
        self.busy = f"restarting tritonserver: {reason}"
        self.log(f"{reason}: restarting tritonserver")
        started = time.monotonic()
        self.server.stop(timeout_s=self.options.stop_timeout_s)
        # After a failed start, or a death within 10 s of being ready, wait 1, 2, 4 s before the next try.
        quick = self._ready_since is None or now - self._ready_since < 10.0
        self._quick_restarts = self._quick_restarts + 1 if quick else 0
        if stop is not None and stop.wait(2.0 ** (self._quick_restarts - 1) if quick else 0.0):
            return
        self.watch = StubWatch(self.options.stopped_grace_s)
        self._last_scan = 0.0
        self.replaced_after_crash = 0
        try:
            pinned = self._start_serving_the_same_version()
        except Exception as exc:  # noqa: BLE001 - the next round sees the dead process and tries again
            incident.failed = str(exc)
            self.log(f"restarting tritonserver failed: {exc}")
            self._ready_since = None
            self.busy = None
            return
        if pinned is not None:
            incident.action += f" ({c.SEARCH_MODEL} kept at index version {pinned})"
        incident.recovered_after_s = round(time.monotonic() - started, 2)
        self._ready_since = time.monotonic()
        self.busy = None
        self.log(f"tritonserver restarted; ready after {incident.recovered_after_s:.1f} s"
                 + (f", serving index version {pinned} as before" if pinned is not None else ""))

    def _version_to_pin(self) -> int | None:
        """The product_search version a restart must load again: the one that served, when a plain start
        would load another (a newer one on disk). None when there is nothing to pin, or when it cannot
        be served any more (gone, damaged: logged, and the restart serves the newest servable)."""
        version = self.serving
        versions = self.repository.index_versions()
        if version is None or not versions or version == max(versions):
            return None
        if version not in versions:
            self.log(f"index version {version}, which served, is no longer on disk: the restart serves the newest "
                     "servable version")
            return None
        try:
            problem = version_problem(self.repository.search_dir / str(version), self.repository.manifest().fingerprint)
        except (OSError, ValueError) as exc:
            problem = str(exc)
        if problem is not None:
            self.log(f"index version {version}, which served, cannot be served any more ({problem}): the restart "
                     "serves the newest servable version")
            return None
        return version

    def _start_serving_the_same_version(self) -> int | None:
        """Starts tritonserver again and waits until it is ready, serving the product_search version that
        served before (`_version_to_pin`): product_search and the ensembles over it are held back at
        start (tritonserver would load its newest version), then product_search is loaded with that
        version pinned, then the ensembles, each with its own config (a plain load of an ensemble
        reloads its steps from disk). Returns the version pinned, or None for a plain start."""
        version = self._version_to_pin()
        if version is None:
            self.server.start()
            self.server.wait_ready(self.options.ready_timeout_s)
            return None
        held = [c.SEARCH_MODEL, *self.repository.ensembles_using(c.SEARCH_MODEL)]
        self.server.start(models=[m for m in self.repository.models() if m not in held])
        try:
            self.server.wait_live(self.options.ready_timeout_s)
            try:
                self.admin.load(c.SEARCH_MODEL, disk_config(self.repository, c.SEARCH_MODEL, version),
                                timeout_s=self.options.reload_timeout_s)
                for ensemble in held[1:]:
                    self.admin.load(ensemble, disk_config(self.repository, ensemble),
                                    timeout_s=self.options.reload_timeout_s)
            except AdminError as exc:  # say so, and serve rather than not: the newest, as a plain start would
                self.log(f"loading index version {version} again failed ({exc}): loading the newest version instead")
                version = None
                for model in held:
                    self.admin.load(model, timeout_s=self.options.reload_timeout_s)
            self.server.wait_ready(self.options.ready_timeout_s)
        except Exception:
            self.server.stop(timeout_s=self.options.stop_timeout_s)  # never left up with models missing
            raise
        self.serving = version
        return version


# -- /ready, /live, /status ----------------------------------------------------------------------
@dataclass(frozen=True)
class HealthLimits:
    """What one client of the health port can hold: it is probed every few seconds by load balancers
    and Kubernetes, and reachable by whoever reaches the host when bound beyond loopback."""

    max_connections: int = 64  # open at once; a new one beyond drops the oldest that has sent nothing yet
    read_timeout_s: float = 5.0  # for a request's line and headers, and for writing the answer
    max_request_bytes: int = 8192  # request line and headers


_REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 431: "Request Header Fields Too Large", 503: "Service Unavailable"}


class HealthServer:
    """GET /ready (200 or 503), /live (200), /status (JSON) for load balancers and orchestrators:
    unlike Triton's own endpoints, /ready turns 503 while a stub is dead or being replaced.

    One asyncio event loop in a thread of its own serves every connection: an idle socket costs a file
    descriptor and a few KB, never a thread; at most `limits.max_connections` are open (a new one drops
    the oldest that has not sent its request yet, so probes get through a flood of idle connections);
    a request's head must arrive within `limits.read_timeout_s` and fit `limits.max_request_bytes`;
    each connection gets one answer and is closed. Readiness is computed in a small thread pool, one
    computation at a time, shared by the probes that arrive meanwhile. /ready and /live need nothing
    (probes cannot carry a secret); /status needs `status_key` in the admin-key header when one is
    given (`lookalike serve` gives it beyond loopback, as for Triton's admin API)."""

    def __init__(self, supervisor_ref: Callable[[], Supervisor | None], host: str, port: int, *,
                 status_key: str | None = None, require_key: bool = False, limits: HealthLimits | None = None,
                 log: Log = lambda _m: None) -> None:
        self.get = supervisor_ref
        self.limits = limits or HealthLimits()
        self.require_key = require_key or status_key is not None
        self.status_key = status_key
        self.log = log
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.create_server((host, port), family=family, backlog=128)  # OSError: in use
        self.sock.setblocking(False)
        self.port = int(self.sock.getsockname()[1])
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(self._loop_error)
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lookalike-health")
        self.thread = threading.Thread(target=self._serve, name="lookalike-health", daemon=True)
        self._waiting: OrderedDict[asyncio.StreamWriter, None] = OrderedDict()  # no request received yet
        self._open: set[asyncio.StreamWriter] = set()
        self._readiness: asyncio.Future[tuple[bool, str]] | None = None
        self._server: asyncio.AbstractServer | None = None
        self._started = threading.Event()
        self._last_loop_error = 0.0

    def start(self) -> "HealthServer":
        self.thread.start()
        self._started.wait(10.0)
        return self

    def close(self) -> None:
        if self.thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(timeout=10.0)
            self.thread.join(10.0)
        self.pool.shutdown(wait=False)
        self.sock.close()

    # -- the loop ----------------------------------------------------------------------------------
    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._server = self.loop.run_until_complete(
            asyncio.start_server(self._handle, sock=self.sock, limit=self.limits.max_request_bytes))
        self._started.set()
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._open):
            writer.transport.abort()
        self.loop.call_soon(self.loop.stop)

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """asyncio's own errors (accept() out of file descriptors: it pauses accepting for a second and
        tries again), logged at most every 10 s."""
        now = time.monotonic()
        if now - self._last_loop_error >= 10.0:
            self._last_loop_error = now
            self.log(f"health port: {context.get('message')}: {context.get('exception')}")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        answered = False
        head = b""
        self._open.add(writer)
        self._waiting[writer] = None
        if len(self._open) > self.limits.max_connections and self._waiting:
            oldest = next(iter(self._waiting))
            self._waiting.pop(oldest)
            oldest.transport.abort()  # its _handle sees the connection lost and cleans up
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.limits.read_timeout_s)
            except asyncio.LimitOverrunError:
                code, body = 431, {"error": f"request line and headers over {self.limits.max_request_bytes} bytes"}
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                return  # idle, gone, or dropped for a newer connection
            else:
                self._waiting.pop(writer, None)
                code, body = await self._answer(head)
            data = json.dumps(body, indent=1).encode()
            head_only = head.startswith(b"HEAD ")
            writer.write(f"HTTP/1.1 {code} {_REASONS.get(code, '')}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                         + (b"" if head_only else data))
            await asyncio.wait_for(writer.drain(), self.limits.read_timeout_s)
            answered = True
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            self._waiting.pop(writer, None)
            self._open.discard(writer)
            if answered:
                writer.close()
            else:  # nothing owed, or a client that does not read its answer: no flushing, no waiting
                writer.transport.abort()

    async def _answer(self, head: bytes) -> tuple[int, dict[str, Any]]:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return 400, {"error": "not an HTTP request"}
        method, path = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, {"error": "GET /ready, /live or /status"}
        supervisor = self.get()
        if path in ("/live", "/v2/health/live"):
            return 200, {"live": True}
        if path in ("/ready", "/v2/health/ready"):
            ready, reason = await self._ready(supervisor)
            return (200 if ready else 503), {"ready": ready, "reason": reason}
        if path == "/status":
            if self.require_key and not self._authorised(lines[1:]):
                return 403, {"error": f"/status beyond loopback needs the header {c.ADMIN_KEY_HEADER} "
                                      f"(${c.ADMIN_KEY_ENV}); /ready and /live need nothing"}
            if supervisor is None:
                return 200, {"ready": False, "reason": "starting"}
            return 200, await self.loop.run_in_executor(self.pool, supervisor.status)
        return 404, {"error": "GET /ready, /live or /status"}

    async def _ready(self, supervisor: Supervisor | None) -> tuple[bool, str]:
        """The supervisor's readiness: one computation at a time, shared by every probe that arrives
        while it runs (each may ask tritonserver twice). What the supervisor knows on its own (a repair
        under way, a dead stub) is answered at once and overrides a shared answer that began before it."""
        if supervisor is None:
            return False, "starting"
        problem = supervisor.local_problem()
        if problem is not None:
            return False, problem
        if self._readiness is None or self._readiness.done():
            self._readiness = self.loop.run_in_executor(self.pool, supervisor.readiness)
        ready, reason = await asyncio.shield(self._readiness)
        problem = supervisor.local_problem()
        return (False, problem) if problem is not None else (ready, reason)

    def _authorised(self, header_lines: list[str]) -> bool:
        if not self.status_key:
            return False
        for line in header_lines:
            name, _, value = line.partition(":")
            if name.strip().lower() == c.ADMIN_KEY_HEADER:
                return hmac.compare_digest(value.strip().encode(), self.status_key.encode())
        return False
