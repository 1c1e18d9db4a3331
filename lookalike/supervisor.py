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

Readiness. `HealthServer` answers GET /ready with 200 only while tritonserver reports ready, no
stub is dead and no recovery is under way (503 and the reason otherwise), GET /live with 200 while
the supervisor runs, and GET /status with the incidents so far, as JSON.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Callable

from lookalike_client import contract as c

from .stubs import DEAD_STATES, STOPPED_STATES, StubId, StubProcess, list_stubs, read_state

if TYPE_CHECKING:
    from .server import TritonServer

Log = Callable[[str], None]

RECOVERY_PARAMETER = "lookalike_recovery"


class SupervisorGaveUp(RuntimeError):
    pass


class AdminError(RuntimeError):
    pass


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
            raise AdminError(f"{method} {path}: {exc}") from exc

    def ok(self, path: str) -> bool:
        try:
            return self._call("GET", path, timeout_s=2.0)[0] == 200
        except AdminError:
            return False

    def server_ready(self) -> bool:
        return self.ok("/v2/health/ready")

    def model_states(self) -> dict[tuple[str, str], str]:
        """(model, version) -> READY | LOADING | UNLOADING | UNAVAILABLE, from the repository index."""
        status, body = self._call("POST", "/v2/repository/index", {})
        if status != 200:
            raise AdminError(f"repository index: HTTP {status}: {body[:200]!r}")
        return {(m["name"], str(m.get("version", ""))): m.get("state", "") for m in json.loads(body)}

    def reload(self, model: str, token: str, timeout_s: float = 300.0) -> None:
        """Loads `model` again even though nothing changed on disk: with its served config, in which
        only RECOVERY_PARAMETER differs from the config it was loaded with."""
        status, body = self._call("GET", f"/v2/models/{model}/config")
        if status != 200:
            raise AdminError(f"config of {model}: HTTP {status}: {body[:200]!r}")
        config = json.loads(body)
        config.setdefault("parameters", {})[RECOVERY_PARAMETER] = {"string_value": token}
        status, body = self._call("POST", f"/v2/repository/models/{model}/load",
                                  {"parameters": {"config": json.dumps(config)}}, timeout_s=timeout_s)
        if status != 200:
            raise AdminError(f"reload of {model}: HTTP {status}: {body[:300].decode(errors='replace')}")


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


