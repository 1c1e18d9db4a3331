"""Measure how `lookalike serve` recovers when a part of it is killed under load.

Starts `lookalike serve` (as an operator would: its supervisor and health endpoint included) on free
loopback ports over a copy of the model repository, indexes the catalog, then, while clients search
without pause, kills with SIGKILL in turn a stub of each Python-backend model and tritonserver
itself, each `--repeats` times. For every kill it records when /ready turned 503 (detected), when it
was 200 again with the supervisor's repair done (recovered), and how many requests failed. Prints a
table, writes OUT/recovery.json and OUT/recovery.md.

    .venv/bin/python -m loadtest.benchmarks.recovery --catalog data/sample_catalog --out results

The helpers (`Serve`, `Traffic`) are also what the integration tests drive the server with.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from lookalike.indexing.repository import Repository, copy_repository
from lookalike.server.launcher import ServerOptions, free_port
from lookalike_client import LookalikeClient, ServerUnavailableError, wait_for
from lookalike_client import contract as c

ROOT = Path(__file__).resolve().parents[2]
LOOKALIKE = os.path.join(os.path.dirname(sys.executable), "lookalike")
MODELS = (c.PREPROCESS_MODEL, c.EMBEDDER_MODEL, c.SEARCH_MODEL)


@dataclass
class Serve:
    """`lookalike serve` in a subprocess, on the given ports, logging to `log`."""

    repo: Repository
    options: ServerOptions
    log: Path
    process: subprocess.Popen | None = None
    args: list[str] = field(default_factory=list)  # more `lookalike serve` arguments
    env: dict[str, str] | None = None  # its environment (default: this process's)

    @classmethod
    def fresh(cls, workdir: Path, source: Path = ROOT / "model_repository") -> "Serve":
        repo = copy_repository(source, workdir / "model_repository")
        options = ServerOptions(model_repository=repo.root, http_port=free_port(), grpc_port=free_port(),
                                metrics_port=free_port(), health_port=free_port())
        return cls(repo, options, workdir / "serve.log")

    @property
    def grpc(self) -> str:
        return self.options.grpc_url

    @property
    def http(self) -> str:
        return self.options.http_url

    def health(self, path: str = "/ready", headers: dict[str, str] | None = None) -> tuple[int, dict]:
        request = urllib.request.Request(f"http://{self.options.client_host}:{self.options.health_port}{path}",
                                         headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())
        except OSError as exc:
            return 0, {"error": str(exc)}

    def start(self, wait: bool = True) -> "Serve":
        o = self.options
        args = [LOOKALIKE, "serve", "--model-repository", str(self.repo.root), "--http-port", str(o.http_port),
                "--grpc-port", str(o.grpc_port), "--metrics-port", str(o.metrics_port), "--health-port", str(o.health_port),
                *self.args]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log,
                                            env=None if self.env is None else {**os.environ, **self.env})
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout_s: float = 180) -> float:
        """Seconds until the health endpoint's /ready says 200."""
        process = self.process
        assert process is not None

        def exited() -> str | None:
            return None if process.poll() is None else f"lookalike serve exited with {process.returncode}"

        try:
            return wait_for(lambda: self.health()[0] == 200, timeout_s, what="lookalike serve", interval_s=0.05,
                            abort=exited)
        except ServerUnavailableError as exc:
            raise RuntimeError(f"{exc}:\n{self.text()[-3000:]}") from None

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def lookalike_lines(self) -> list[str]:
        return [line for line in self.text().splitlines() if line.startswith("lookalike")]

    def status(self) -> dict:
        key = (self.env or {}).get(c.ADMIN_KEY_ENV)
        return self.health("/status", {c.ADMIN_KEY_HEADER: key} if key else None)[1]

    def tritonserver_pid(self) -> int:
        return int(self.status()["tritonserver_pid"])

    def stub_pid(self, model: str) -> int:
        """A stub serving `model` now, of its newest version (older ones may linger, serving nothing)."""
        stubs = [(int(name.rsplit(" ", 1)[1].rstrip(")")), pid) for name, pid in self.status()["stubs"].items()
                 if f"({model} version " in name]
        return max(stubs)[1]


@dataclass
class Traffic:
    """Clients searching without pause over gRPC; every request's start, end and outcome."""

    url: str
    images: list[bytes]
    threads: int = 4
    results: list = field(default_factory=list)

    def __enter__(self) -> "Traffic":
        self._stop = threading.Event()
        self._workers = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.threads)]
        for worker in self._workers:
            worker.start()
        return self

    def _run(self, worker: int) -> None:
        with LookalikeClient(self.url, timeout_s=60) as client:
            i = worker
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    outcome: object = len(client.search(self.images[i % len(self.images)], top_k=5))
                except Exception as exc:  # noqa: BLE001 - recorded, judged by the caller
                    outcome = exc
                self.results.append((started, time.monotonic(), outcome))
                i += self.threads

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=120)

    def failures(self, started_after: float = 0.0) -> list:
        return [r for r in self.results if isinstance(r[2], Exception) and r[0] >= started_after]


