"""locust load test of a running lookalike server through the client SDK: gRPC and HTTP users.

    make loadtest [USERS=16 SPAWN_RATE=4 DURATION=60s URL=127.0.0.1 PROTOCOL=both|grpc|http PROCESSES=1]
    .venv/bin/locust -f loadtest/locustfile.py --headless -u 16 -r 4 -t 60s --host 127.0.0.1 \\
        --images data/sample_catalog/catalog.csv --check-fail-ratio 0 --csv results/locust/locust

Each user sends back to back (no think time: the load is set by the number of users). Tasks, by weight:
search a photo (visual_search), embed one (embed_image), "customers also viewed" (similar_products, when
the server holds the catalog's ids) and a deliberately bad image (empty, not an image, truncated, a
decompression bomb's header), whose INVALID_ARGUMENT is the expected answer: it counts as a success,
anything else (an answer, another error) as a failure. Every call is reported to locust with its name,
latency and outcome. Images are drawn from a catalog folder or CSV (`--images`), read as `lookalike index`
reads it (`lookalike.indexing.catalog`).

More load than one process can drive: `--processes N` (or `--master` and `--worker`s), locust's own
distributed mode; each worker process runs this file and its users.
"""

# ruff: noqa: I001, E402 - the import order matters here: locust (gevent's monkey-patching), then gRPC's
# gevent support, then the rest

from __future__ import annotations

import locust  # first: it monkey-patches the standard library for gevent

import grpc.experimental.gevent as grpc_gevent

# gRPC inside gevent needs this once per process, before any channel exists: without it a call blocks
# every other user of the process (20 users behaved as one).
grpc_gevent.init_gevent()

import ctypes
import io
import os
import random
import signal
import struct
import sys
import time
import warnings
import zlib
from typing import Any, Callable

import locust_plugins  # noqa: F401 - adds --check-fail-ratio (exit code on failed requests)
from locust import User, constant, events, task
from lookalike_client import NO_RETRIES, FileRefusedError, InvalidRequestError, LookalikeClient, NotFoundError
from lookalike_client.files import read_file
from PIL import Image

from lookalike.indexing.catalog import read_catalog
from lookalike.serving.preprocessing import ImageLimits

MAX_IMAGES = 300  # read once per process


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--images", default="data/sample_catalog/catalog.csv",
                        help="catalog CSV (product_id,image[,category]) or folder of images to send")
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--request-timeout", type=float, default=30.0, help="seconds, per request")


SERVER_LIMITS = ImageLimits()  # preprocess's defaults (max_image_bytes, max_image_pixels)


def read_images(source: str, limit: int = MAX_IMAGES, limits: ImageLimits = SERVER_LIMITS) -> tuple[list[bytes], list[str]]:
    """Up to `limit` encoded images (and their product ids) of a catalog CSV or folder, read as `lookalike
    index` reads it, leaving out those the server refuses under its default limits."""
    try:
        items, _ = read_catalog(source)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"--images {source}: {exc}") from None
    random.Random(0).shuffle(items)
    images: list[bytes] = []
    product_ids: list[str] = []
    for item in items:
        if len(images) >= limit:
            break
        try:  # a regular file within the server's byte limit, or it is not read
            data = read_file(item.image, limits.max_bytes)
        except FileRefusedError as exc:
            print(f"--images {source}: skipped {item.where}: {exc}")
            continue
        if servable(data, limits):
            images.append(data)
            product_ids.append(item.product_id)
    if len(images) < min(limit, len(items)):
        print(f"--images {source}: left out images over the server's default limits ({limits.max_bytes:,} bytes, "
              f"{limits.max_pixels:,} pixels): the good-image tasks expect an answer")
    if not images:
        raise SystemExit(f"--images {source}: no usable image files found")
    return images, product_ids


def servable(data: bytes, limits: ImageLimits) -> bool:
    """Whether an image is within the server's limits (preprocess's max_image_bytes / max_image_pixels),
    judged from its size and header only."""
    if len(data) > limits.max_bytes:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is what is checked here
            with Image.open(io.BytesIO(data)) as image:
                return image.width * image.height <= limits.max_pixels
    except Exception:  # noqa: BLE001 - unreadable here: the server would refuse it too
        return False


