"""The sync client of lookalike over gRPC or HTTP (tritonclient underneath), for threads: Django,
Flask, Celery workers, scripts.

    from lookalike_client import LookalikeClient
    with LookalikeClient("localhost:8001") as client:
        for match in client.search("shoe.jpg", top_k=5):
            print(match.rank, match.product_id, match.score)

One client may be shared by threads: gRPC channels are thread-safe, and over HTTP each thread gets
its own connection (tritonclient's HTTP client is gevent-based and must not be shared by threads);
a connection whose thread has ended is closed when the next one is made.

Every call has one deadline (`timeout_s`) across its attempts; retryable failures (unreachable,
reset, a model reloading) are retried within it with backoff and jitter (`RetryPolicy`); a refused
input never is. Errors are the typed ones of `lookalike_client.errors`.

On the server's own host (a sidecar, a batch job, a benchmark), `shared_memory=True` hands the photos
to the server through POSIX shared memory instead of the socket: Triton's system shared memory, one
region per request in flight at once (reused by the next, grown for a larger photo, never reused
after a timeout, registered again after a server restart), unregistered and removed by `close()`.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar, cast

import numpy as np
import numpy.typing as npt

from . import contract as c
from .calls import (
    DEFAULT_MANY_BATCH,
    DEFAULT_MANY_CONCURRENCY,
    SERVED_MODELS,
    Call,
    Health,
    Match,
    RetryPolicy,
    SearchResult,
    ServerInfo,
    Settle,
    embed_call,
    embedding_dim,
    index_info_call,
    many_chunks,
    metadata_versions,
    read_many,
    search_call,
    server_info,
    settle,
    similar_call,
)
from .errors import LookalikeError, RequestTimeoutError, ServerUnavailableError, retryable, translate
from .images import ImageLike, read_image_bytes
from .waiting import wait_for

T = TypeVar("T")


@dataclass(frozen=True)
class _Region:
    """A system shared-memory region of this client, registered with the server under `name`."""

    name: str
    key: str
    size: int
    handle: Any


def _shm() -> Any:
    """tritonclient's system shared-memory helpers (ctypes over its libcshm; untyped)."""
    import tritonclient.utils.shared_memory as shm  # pyright: ignore[reportMissingTypeStubs]

    return shm


def _serialized(array: npt.NDArray[Any]) -> bytes:
    """A BYTES tensor in Triton's layout (each element's 4-byte length, then its bytes), as
    tritonclient's set_data_from_numpy sends it."""
    import tritonclient.utils as utils  # pyright: ignore[reportMissingTypeStubs]

    module: Any = utils
    return bytes(module.serialize_byte_tensor(array).item())


SHM_MIN_BYTES = 4 << 20  # a region holds at least this much; it grows to the largest request seen
DEFAULT_TIMEOUT_S = 10.0  # a web request's budget: one call's deadline, all its attempts together


# gRPC reconnects to a server that went away with exponential backoff up to 120 s by default, so a
# client could stay UNAVAILABLE long after the server is back; capped here at 1 s.
GRPC_MAX_RECONNECT_BACKOFF_MS = 1000


def grpc_channel_args() -> list[tuple[str, Any]]:
    """tritonclient's own channel options (unlimited message size, its keepalive defaults; passing
    channel_args replaces them all) plus a reconnect backoff that suits a server restart."""
    import tritonclient.grpc as grpcclient  # pyright: ignore[reportMissingTypeStubs]

    module: Any = grpcclient
    keepalive = module.KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", module.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", module.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", GRPC_MAX_RECONNECT_BACKOFF_MS),
    ]


def _region_unknown(err: Exception) -> bool:
    """Whether the server refused a request because it does not know its shared-memory region."""
    return "unable to find shared memory region" in str(err).lower()


class _AttemptTimeout(Exception):
    """An HTTP attempt that outlived the call's deadline (raised into it by a gevent timer)."""

    def __str__(self) -> str:
        return "timed out: the call's deadline passed"