class Supervisor:
    def __init__(self, server: "TritonServer", options: SupervisorOptions | None = None, log: Log = print) -> None:
        self.server = server
        self.options = options or SupervisorOptions()
        self.log = log
        self.admin = TritonAdmin(server.options.http_url, server.options.effective_admin_key)
        self.watch = StubWatch(self.options.stopped_grace_s)
        self.incidents: list[Incident] = []
        self.busy: str | None = None  # what the supervisor is repairing right now
        # Models replaced after a crash since tritonserver started: their old instances may never
        # finish unloading (tritonserver 2.51 waits, without a timeout, for the health mutex if the
        # killed stub held it), so its shutdown may run into --exit-timeout-secs and exit with 1.
        self.replaced_after_crash = 0
        self.restarts: list[float] = []
        self._lock = threading.Lock()
        self._last_scan = 0.0
        self._orphans: dict[int, float] = {}  # superseded stub pid -> when first seen so
        self._ready_since: float | None = time.monotonic()  # of the current tritonserver; None: failed to start
        self._quick_restarts = 0

    # -- state for /ready and /status --------------------------------------------------------------
    def readiness(self) -> tuple[bool, str]:
        process = self.server.process
        if process is None or process.poll() is not None:
            return False, "tritonserver is not running"
        if self.busy:
            return False, self.busy
        if not self.watch.healthy():
            return False, "a Python-backend stub is dead"
        if not self.admin.server_ready() or not self.admin.ok(f"/v2/models/{c.VISUAL_SEARCH_MODEL}/ready"):
            return False, "tritonserver reports not ready"
        return True, "ready"

    def status(self) -> dict:
        ready, reason = self.readiness()
        with self._lock:
            incidents = [asdict(i) for i in self.incidents[-50:]]
        return {"ready": ready, "reason": reason, "tritonserver_pid": getattr(self.server.process, "pid", None),
                "stubs": {str(stub): p.pid for stub, p in sorted(list(self.watch.current.items()))},
                "restarts": len(self.restarts), "incidents": incidents}

    def _record(self, incident: Incident) -> Incident:
        with self._lock:
            self.incidents.append(incident)
        return incident

    # -- the loop ----------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Watches and repairs until `stop` is set. Raises SupervisorGaveUp after too many restarts."""
        while not stop.wait(self.options.interval_s):
            process = self.server.process
            if process is None or process.poll() is not None:
                if stop.is_set():
                    return
                self._restart(f"tritonserver exited with code {None if process is None else process.returncode}", stop)
                continue
            self.check(stop)

    def check(self, stop: threading.Event | None = None) -> list[DeadStub]:
        """One round: find dead stubs, tell them from unloaded ones, repair their models."""
        now = time.monotonic()
        pid = self.server.process.pid if self.server.process else None
        if pid is None:
            return []
        found: list[StubProcess] = []
        if now - self._last_scan >= self.options.scan_every_s:
            found = list_stubs(pid)
            self._last_scan = now
        states = {p: read_state(p) for p in {f.pid for f in found} | set(self.watch.tracked())}
        self.watch.add(found, states)
        if found:
            self._reap_orphans(self.watch.superseded(found, states), now)
        dead = self.watch.dead(states, now)
        if not dead:
            return []
        try:
            served = self.admin.model_states()
        except AdminError as exc:
            process = self.server.process
            if process is not None and process.poll() is not None:  # its stubs died with it
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

    def _recover(self, model: str, dead: list[DeadStub], stop: threading.Event | None) -> None:
        what = "; ".join(f"stub {d.stub} pid {d.pid} {d.how}" for d in dead)
        incident = self._record(Incident(time.time(), what, action=f"reload {model}"))
        self.busy = f"recovering {model}: {what}"
        self.log(f"{what}: reloading {model}")
        started = time.monotonic()
        try:
            self._while_tritonserver_runs(lambda: self.admin.reload(model, token=f"{time.time():.6f}"),
                                          self.options.reload_timeout_s, f"reloading {model}")
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
            self.server.start()
            self.server.wait_ready(self.options.ready_timeout_s)
        except Exception as exc:  # noqa: BLE001 - the next round sees the dead process and tries again
            incident.failed = str(exc)
            self.log(f"restarting tritonserver failed: {exc}")
            self._ready_since = None
            self.busy = None
            return
        incident.recovered_after_s = round(time.monotonic() - started, 2)
        self._ready_since = time.monotonic()
        self.busy = None
        self.log(f"tritonserver restarted; ready after {incident.recovered_after_s:.1f} s")


# -- /ready, /live, /status ----------------------------------------------------------------------
class HealthServer:
    """GET /ready (200 or 503), /live (200), /status (JSON) for load balancers and orchestrators:
    unlike Triton's own endpoints, /ready turns 503 while a stub is dead or being replaced."""

    def __init__(self, supervisor_ref: Callable[[], Supervisor | None], host: str, port: int) -> None:
        get = supervisor_ref

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                supervisor = get()
                if self.path in ("/live", "/v2/health/live"):
                    self._send(200, {"live": True})
                elif self.path in ("/ready", "/v2/health/ready"):
                    ready, reason = supervisor.readiness() if supervisor else (False, "starting")
                    self._send(200 if ready else 503, {"ready": ready, "reason": reason})
                elif self.path == "/status":
                    self._send(200, supervisor.status() if supervisor else {"ready": False, "reason": "starting"})
                else:
                    self._send(404, {"error": "GET /ready, /live or /status"})

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body, indent=1).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - probes every second: not logged
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="lookalike-health", daemon=True)

    def start(self) -> "HealthServer":
        self.thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

