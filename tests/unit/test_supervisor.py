"""lookalike.server.stubs and lookalike.server.supervisor without tritonserver: stub identities, which stubs count as
dead, orphans, and the /proc reading on real processes of this test."""

import os
import signal
import subprocess
import sys
import time

import pytest

from lookalike.server.stubs import StubId, StubProcess, kill_stubs_of, list_stubs, parse_stub_argv, read_state
from lookalike.server.supervisor import StubWatch

STUB = "/root/.cache/lookalike/backends-py3.11-x/python/triton_python_backend_stub"


def argv(model: str, version: str, instance: str) -> list[str]:
    return [STUB, f"/srv/repo/{model}/{version}/model.py", "triton_python_backend_shm_region_1", "1048576",
            "1048576", "4664", "/root/.cache/lookalike/backends-py3.11-x/python", "336", instance, "DEFAULT"]


def test_stub_identity_from_its_command_line():
    assert parse_stub_argv(argv("preprocess", "1", "preprocess_0_1")) == StubId("preprocess", "1", "preprocess_0_1")
    assert parse_stub_argv(argv("product_search", "12", "product_search_0_0")).version == "12"
    assert parse_stub_argv(["/usr/bin/python3", "x.py"]) is None
    assert parse_stub_argv([]) is None  # a zombie's command line is empty
    assert parse_stub_argv([STUB, "/srv/repo/m/1/model.py"]) is None  # truncated
    # the stub that auto-completes a config while the model loads is named after the model: transient
    assert parse_stub_argv(argv("product_search", "3", "product_search")) is None


PRE0, PRE1 = StubId("preprocess", "1", "preprocess_0_0"), StubId("preprocess", "1", "preprocess_0_1")


def test_a_crashed_stub_is_reported_once_and_a_replacement_heals_it():
    watch = StubWatch()
    watch.add([StubProcess(10, PRE0, 100), StubProcess(11, PRE1, 100)], {10: "S", 11: "S"})
    assert watch.dead({10: "S", 11: "R"}, now=0) == [] and watch.healthy()
    dead = watch.dead({10: "S", 11: "Z"}, now=1)
    assert [(d.stub, d.pid, d.how) for d in dead] == [(PRE1, 11, "crashed (zombie)")]
    assert watch.healthy()  # not until confirmed: an index swap stops stubs too
    watch.confirm(dead[0])
    assert not watch.healthy() and watch.is_dead(PRE1)
    assert watch.dead({10: "S", 11: "Z"}, now=2) == []  # reported once
    watch.add([StubProcess(20, PRE0, 300), StubProcess(21, PRE1, 300)], {20: "S", 21: "S"})  # the reload
    assert watch.healthy() and watch.tracked() == [20, 21]
    # the old generation is superseded, whatever its pid (pids wrap; start times do not)
    old = [StubProcess(10, PRE0, 100)]
    assert watch.superseded(old, {10: "S"}) == old
    assert watch.superseded(old, {10: None}) == []


def test_vanished_and_stopped_stubs():
    watch = StubWatch(stopped_grace_s=5)
    watch.add([StubProcess(10, PRE0, 100), StubProcess(11, PRE1, 100)], {10: "S", 11: "S"})
    assert [d.how for d in watch.dead({10: None, 11: "T"}, now=0)] == ["exited"]
    assert watch.dead({10: None, 11: "T"}, now=4) == []  # stopped, but not for long
    assert [d.how for d in watch.dead({10: None, 11: "T"}, now=6)] == ["stopped (state T) for 6 s"]
    watch.forget(PRE0)  # its version was unloaded: not a crash
    assert PRE0 not in watch.current


def test_an_older_stub_never_replaces_a_newer_one():
    watch = StubWatch()
    watch.add([StubProcess(30000, PRE0, 500)], {30000: "S"})
    watch.add([StubProcess(12, PRE0, 400)], {12: "S"})  # listed later, started earlier
    assert watch.current[PRE0].pid == 30000
    watch.add([StubProcess(13, PRE1, 400)], {13: "Z"})  # never track a stub first seen dead
    assert PRE1 not in watch.current


def state_becomes(pid: int, state: str, within_s: float = 10.0) -> bool:
    """Whether the process reaches `state` (the kernel applies a signal asynchronously; a loaded machine
    may take more than a moment)."""
    deadline = time.monotonic() + within_s
    while read_state(pid) != state and time.monotonic() < deadline:
        time.sleep(0.02)
    return read_state(pid) == state


