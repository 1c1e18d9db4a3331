"""The health port (`lookalike.server.supervisor.HealthServer`) on a real socket, without tritonserver: a
flood of idle connections neither exhausts it nor starves the probes, a slow or oversized request is
cut off, and /status needs the admin key where it is required."""

import os
import socket
import threading
import time

import pytest

from lookalike.server.supervisor import HealthLimits, HealthServer


class Ready:
    """Stands in for the Supervisor: ready, with a status, counting how often it is asked."""

    def __init__(self, delay_s: float = 0.0):
        self.asked = 0
        self.delay_s = delay_s
        self.busy: str | None = None

    def local_problem(self):
        return self.busy

    def readiness(self):
        self.asked += 1
        time.sleep(self.delay_s)
        return True, "ready"

    def status(self):
        return {"ready": True, "incidents": []}


def get(port: int, path: str, headers: dict[str, str] | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    """One HTTP/1.1 request on a fresh connection: (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def health():
    supervisor = Ready()
    server = HealthServer(lambda: supervisor, "127.0.0.1", 0,
                          limits=HealthLimits(max_connections=32, read_timeout_s=1.0, max_request_bytes=2048)).start()
    server.supervisor = supervisor
    yield server
    server.close()


def test_probes_get_through_a_flood_of_idle_connections_with_bounded_fds_and_threads(health):
    threads, fds = threading.active_count(), open_fds()
    idle = []
    for _ in range(300):  # each sends a request line and never finishes its headers
        sock = socket.create_connection(("127.0.0.1", health.port), timeout=10)
        sock.sendall(b"GET /ready HTTP/1.1\r\n")
        idle.append(sock)
    time.sleep(0.3)
    try:
        assert get(health.port, "/ready")[0] == 200  # a probe drops the oldest idle connection, not itself
        assert get(health.port, "/live")[0] == 200
        # the server side holds at most its cap of the 300 (the client side holds all 300 here)
        assert open_fds() - fds <= 300 + 32 + 4
        assert threading.active_count() <= threads + 2  # no thread per connection (the pool's workers at most)
    finally:
        for sock in idle:
            sock.close()


def test_a_connection_that_sends_nothing_is_closed_after_the_read_timeout(health):
    with socket.create_connection(("127.0.0.1", health.port), timeout=10) as sock:
        sock.sendall(b"GET /ready HTTP/1.1\r\n")  # and never the blank line
        started = time.monotonic()
        assert sock.recv(100) == b""  # closed by the server, with no answer owed
        assert 0.5 < time.monotonic() - started < 5.0


def test_oversized_and_odd_requests_get_their_status(health):
    code, _ = get(health.port, "/ready", headers={"X-Big": "y" * 4000})
    assert code == 431
    with socket.create_connection(("127.0.0.1", health.port), timeout=10) as sock:
        sock.sendall(b"POST /ready HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 405")
    assert get(health.port, "/nope")[0] == 404
    assert get(health.port, "/status")[0] == 200  # no key required on loopback


def test_concurrent_probes_share_one_readiness_check():
    supervisor = Ready(delay_s=0.5)
    server = HealthServer(lambda: supervisor, "127.0.0.1", 0).start()
    try:
        results = []
        probes = [threading.Thread(target=lambda: results.append(get(server.port, "/ready")[0])) for _ in range(20)]
        for probe in probes:
            probe.start()
        for probe in probes:
            probe.join(30)
        assert results == [200] * 20
        assert supervisor.asked <= 3  # 20 probes, one check in flight at a time
    finally:
        server.close()


def test_a_repair_that_begins_during_a_shared_check_is_answered_503_at_once():
    """tritonserver may answer a readiness check only after a reload has finished: probes that arrive
    once the supervisor has begun a repair get 503 at once, including those waiting on a check that
    began before it, which must not answer them "ready"."""
    supervisor = Ready(delay_s=1.0)
    server = HealthServer(lambda: supervisor, "127.0.0.1", 0).start()
    try:
        waiting = []
        first = threading.Thread(target=lambda: waiting.append(get(server.port, "/ready")))
        first.start()
        time.sleep(0.2)  # the shared check is under way
        supervisor.busy = "recovering product_search: stub crashed"
        started = time.monotonic()
        code, body = get(server.port, "/ready")
        assert code == 503 and b"recovering product_search" in body and time.monotonic() - started < 0.5
        first.join(10)
        assert waiting[0][0] == 503  # the check that began before the repair does not say ready
        supervisor.busy = None
        assert get(server.port, "/ready")[0] == 200
    finally:
        server.close()


def test_status_needs_the_admin_key_where_required_and_ready_never_does():
    supervisor = Ready()
    server = HealthServer(lambda: supervisor, "127.0.0.1", 0, status_key="s3cret", require_key=True).start()
    try:
        assert get(server.port, "/status")[0] == 403
        assert get(server.port, "/status", {"lookalike-admin-key": "wrong"})[0] == 403
        code, body = get(server.port, "/status", {"Lookalike-Admin-Key": "s3cret"})
        assert code == 200 and b'"incidents"' in body
        assert get(server.port, "/ready")[0] == 200 and get(server.port, "/live")[0] == 200
    finally:
        server.close()
    # required but no key configured: nobody gets /status
    server = HealthServer(lambda: supervisor, "127.0.0.1", 0, require_key=True).start()
    try:
        assert get(server.port, "/status", {"lookalike-admin-key": ""})[0] == 403
    finally:
        server.close()


def test_the_port_in_use_is_refused_at_construction():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            HealthServer(lambda: None, "127.0.0.1", taken.getsockname()[1])