class ClientOptions:
    """What the sync and the async client are configured with, checked the same way."""

    def __init__(self, url: str, protocol: str, timeout_s: float, admin_key: str | None,
                 retry: RetryPolicy | None, max_image_bytes: int = c.MAX_IMAGE_BYTES) -> None:
        if protocol not in ("grpc", "http"):
            raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        limit = cast(object, max_image_bytes)  # checked as what a caller may pass, whatever the annotation says
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"max_image_bytes must be an int >= 1, got {max_image_bytes!r}")
        self.url = url
        self.max_image_bytes = max_image_bytes
        self.protocol = protocol
        self.timeout_s = float(timeout_s)
        self.retry = retry if retry is not None else RetryPolicy()
        self.admin_key = admin_key if admin_key is not None else os.environ.get(c.ADMIN_KEY_ENV)

    def _admin_headers(self) -> dict[str, str] | None:
        if not self.admin_key:
            return None
        name = c.ADMIN_KEY_HEADER if self.protocol == "http" else f"triton-grpc-protocol-{c.ADMIN_KEY_HEADER}"
        return {name: self.admin_key}

    def _wait_before_retry(self, err: LookalikeError, attempt: int, started: float, deadline: float) -> float:
        """After attempt `attempt` failed with `err`: the wait before the next one (RetryPolicy), or
        raises the error the call ends with (not retryable, out of attempts, or past the deadline)."""
        wait = self.retry.backoff_s(attempt)
        if not retryable(err) or attempt >= self.retry.max_attempts or time.monotonic() + wait >= deadline:
            raise self._gave_up(err, attempt, started) from err.__cause__
        return wait

    def _gave_up(self, err: LookalikeError, attempts: int, started: float) -> LookalikeError:
        """A retryable error that the call stops at, saying how long it tried."""
        if attempts == 1:
            return err
        again = type(err)(f"{err} (after {attempts} attempts in {time.monotonic() - started:.1f} s)", status=err.status)
        again.__cause__ = err.__cause__
        return again