def huge_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A few hundred bytes whose header claims width x height pixels (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")


def bad_images(good: bytes) -> list[tuple[str, bytes]]:
    """Inputs the server must refuse with INVALID_ARGUMENT, for that request only."""
    return [("empty", b""), ("not an image", b"this is not an image " * 20), ("truncated", good[: max(1, len(good) // 3)]),
            ("decompression bomb", huge_png())]


class Shared:
    """What every user of a process sends: read once, at the test's start."""

    images: list[bytes] = []
    product_ids: list[str] = []
    bad: list[tuple[str, bytes]] = []
    similar_ok: bool | None = None  # whether the server holds the catalog's ids (checked once)


@events.init.add_listener
def _die_with_the_master(environment: Any, **_: Any) -> None:
    """A worker forked by `--processes` is killed by the kernel when its master process ends
    (PR_SET_PDEATHSIG). Seen here: a forked worker stuck after a master that had exited 0, holding the
    master's stdout for good; a watcher greenlet inside the worker did not run any more."""
    from locust.runners import WorkerRunner

    if not isinstance(environment.runner, WorkerRunner) or not getattr(environment.parsed_options, "processes", None):
        return
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG = 1
        if os.getppid() == 1:  # the master ended before that took effect
            os._exit(0)


@events.test_start.add_listener
def _load(environment: Any, **_: Any) -> None:
    options = environment.parsed_options
    if options is None or Shared.images:
        return
    Shared.images, Shared.product_ids = read_images(options.images)
    Shared.bad = bad_images(Shared.images[0])


class LookalikeUser(User):
    abstract = True
    protocol = "grpc"
    wait_time = constant(0)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        host = (self.host or "127.0.0.1").split("://")[-1].rstrip("/").split(":")[0]
        port = options.grpc_port if self.protocol == "grpc" else options.http_port
        self.top_k = options.top_k
        # one locust request is one server request: no retries, which would hide an overloaded server
        self.lookalike = LookalikeClient(f"{host}:{port}", protocol=self.protocol, timeout_s=options.request_timeout,
                                         retry=NO_RETRIES)
        if not Shared.images:  # a worker process started without test_start's listener having run
            _load(self.environment)
        if Shared.similar_ok is None:
            Shared.similar_ok = self._server_holds_the_catalog()

    def _server_holds_the_catalog(self) -> bool | None:
        """Whether similar_products knows the catalog's ids (some rows may have been skipped by the index):
        True when one of the first few does, False when none does (that task is then skipped)."""
        for pid in Shared.product_ids[:5]:
            try:
                self.lookalike.similar(pid, top_k=1)
                return True
            except NotFoundError:
                continue
            except Exception:  # noqa: BLE001 - the tasks report the server's state; this is only a probe
                return None
        print("similar_products: the server holds none of the catalog's first ids; that task is skipped "
              "(index the catalog given to --images to include it)")
        return False

    def on_stop(self) -> None:
        self.lookalike.close()

    def _report(self, name: str, call: Callable[[], object], refused_is_success: bool = False, size: int = 0) -> None:
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            call()
            if refused_is_success:
                error = AssertionError("the server accepted an image it must refuse (INVALID_ARGUMENT)")
        except InvalidRequestError as exc:
            if not refused_is_success:
                error = exc
        except Exception as exc:  # noqa: BLE001 - every other outcome is a failure, reported as such
            error = exc
        self.environment.events.request.fire(
            request_type=self.protocol, name=name, response_time=(time.perf_counter() - started) * 1000,
            response_length=size, exception=error, context={})

    @task(20)
    def search(self) -> None:
        image = random.choice(Shared.images)
        self._report("visual_search", lambda: self.lookalike.search(image, top_k=self.top_k), size=len(image))

    @task(4)
    def embed(self) -> None:
        image = random.choice(Shared.images)
        self._report("embed_image", lambda: self.lookalike.embed([image]), size=len(image))

    @task(4)
    def similar(self) -> None:
        if Shared.similar_ok is False or not Shared.product_ids:
            return
        pid = random.choice(Shared.product_ids)
        started = time.perf_counter()
        try:
            self.lookalike.similar(pid, top_k=self.top_k)
            name, error = "similar_products", None
        except NotFoundError:  # a catalog row the index skipped (unreadable image): the right answer, once
            name, error = "similar_products (id not in the index: INVALID_ARGUMENT)", None
            if pid in Shared.product_ids:
                Shared.product_ids.remove(pid)
        except Exception as exc:  # noqa: BLE001 - every other outcome is a failure
            name, error = "similar_products", exc
        self.environment.events.request.fire(request_type=self.protocol, name=name, context={}, exception=error,
                                             response_time=(time.perf_counter() - started) * 1000, response_length=0)

    @task(1)
    def bad_image(self) -> None:
        kind, payload = random.choice(Shared.bad)
        self._report(f"visual_search bad image ({kind}): INVALID_ARGUMENT expected",
                     lambda: self.lookalike.search(payload, top_k=self.top_k), refused_is_success=True, size=len(payload))


class GrpcUser(LookalikeUser):
    protocol = "grpc"


class HttpUser(LookalikeUser):
    protocol = "http"


__all__ = ["GrpcUser", "HttpUser", "locust"]
