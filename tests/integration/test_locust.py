"""loadtest/locustfile.py against the real server: gRPC and HTTP users in 2 locust worker processes, every
task reported, the deliberately bad images counted as successes only when refused, exit status 0 on no
failures and non-zero when requests fail."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOCUST = Path(sys.executable).with_name("locust")


def run_locust(server, catalog, out: Path, *extra: str, seconds: int = 12) -> subprocess.CompletedProcess:
    """locust's exit, with its output in `stdout` (from a file: a lingering worker process holding a
    pipe would make the wait outlast the master); then nothing of its process group may be left."""
    host, grpc_port = server.options.grpc_url.rsplit(":", 1)
    http_port = server.options.http_url.rsplit(":", 1)[1]
    command = [str(LOCUST), "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless", "-u", "4", "-r", "4",
               "-t", f"{seconds}s", "--host", host, "--grpc-port", grpc_port, "--http-port", http_port,
               "--images", str(catalog / "catalog.csv"), "--check-fail-ratio", "0", "--csv", str(out / "locust"),
               "--only-summary", "--stop-timeout", "5", *extra]
    log = out / "locust.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        try:
            code = process.wait(timeout=seconds + 90)
        finally:
            if process.poll() is None:
                process.kill()
    leftovers = group_members(process.pid)
    deadline = time.monotonic() + 10  # forked workers quit within a second or two of their master
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.5)
        leftovers = group_members(process.pid)
    if leftovers:
        os.killpg(process.pid, signal.SIGKILL)
    output = log.read_text()
    assert not leftovers, f"locust processes {leftovers} outlived the master:\n{output[-3000:]}"
    return subprocess.CompletedProcess(command, code, output, output)


def group_members(pgid: int) -> list[int]:
    """Live processes of a process group (zombies aside)."""
    import psutil

    members = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(p.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def stats(out: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(out / "locust_stats.csv") as handle:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(handle)}


def test_locust_drives_both_protocols_in_two_processes_with_no_failure(server, catalog, tmp_path):
    run = run_locust(server, catalog, tmp_path, "--processes", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    rows = stats(tmp_path)
    assert int(rows[("", "Aggregated")]["Failure Count"]) == 0
    for protocol in ("grpc", "http"):
        for name in ("visual_search", "embed_image", "similar_products"):
            assert int(rows[(protocol, name)]["Request Count"]) > 0, (protocol, name)
    bad = [k for k in rows if "bad image" in k[1]]
    assert bad and sum(int(rows[k]["Request Count"]) for k in bad) > 0
    assert server.ready()


def test_locust_exits_non_zero_when_requests_fail(server, catalog, tmp_path):
    """A port nothing listens on: every request fails, and the run says so by its exit status."""
    host = server.options.grpc_url.rsplit(":", 1)[0]
    run = subprocess.run(
        [str(LOCUST), "-f", str(ROOT / "loadtest" / "locustfile.py"), "HttpUser", "--headless", "-u", "1", "-r", "1",
         "-t", "3s", "--host", host, "--http-port", "1", "--images", str(catalog / "catalog.csv"),
         "--check-fail-ratio", "0", "--csv", str(tmp_path / "locust"), "--only-summary"],
        capture_output=True, text=True, timeout=90, cwd=ROOT)
    assert run.returncode != 0
    assert int(stats(tmp_path)[("", "Aggregated")]["Failure Count"]) > 0