class LookalikeClient(ClientOptions):
    """Calls `visual_search`, `similar_products`, `embed_image` and the index reload of a lookalike server.

    url: "host:port" of the gRPC (default 8001) or HTTP (default 8000) endpoint.
    timeout_s: each call's deadline, all its attempts together; past it, RequestTimeoutError (or the
        last retryable error, when the server stayed unreachable).
    retry: which failures are retried and how (`RetryPolicy`; `NO_RETRIES` for none).
    admin_key: key for the restricted model-control API (default: $LOOKALIKE_ADMIN_KEY); only
        `reload_index` and `shared_memory` need it, and only when the server is bound beyond loopback.
    shared_memory: send images through system shared memory. Only where the server runs on this
        host and sees its /dev/shm (same machine, same IPC namespace); the first request that needs a
        region says so (ServerUnavailableError) otherwise. Saves copying each photo through the socket
        (docs/benchmarks.md: 1-3 ms of client CPU and 3-4 ms of latency a 1.9 MB photo).
    max_image_bytes: the most bytes read of an image given as a path or a file object (default 20 MiB,
        the server's default limit). A path is read only if it names a regular file within it: a
        missing, oversized or special file (a FIFO, a device, a directory) raises FileRefusedError (an
        OSError) before anything is sent; in `search_many` it is that image's InvalidImageError.
    """

    def __init__(
        self,
        url: str = "localhost:8001",
        protocol: str = "grpc",
        timeout_s: float = DEFAULT_TIMEOUT_S,
        admin_key: str | None = None,
        shared_memory: bool = False,
        retry: RetryPolicy | None = None,
        max_image_bytes: int = c.MAX_IMAGE_BYTES,
    ) -> None:
        super().__init__(url, protocol, timeout_s, admin_key, retry, max_image_bytes)
        self._grpc: Any = None
        self._lock = threading.Lock()
        self._http_by_thread: dict[threading.Thread, Any] = {}
        self.shared_memory = shared_memory
        self._regions: list[_Region] = []  # every region registered, free or held by a request
        self._free_regions: list[_Region] = []

    # -- transport -------------------------------------------------------------------------------
    @property
    def _module(self) -> Any:
        if self.protocol == "grpc":
            import tritonclient.grpc as module  # pyright: ignore[reportMissingTypeStubs]
        else:
            import tritonclient.http as module  # pyright: ignore[reportMissingTypeStubs]
        return module

    def _client(self) -> Any:
        if self.protocol == "grpc":
            with self._lock:
                if self._grpc is None:
                    import tritonclient.grpc as grpcclient  # pyright: ignore[reportMissingTypeStubs]

                    self._grpc = grpcclient.InferenceServerClient(self.url, channel_args=grpc_channel_args())
                return self._grpc
        thread = threading.current_thread()
        with self._lock:
            client = self._http_by_thread.get(thread)
            ended = [t for t in self._http_by_thread if not t.is_alive()] if client is None else []
            stale = [self._http_by_thread.pop(t) for t in ended]
        for old in stale:  # connections of threads that have ended (a search_many's workers, say)
            _close_quietly(old)
        if client is None:
            import tritonclient.http as httpclient  # pyright: ignore[reportMissingTypeStubs]

            client = httpclient.InferenceServerClient(
                self.url, connection_timeout=self.timeout_s, network_timeout=self.timeout_s
            )
            with self._lock:
                self._http_by_thread[thread] = client
        return client

    def _drop_thread_client(self) -> None:
        """After an HTTP attempt was cut short: its connection may hold half a response; never reuse it."""
        with self._lock:
            client = self._http_by_thread.pop(threading.current_thread(), None)
        if client is not None:
            _close_quietly(client)

    def _bounded(self, budget_s: float, op: Callable[[Any], T]) -> T:
        """One attempt of `op(tritonclient client)` within `budget_s`; LookalikeError on failure."""
        client = self._client()
        try:
            if self.protocol == "grpc":
                return op(client)
            import gevent  # tritonclient's HTTP client runs on this thread's gevent hub

            with gevent.Timeout(budget_s, _AttemptTimeout()):
                return op(client)
        except _AttemptTimeout as exc:
            self._drop_thread_client()
            raise RequestTimeoutError(str(exc)) from exc
        except LookalikeError:
            raise
        except Exception as exc:  # tritonclient raises its own and transport errors
            err = translate(exc)
            if self.protocol == "http" and isinstance(err, (RequestTimeoutError, ServerUnavailableError)):
                self._drop_thread_client()
            raise err from exc

    def _retrying(self, op: Callable[[float], T]) -> T:
        """`op(budget_s)` until it succeeds, fails for good, or the deadline passes (see RetryPolicy)."""
        started = time.monotonic()
        deadline = started + self.timeout_s
        attempt = 0
        while True:
            attempt += 1
            try:
                return op(max(deadline - time.monotonic(), 0.001))
            except LookalikeError as err:
                time.sleep(self._wait_before_retry(err, attempt, started, deadline))

    def _run(self, call: Call) -> Any:
        return call.parse(self._retrying(lambda budget_s: self._infer_once(call, budget_s)))

    def _infer_once(self, call: Call, budget_s: float) -> dict[str, npt.NDArray[Any]]:
        module = self._module
        http = self.protocol == "http"
        outputs = [module.InferRequestedOutput(name, binary_data=True) if http else module.InferRequestedOutput(name)
                   for name in call.outputs]
        timeout = {} if http else {"client_timeout": budget_s}
        for attempt in (1, 2):
            infer_inputs, region = self._infer_inputs(call.inputs)
            try:
                result = self._bounded(budget_s, lambda client, sent=infer_inputs: client.infer(
                    call.model, sent, outputs=outputs, **timeout))
            except LookalikeError as err:
                if region is None:
                    raise
                if _region_unknown(err):
                    # the server no longer knows our regions (it restarted): forget them all, and try
                    # once more with a new one
                    self._forget_regions()
                    if attempt == 1:
                        continue
                elif not isinstance(err, (RequestTimeoutError, ServerUnavailableError)):
                    self._release_region(region)
                # else the server may still read the region for the abandoned request: it is not
                # released, so never written again, and stays registered until close()
                raise
            if region is not None:
                self._release_region(region)
            return {name: result.as_numpy(name) for name in call.outputs}
        raise AssertionError("unreachable")  # the second attempt returns or raises

    # -- shared memory ---------------------------------------------------------------------------
    def _acquire_region(self, size: int) -> _Region:
        """A free region of at least `size` bytes, or a new one: as many regions as requests were ever
        in flight at once, whichever threads sent them."""
        with self._lock:
            fits = [r for r in self._free_regions if r.size >= size]
            if fits:
                region = min(fits, key=lambda r: r.size)
                self._free_regions.remove(region)
                return region
            smaller = self._free_regions.pop() if self._free_regions else None
        if smaller is not None:
            self._drop_region(smaller)  # too small for this photo: make way for a larger one
        shm = _shm()
        capacity = max(SHM_MIN_BYTES, -(-size * 5 // 4 // (1 << 20)) * (1 << 20))
        name = f"lookalike_{os.getpid()}_{uuid.uuid4().hex[:16]}"
        handle = shm.create_shared_memory_region(name, "/" + name, capacity)
        try:
            self._client().register_system_shared_memory(name, "/" + name, capacity, headers=self._admin_headers())
        except Exception as exc:
            shm.destroy_shared_memory_region(handle)
            err = translate(exc)
            raise type(err)(f"shared_memory: the server at {self.url} could not map this host's shared memory "
                            f"(is it on this host?): {err}", status=err.status) from exc
        region = _Region(name, "/" + name, capacity, handle)
        with self._lock:
            self._regions.append(region)
        return region

    def _release_region(self, region: _Region) -> None:
        with self._lock:
            if region in self._regions:
                self._free_regions.append(region)

    def _forget_regions(self) -> None:
        """After the server lost its registrations: remove this host's regions without unregistering."""
        with self._lock:
            regions, self._regions, self._free_regions = self._regions, [], []
        for region in regions:
            _shm().destroy_shared_memory_region(region.handle)

    def _drop_region(self, region: _Region, client: Any = None) -> None:
        """Unregisters and removes a region (best effort: the server may be gone)."""
        with self._lock:
            if region not in self._regions:
                return
            self._regions.remove(region)
        try:
            (client or self._client()).unregister_system_shared_memory(region.name, headers=self._admin_headers())
        except Exception:  # noqa: BLE001 - a server that is gone has no region to forget
            pass
        _shm().destroy_shared_memory_region(region.handle)

    def _shared_input(self, name: str, array: npt.NDArray[Any]) -> tuple[Any, _Region]:
        """An InferInput whose BYTES data lies in a region held for this request."""
        raw = _serialized(array)
        region = self._acquire_region(len(raw))
        _shm().set_shared_memory_region(region.handle, [np.frombuffer(raw, dtype=np.uint8)])
        tensor = self._module.InferInput(name, list(array.shape), c.DATATYPES[name])
        tensor.set_shared_memory(region.name, len(raw))
        return tensor, region

    def _infer_inputs(self, inputs: dict[str, npt.NDArray[Any]]) -> tuple[list[Any], _Region | None]:
        module = self._module
        infer_inputs: list[Any] = []
        region: _Region | None = None
        for name, array in inputs.items():
            if self.shared_memory and name == c.IMAGE:
                tensor, region = self._shared_input(name, array)
                infer_inputs.append(tensor)
                continue
            tensor = module.InferInput(name, list(array.shape), c.DATATYPES[name])
            if self.protocol == "http":
                tensor.set_data_from_numpy(array, binary_data=True)
            else:
                tensor.set_data_from_numpy(array)
            infer_inputs.append(tensor)
        return infer_inputs, region

    def close(self) -> None:
        with self._lock:
            regions = list(self._regions)
            self._free_regions.clear()
        if regions:
            # over HTTP the thread that closes may not own a connection: unregister on a fresh one
            closer = None if self.protocol == "grpc" else self._module.InferenceServerClient(self.url)
            for region in regions:
                self._drop_region(region, closer)
            if closer is not None:
                closer.close()
        with self._lock:
            grpc, self._grpc = self._grpc, None
            clients = list(self._http_by_thread.values())
            self._http_by_thread.clear()
        if grpc is not None:
            grpc.close()
        for client in clients:
            _close_quietly(client)

    def __enter__(self) -> "LookalikeClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- health ----------------------------------------------------------------------------------
    def is_ready(self, model: str = c.VISUAL_SEARCH_MODEL) -> bool:
        try:
            return bool(self._bounded(self.timeout_s, lambda cl: cl.is_server_ready() and cl.is_model_ready(model)))
        except LookalikeError:
            return False

    def wait_until_ready(self, timeout_s: float = 120.0, model: str = c.VISUAL_SEARCH_MODEL) -> None:
        """Returns once the server and `model` are ready; ServerUnavailableError after `timeout_s`."""
        wait_for(lambda: self.is_ready(model), timeout_s, what=f"{model} at {self.url}")

    def health(self) -> Health:
        """Live, ready and each model's readiness, from the server (one attempt each, no retries):
        for a readiness probe or a status page. Never raises."""
        try:
            live = bool(self._bounded(self.timeout_s, lambda cl: cl.is_server_live()))
            ready = bool(self._bounded(self.timeout_s, lambda cl: cl.is_server_ready()))
            models = {name: bool(self._bounded(self.timeout_s, lambda cl, n=name: cl.is_model_ready(n)))
                      for name in SERVED_MODELS}
        except LookalikeError as err:
            return Health(live=False, ready=False, models=dict.fromkeys(SERVED_MODELS, False), error=str(err))
        return Health(live=live, ready=ready, models=models)

    def info(self) -> ServerInfo:
        """What the server serves: index version and product count, index kind, embedder and its
        dim, tritonserver's version and each model's readiness, all from the server."""
        models = self.health().models
        metadata = self._retrying(lambda b: self._bounded(b, lambda cl: cl.get_server_metadata()))
        dim = embedding_dim(self._retrying(lambda b: self._bounded(b, lambda cl: cl.get_model_metadata(c.EMBEDDER_MODEL))))
        index = self._run(index_info_call(dim))
        return server_info(self.url, self.protocol, metadata, dim, index, models)

    def served_index_versions(self) -> list[int]:
        """The index versions that `product_search` serves now, from the model's metadata (which,
        unlike model control, needs no admin key)."""
        return metadata_versions(self._retrying(lambda b: self._bounded(b, lambda cl: cl.get_model_metadata(c.SEARCH_MODEL))))

    # -- inference -------------------------------------------------------------------------------
    def search(self, image: ImageLike, top_k: int = c.DEFAULT_TOP_K, *, category: str | None = None,
               exclude_ids: Sequence[str] = ()) -> list[Match]:
        """The catalog products most similar to one image, best first. `category`: only products of
        that category (an unknown one gives no results); `exclude_ids`: never these products (e.g. the
        one being viewed). A filtered search still returns `top_k` products when that many match."""
        return self.search_batch([image], top_k, category=category, exclude_ids=exclude_ids)[0]

    def search_batch(self, images: Sequence[ImageLike], top_k: int = c.DEFAULT_TOP_K, *, category: str | None = None,
                     exclude_ids: Sequence[str] = ()) -> list[list[Match]]:
        """One request for up to 64 images (the same filters for all), all or nothing: one bad image
        fails the whole call (InvalidImageError naming it by `image_index`; a path or file the client
        will not read, see `max_image_bytes`, raises FileRefusedError before anything is sent). For
        images that should succeed or fail one by one, use `search_many`."""
        if not images:
            return []
        return self._run(search_call([read_image_bytes(image, self.max_image_bytes) for image in images], top_k,
                                     category, exclude_ids))

    def search_many(self, images: Sequence[ImageLike], top_k: int = c.DEFAULT_TOP_K, *, category: str | None = None,
                    exclude_ids: Sequence[str] = (), batch_size: int = DEFAULT_MANY_BATCH,
                    max_concurrency: int = DEFAULT_MANY_CONCURRENCY) -> list[SearchResult]:
        """Any number of images, each with its own outcome, in order: requests of up to `batch_size`
        images, `max_concurrency` of them in flight. An image the server refuses (or that the client
        cannot or will not read: reason "unreadable", or "too_large" over `max_image_bytes`) gets
        `SearchResult(error=InvalidImageError)`; the others get their matches. A failure
        that is not an image's (the server unreachable past the deadline) is the error of each image
        of the requests it hit. Each request has its own deadline. Raises only for bad arguments."""
        search_call([], top_k, category, exclude_ids)  # checks top_k and the filters before any work
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        results: list[SearchResult | None] = [None] * len(images)
        data = read_many(images, results, self.max_image_bytes)
        readable = [i for i, d in enumerate(data) if d is not None]
        chunks = [[readable[j] for j in chunk] for chunk in many_chunks(len(readable), batch_size)]

        def drive(chunk: list[int]) -> None:
            plan: Settle = settle(chunk, results)
            pending = next(plan)
            try:
                while True:
                    try:
                        outcome: Any = self._run(search_call([data[i] or b"" for i in pending], top_k, category,
                                                             exclude_ids))
                    except LookalikeError as err:
                        outcome = err
                    pending = plan.send(outcome)
            except StopIteration:
                pass

        if len(chunks) <= 1 or max_concurrency == 1:
            for chunk in chunks:
                drive(chunk)
        else:
            with ThreadPoolExecutor(max_workers=min(max_concurrency, len(chunks)),
                                    thread_name_prefix="lookalike-search-many") as pool:
                list(pool.map(drive, chunks))
        return [r if r is not None else SearchResult(error=LookalikeError("no result")) for r in results]

    def similar(self, product_id: str, top_k: int = c.DEFAULT_TOP_K, *, category: str | None = None,
                exclude_ids: Sequence[str] = ()) -> list[Match]:
        """"Customers also viewed": the catalog products most similar to a catalog product (by the
        embeddings stored with the served index; no photo), never the product itself. An id that the
        served index does not hold raises NotFoundError."""
        return self.similar_batch([product_id], top_k, category=category, exclude_ids=exclude_ids)[0]

    def similar_batch(self, product_ids: Sequence[str], top_k: int = c.DEFAULT_TOP_K, *, category: str | None = None,
                      exclude_ids: Sequence[str] = ()) -> list[list[Match]]:
        """`similar` for several products in one request; one unknown id fails them all."""
        if not product_ids:
            return []
        return self._run(similar_call(product_ids, top_k, category, exclude_ids))

    def embed(self, images: Sequence[ImageLike]) -> npt.NDArray[np.float32]:
        """[N, D] float32 L2-normalised embeddings of N images (catalog-side preprocessing), in one request."""
        return self._run(embed_call([read_image_bytes(image, self.max_image_bytes) for image in images]))

    # -- model control ---------------------------------------------------------------------------
    def reload_index(self, timeout_s: float = 300.0) -> None:
        """Asks the server to load the newest index version of `product_search`. Requests in flight
        finish on the old version; Triton swaps in the new one once it is loaded. One attempt."""
        if self.protocol == "grpc":
            try:
                self._client().load_model(c.SEARCH_MODEL, headers=self._admin_headers(), client_timeout=timeout_s)
            except Exception as exc:
                raise translate(exc) from exc
            return
        # over HTTP the timeout belongs to the connection: a loading index gets its own
        loader = self._module.InferenceServerClient(self.url, connection_timeout=self.timeout_s, network_timeout=timeout_s)
        try:
            loader.load_model(c.SEARCH_MODEL, headers=self._admin_headers())
        except Exception as exc:
            raise translate(exc) from exc
        finally:
            _close_quietly(loader)


def _close_quietly(client: Any) -> None:
    try:
        client.close()
    except Exception:  # noqa: BLE001 - closing a connection whose thread or server is gone
        pass