def kill_and_recover(serve: Serve, target: str, traffic_images: list[bytes], settle_s: float = 3.0) -> dict:
    """SIGKILLs a stub of `target` (a model) or tritonserver itself under load; times the recovery."""
    pid = serve.tritonserver_pid() if target == "tritonserver" else serve.stub_pid(target)
    before = len(serve.status()["incidents"])
    with Traffic(serve.grpc, traffic_images) as traffic:
        time.sleep(1.0)
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        detected = None
        while True:  # until /ready has said 503 and then 200, with the supervisor's repair done
            code, answer = serve.health()
            now = time.monotonic()
            if code != 200 and detected is None:
                detected = now
            # /status only once /ready is 200 again: asked meanwhile, it could hold the loop past the repair
            if code == 200 and detected is not None and any(
                    i["recovered_after_s"] is not None for i in serve.status().get("incidents", [])[before:]):
                break
            if now - killed > 120:
                raise RuntimeError(f"{target}: no recovery in 120 s; /ready {code} {answer}; /status {serve.status()}\n"
                                   f"{serve.text()[-2000:]}")
            time.sleep(0.02)
        ready = time.monotonic()
        time.sleep(settle_s)
    lost = traffic.failures(started_after=killed - 5)
    return {
        "target": target, "pid": pid, "incidents": serve.status()["incidents"][before:],
        "detected_s": round(detected - killed, 3), "ready_s": round(ready - killed, 3),
        "requests": len(traffic.results), "failed": len(lost),
        "failed_after_ready": len(traffic.failures(started_after=ready)),
        "last_failure_started_s": round(max(r[0] for r in lost) - killed, 3) if lost else None,
        "errors": sorted({str(r[2])[-80:] for r in lost}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", type=Path, default=Path("data/sample_catalog"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    from lookalike.indexing.indexer import index_catalog

    images = [p.read_bytes() for p in sorted((args.catalog / "queries").rglob("*"))[:32] if p.is_file()]
    runs = []
    with tempfile.TemporaryDirectory(prefix="lookalike-recovery-") as tmp:
        serve = Serve.fresh(Path(tmp)).start()
        try:
            with LookalikeClient(serve.grpc, timeout_s=120) as client:
                index_catalog(args.catalog / "catalog.csv", serve.repo, client, progress=False)
            for target in (*MODELS, "tritonserver"):
                for _ in range(args.repeats):
                    runs.append(kill_and_recover(serve, target, images))
                    print(json.dumps({k: v for k, v in runs[-1].items() if k != "errors"}), flush=True)
                    # a tritonserver that dies within 10 s of a restart is restarted with a back-off:
                    # measure single crashes, not a crash loop
                    time.sleep(10.0 if target == "tritonserver" else 2.0)
            serve.stop()
            started = time.monotonic()
            serve.start()
            restart_s = time.monotonic() - started
        finally:
            if serve.process is not None and serve.process.poll() is None:
                serve.stop()
    rows = []
    for target in (*MODELS, "tritonserver"):
        mine = [r for r in runs if r["target"] == target]
        rows.append({
            "killed": "tritonserver" if target == "tritonserver" else f"{target} stub",
            "kills": len(mine),
            "detected_s": statistics.median(r["detected_s"] for r in mine),
            "ready_s_median": statistics.median(r["ready_s"] for r in mine),
            "ready_s_max": max(r["ready_s"] for r in mine),
            "failed": sum(r["failed"] for r in mine), "requests": sum(r["requests"] for r in mine),
            "failed_after_ready": sum(r["failed_after_ready"] for r in mine),
            "last_failure_s": statistics.median(r["last_failure_started_s"] or 0.0 for r in mine),
        })
    table = ["| killed (SIGKILL, under load) | kills | /ready 503 after | ready again after (median / max) "
             "| last failed request started | requests failed / sent | failed after ready |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        table.append(f"| {r['killed']} | {r['kills']} | {r['detected_s']:.2f} s | {r['ready_s_median']:.2f} / "
                     f"{r['ready_s_max']:.2f} s | {r['last_failure_s']:.2f} s | {r['failed']} / {r['requests']} "
                     f"| {r['failed_after_ready']} |")
    table.append(f"\n`lookalike serve` stopped with SIGTERM and started again at once on the same ports: ready after "
                 f"{restart_s:.1f} s.")
    args.out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.node()} ({os.cpu_count()} CPUs), {platform.platform()}"
    (args.out / "recovery.json").write_text(json.dumps({"machine": machine, "runs": runs, "summary": rows,
                                                         "restart_at_once_s": restart_s}, indent=1))
    (args.out / "recovery.md").write_text("\n".join(table) + "\n")
    print("\n" + "\n".join(table))


if __name__ == "__main__":
    main()