def test_proc_reading_on_real_processes(tmp_path):
    """A fake stub under a parent: python running a model.py, with the stub's name as its argv[0]."""
    model_file = tmp_path / "repo" / "preprocess" / "3" / "model.py"
    model_file.parent.mkdir(parents=True)
    model_file.write_text("import time\ntime.sleep(60)\n")
    stub_argv = [str(tmp_path / "triton_python_backend_stub"), str(model_file), "shm", "1", "1", "1", "dir", "1",
                 "preprocess_0_0", "DEFAULT"]
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        f"subprocess.Popen({stub_argv!r}, executable=sys.executable)\n"
        "time.sleep(60)")])
    try:
        deadline = time.monotonic() + 10
        while not (found := list_stubs(parent.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [f.stub for f in found] == [StubId("preprocess", "3", "preprocess_0_0")]
        child = found[0].pid
        assert read_state(child) in ("S", "R", "D")  # alive: sleeping, running, or waiting on the disk (imports)
        os.kill(child, signal.SIGSTOP)
        assert state_becomes(child, "T")
        os.kill(child, signal.SIGKILL)
        assert state_becomes(child, "Z")  # its parent has not reaped it, as tritonserver does not
        assert list_stubs(parent.pid) == []  # a zombie has no command line
    finally:
        parent.kill()
        parent.wait()
    assert read_state(parent.pid) is None


def test_stubs_that_outlive_their_tritonserver_are_killed(tmp_path):
    """A stub names its tritonserver's pid (argv[5]); one left running after it died is killed."""
    model_file = tmp_path / "repo" / "embedder" / "1" / "model.py"
    model_file.parent.mkdir(parents=True)
    model_file.write_text("import time\ntime.sleep(60)\n")
    gone = 2**22 + 11  # no such tritonserver
    argv_ = [str(tmp_path / "triton_python_backend_stub"), str(model_file), "shm", "1", "1", str(gone), "dir", "1",
             "embedder_0_0", "DEFAULT"]
    orphan = subprocess.Popen(argv_, executable=sys.executable)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        deadline = time.monotonic() + 10
        while not open(f"/proc/{orphan.pid}/cmdline", "rb").read().startswith(argv_[0].encode()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert kill_stubs_of(gone) == [orphan.pid]
        assert orphan.wait(timeout=10) == -signal.SIGKILL
        assert other.poll() is None and kill_stubs_of(gone) == []
    finally:
        for process in (orphan, other):
            process.kill()
            process.wait()


class DeadProcess:
    pid = 2**22 + 13
    returncode = -9

    def poll(self):
        return self.returncode


class NeverStarts:
    """A tritonserver that died and whose every restart fails (say, its repository is gone)."""

    def __init__(self):
        from lookalike.server.launcher import ServerOptions

        self.options = ServerOptions(http_port=1, grpc_port=2, metrics_port=3)
        self.process = DeadProcess()
        self.starts = 0

    def stop(self, timeout_s=0):
        return -9

    def start(self):
        self.starts += 1
        raise RuntimeError("no model repository")

    def wait_ready(self, timeout_s=0):
        raise AssertionError("never reached")


class RecordingStop:
    """threading.Event for Supervisor.run, recording the waits instead of sleeping them."""

    def __init__(self):
        self.waits = []

    def wait(self, seconds):
        self.waits.append(seconds)
        return False

    def is_set(self):
        return False


def test_restarts_back_off_and_then_give_up():
    import pytest

    from lookalike.server.supervisor import Supervisor, SupervisorGaveUp, SupervisorOptions

    server = NeverStarts()
    lines = []
    supervisor = Supervisor(server, SupervisorOptions(interval_s=0.25, max_restarts=3), log=lines.append)
    stop = RecordingStop()
    with pytest.raises(SupervisorGaveUp, match="more than 3 restarts"):
        supervisor.run(stop)
    assert server.starts == 3
    backoffs = [w for w in stop.waits if w != 0.25]
    assert backoffs == [1.0, 2.0, 4.0][: len(backoffs)] and len(backoffs) >= 2, stop.waits
    assert [i.action for i in supervisor.incidents] == ["restart tritonserver"] * 4
    assert supervisor.incidents[-1].failed == "more than 3 restarts in 600 s"
    assert any("giving up" in line for line in lines)


def test_proc_that_cannot_be_read_is_not_a_dead_process(monkeypatch):
    """EMFILE (or EACCES) on /proc is the reader's own trouble: ProcUnreadable, never "gone" (None)."""
    import errno

    import pytest

    from lookalike.server import stubs

    def no_fds(*_args, **_kwargs):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(stubs, "open", no_fds, raising=False)
    with pytest.raises(stubs.ProcUnreadable, match="Too many open files"):
        read_state(os.getpid())
    with pytest.raises(stubs.ProcUnreadable):
        list_stubs(os.getpid())
    monkeypatch.undo()
    assert read_state(2**22 + 17) is None  # a pid that does not exist is still "gone"


def test_read_state_at_the_file_descriptor_limit_raises_instead_of_reporting_gone():
    """The real thing, in a child process that lowers its own descriptor limit below what it holds."""
    code = (
        "import os, resource, sys\n"
        "from lookalike.server.stubs import ProcUnreadable, read_state\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (3, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
        "try:\n"
        "    print(read_state(os.getppid()))\n"
        "except ProcUnreadable as exc:\n"
        "    print('unreadable', exc.errno)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    import errno

    assert out.stdout.split() == ["unreadable", str(errno.EMFILE)], out.stderr


def test_kill_stubs_of_retries_and_then_raises_when_proc_stays_unreadable(monkeypatch):
    import errno

    import pytest

    from lookalike.server import stubs

    calls = []

    def listdir(path):
        calls.append(path)
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(stubs.os, "listdir", listdir)
    with pytest.raises(stubs.ProcUnreadable):
        kill_stubs_of(2**22 + 11, attempts=3, retry_s=0)
    assert calls == ["/proc"] * 3


class AliveProcess:
    pid = os.getpid()
    returncode = None

    def poll(self):
        return None


class Running:
    """A tritonserver that runs (this test's own process stands in for it) and must never be restarted."""

    def __init__(self, tmp_path):
        from lookalike.server.launcher import ServerOptions

        self.options = ServerOptions(model_repository=tmp_path, http_port=1, grpc_port=2, metrics_port=3)
        self.process = AliveProcess()
        self.starts = self.stops = 0

    def stop(self, timeout_s=0):
        self.stops += 1
        return 0

    def start(self, models=None):
        self.starts += 1


class StopAfter(RecordingStop):
    def __init__(self, rounds):
        super().__init__()
        self.rounds = rounds

    def wait(self, seconds):
        self.waits.append(seconds)
        return len(self.waits) > self.rounds

    def is_set(self):
        return len(self.waits) > self.rounds


def test_the_supervisor_never_restarts_a_server_it_cannot_look_at(monkeypatch, tmp_path):
    """/proc unreadable (EMFILE) for several rounds, then readable again: logged, retried, nothing
    stopped or restarted; a dead stub seen meanwhile is looked at again, not acted on blind."""
    import errno

    from lookalike.server import supervisor as sup
    from lookalike.server.stubs import ProcUnreadable

    rounds = {"n": 0}

    def list_stubs_(pid):
        rounds["n"] += 1
        if rounds["n"] <= 4:
            raise ProcUnreadable("/proc/1/task", OSError(errno.EMFILE, "Too many open files"))
        return []

    monkeypatch.setattr(sup, "list_stubs", list_stubs_)
    monkeypatch.setattr(sup.Supervisor, "_refresh_serving", lambda self: None)
    server = Running(tmp_path)
    lines = []
    supervisor = sup.Supervisor(server, sup.SupervisorOptions(interval_s=0.01, scan_every_s=0.0), log=lines.append)
    supervisor.run(StopAfter(8))
    assert server.stops == 0 and server.starts == 0 and supervisor.incidents == []
    assert any("cannot watch tritonserver" in line and "Too many open files" in line for line in lines), lines
    assert any("watching tritonserver again" in line for line in lines), lines


class Dying:
    """A tritonserver killed a moment ago: its stubs are gone and its API is closed, but the process
    itself exits only after `delay_s` (a big process takes a while to tear down)."""

    def __init__(self, tmp_path, delay_s):
        from lookalike.server.launcher import ServerOptions

        self.options = ServerOptions(model_repository=tmp_path, http_port=1, grpc_port=2, metrics_port=3)
        self.process = subprocess.Popen([sys.executable, "-c", f"import os, time; time.sleep({delay_s}); os.kill(os.getpid(), 9)"])


@pytest.mark.parametrize("delay_s, reason", [(0.5, "tritonserver exited with code -9"),
                                             (30.0, "1 stub(s) dead and tritonserver does not answer")])
def test_dead_stubs_and_no_answer_name_a_tritonserver_that_is_still_exiting_as_exited(monkeypatch, tmp_path, delay_s, reason):
    from lookalike.server import supervisor as sup

    monkeypatch.setattr(sup, "list_stubs", lambda pid: [])
    monkeypatch.setattr(sup, "read_state", lambda pid: "Z")
    monkeypatch.setattr(sup.Supervisor, "_refresh_serving", lambda self: None)

    def unanswered(self):
        raise sup.AdminError("POST /v2/repository/index: connection refused")

    monkeypatch.setattr(sup.TritonAdmin, "model_states", unanswered)
    server = Dying(tmp_path, delay_s)
    try:
        supervisor = sup.Supervisor(server, sup.SupervisorOptions(exit_grace_s=3.0))
        supervisor.watch.add([StubProcess(10, PRE0, 100)], {10: "S"})
        restarts = []
        monkeypatch.setattr(supervisor, "_restart", lambda why, stop: restarts.append(why))
        assert [d.pid for d in supervisor.check()] == [10]
        assert len(restarts) == 1 and restarts[0].startswith(reason), restarts
    finally:
        server.process.kill()
        server.process.wait()


def test_a_dead_stub_is_reported_again_when_it_could_not_be_dealt_with():
    watch = StubWatch()
    watch.add([StubProcess(10, PRE0, 100)], {10: "S"})
    (dead,) = watch.dead({10: "Z"}, now=0)
    watch.confirm(dead)
    watch.retry(dead)
    assert watch.healthy()  # not confirmed any more
    assert [d.pid for d in watch.dead({10: "Z"}, now=1)] == [10]  # reported again


class Restartable:
    """A tritonserver for `Supervisor._restart`, recording how it is started and what is loaded."""

    def __init__(self, repo_root):
        from lookalike.server.launcher import ServerOptions

        self.options = ServerOptions(model_repository=repo_root, http_port=1, grpc_port=2, metrics_port=3)
        self.process = DeadProcess()
        self.started_with = []
        self.stops = 0

    def stop(self, timeout_s=0):
        self.stops += 1
        return -9

    def start(self, models=None):
        self.started_with.append(models)
        self.process = AliveProcess()

    def wait_live(self, timeout_s=0):
        pass

    def wait_ready(self, timeout_s=0):
        pass


class Loads:
    """TritonAdmin.load, recorded; `refuse` names models whose pinned load fails."""

    def __init__(self, refuse=()):
        self.calls, self.refuse = [], set(refuse)

    def __call__(self, model, config=None, timeout_s=0):
        from lookalike.server.supervisor import AdminError

        pinned = (config or {}).get("version_policy", {}).get("specific", {}).get("versions")
        self.calls.append((model, pinned))
        if pinned and model in self.refuse:
            raise AdminError(f"load of {model}: HTTP 400")


def versioned_repo(tmp_path, versions=2):
    """A model repository with the committed product_search and ensemble configs and `versions` index
    versions of one embedder."""
    import shutil

    import numpy as np

    from lookalike.indexing.publishing import write_index_version
    from lookalike.indexing.repository import Repository
    from lookalike.serving.artifacts import EmbedderManifest
    from lookalike.serving.index_files import Product
    from lookalike.serving.search import ProductIndex
    from tests.conftest import REPOSITORY

    for model in ("product_search", "visual_search", "similar_products", "embed_image", "preprocess"):
        (tmp_path / model).mkdir(parents=True)
        shutil.copy(REPOSITORY / model / "config.pbtxt", tmp_path / model / "config.pbtxt")
    shutil.copy(REPOSITORY / "product_search" / "model.py", tmp_path / "product_search" / "model.py")
    (tmp_path / "embedder").mkdir()
    EmbedderManifest(model="test", dim=8, input=(3, 8, 8), fingerprint="fp").save(tmp_path / "embedder" / "manifest.json")
    repo = Repository(tmp_path)
    for _ in range(versions):
        index = ProductIndex.build([Product("a")], np.eye(1, 8, dtype=np.float32), embedder_fingerprint="fp")
        write_index_version(repo, index.save)
    return repo


def restart_serving(tmp_path, served, refuse=()):
    from lookalike.server.supervisor import Supervisor, SupervisorOptions

    repo = versioned_repo(tmp_path)
    server = Restartable(repo.root)
    lines = []
    supervisor = Supervisor(server, SupervisorOptions(), log=lines.append)
    supervisor.admin.load = Loads(refuse)
    supervisor.serving = served
    supervisor._ready_since = -1e9  # long ready: no back-off wait
    supervisor._restart("tritonserver exited with code -9", None)
    return repo, server, supervisor, lines


def test_a_restart_loads_the_version_that_served_pinned_after_the_other_models(tmp_path):
    repo, server, supervisor, lines = restart_serving(tmp_path, served=1)  # version 2 sits on disk, never served
    assert server.started_with == [["embed_image", "preprocess"]]  # product_search and its ensembles held back
    assert supervisor.admin.load.calls == [("product_search", [1]), ("similar_products", None), ("visual_search", None)]
    assert supervisor.serving == 1 and supervisor.incidents[-1].action.endswith("(product_search kept at index version 1)")
    assert any("serving index version 1 as before" in line for line in lines)


def test_a_restart_is_plain_when_the_newest_served_and_says_so_when_the_version_is_gone(tmp_path):
    _, server, supervisor, _ = restart_serving(tmp_path / "a", served=2)
    assert server.started_with == [None] and supervisor.admin.load.calls == []  # --load-model=*
    _, server, supervisor, lines = restart_serving(tmp_path / "b", served=7)
    assert server.started_with == [None]
    assert any("index version 7, which served, is no longer on disk" in line for line in lines)


def test_a_pinned_load_that_fails_falls_back_to_the_newest_rather_than_serving_nothing(tmp_path):
    _, server, supervisor, lines = restart_serving(tmp_path, served=1, refuse={"product_search"})
    assert supervisor.admin.load.calls == [("product_search", [1]), ("product_search", None),
                                           ("similar_products", None), ("visual_search", None)]
    assert any("loading index version 1 again failed" in line for line in lines)
    assert supervisor.incidents[-1].recovered_after_s is not None and "kept" not in supervisor.incidents[-1].action


# -- a read-only model repository (the pods' index volume) ----------------------------------------
def serve_read_only(tmp_path, monkeypatch, damage_newest: bool):
    """`serve_forever`'s first start on a repository it cannot write, with versions 1 and 2 on disk."""
    import lookalike.server.serve as serve
    from lookalike.indexing.repository import Repository
    from lookalike.server.supervisor import Supervisor, TritonAdmin

    repo = versioned_repo(tmp_path)
    if damage_newest:
        index_file = repo.search_dir / "2" / "index.faiss"
        index_file.write_bytes(index_file.read_bytes()[:-8])
    server = Restartable(repo.root)
    server.options.health_port = None
    server.stop = lambda timeout_s=0: 0
    loads = Loads()
    monkeypatch.setattr(Repository, "writable", lambda self: False)
    monkeypatch.setattr(serve, "lookalike_server", lambda options: server)
    monkeypatch.setattr(TritonAdmin, "load", lambda self, *args, **kwargs: loads(*args, **kwargs))
    monkeypatch.setattr(Supervisor, "run", lambda self, stop: None)
    assert serve.serve_forever(server.options) == 0
    return server, loads


def test_serve_on_a_read_only_repository_pins_the_newest_servable_version(tmp_path, monkeypatch):
    """Version 2 cannot be served and cannot be set aside: tritonserver would load it, so version 1 is
    loaded pinned, product_search and its ensembles held back at start."""
    server, loads = serve_read_only(tmp_path, monkeypatch, damage_newest=True)
    assert server.started_with == [["embed_image", "preprocess"]]
    assert loads.calls == [("product_search", [1]), ("similar_products", None), ("visual_search", None)]


def test_serve_on_a_read_only_repository_starts_plainly_when_the_newest_can_be_served(tmp_path, monkeypatch):
    server, loads = serve_read_only(tmp_path, monkeypatch, damage_newest=False)
    assert server.started_with == [None] and loads.calls == []  # --load-model=*


def test_the_version_served_is_not_recorded_in_a_read_only_repository_and_that_is_said_once(tmp_path, monkeypatch):
    from lookalike.indexing.repository import Repository
    from lookalike.server.supervisor import Supervisor, SupervisorOptions

    repo = versioned_repo(tmp_path)
    monkeypatch.setattr(Repository, "writable", lambda self: False)
    lines = []
    supervisor = Supervisor(Restartable(repo.root), SupervisorOptions(), log=lines.append)
    for version in (1, 2, 2):
        supervisor.serving = version
        supervisor._publish_serving()
    assert not repo.serving_dir.exists()
    assert len([line for line in lines if "read-only" in line]) == 1 and len(lines) == 1, lines
