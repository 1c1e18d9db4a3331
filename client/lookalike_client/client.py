"""A thin client of the lookalike Triton models over gRPC or HTTP (tritonclient underneath).

    from lookalike_client import LookalikeClient
    with LookalikeClient("localhost:8001") as client:
        for match in client.search("shoe.jpg", top_k=5):
            print(match.rank, match.product_id, match.score)

One client may be shared by threads: gRPC channels are thread-safe, and over HTTP each thread gets
its own connection (tritonclient's HTTP client is gevent-based and must not be shared by threads).

On the server's own host (a sidecar, a batch job, a benchmark), `shared_memory=True` hands the photos
to the server through POSIX shared memory instead of the socket: Triton's system shared memory, one
region per request in flight at once (reused by the next, grown for a larger photo, never reused
after a timeout, registered again after a server restart), unregistered and removed by `close()`.
"""

from __future__ import annotations

import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Sequence, Union, cast

import numpy as np
import numpy.typing as npt

from . import contract as c
from .errors import InvalidRequestError, RequestTimeoutError, ServerUnavailableError, translate
from .waiting import wait_for

ImageLike = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]", IO[bytes]]


@dataclass(frozen=True)
class Match:
    rank: int
    product_id: str
    score: float


def read_image_bytes(image: ImageLike) -> bytes:
    """Returns the encoded bytes of a path, a binary file object or bytes; no decoding happens here."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    if hasattr(image, "read"):
        return image.read()
    raise TypeError(f"expected bytes, a path or a binary file, got {type(image).__name__}")


def check_top_k(top_k: object) -> int:
    """`top_k` as an int, if it is an integer (not a bool) in MIN_TOP_K..MAX_TOP_K; else InvalidRequestError."""
    value = int(cast(int, top_k)) if isinstance(top_k, (int, np.integer)) and not isinstance(top_k, bool) else None
    if value is None or not c.MIN_TOP_K <= value <= c.MAX_TOP_K:
        raise InvalidRequestError(f"top_k must be an integer in {c.MIN_TOP_K}..{c.MAX_TOP_K}, got {top_k!r}")
    return value


def image_batch(images: Sequence[bytes]) -> npt.NDArray[np.object_]:
    """The [N, 1] object array that carries N encoded images in one request."""
    batch = np.empty((len(images), 1), dtype=np.object_)
    for i, data in enumerate(images):
        batch[i, 0] = data
    return batch


def check_text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidRequestError(f"{what} must be a str, got {type(value).__name__}")
    return value


def string_batch(rows: Sequence[Sequence[str]]) -> npt.NDArray[np.object_]:
    """[N, W] object array of utf-8 bytes (rows padded with "", which the server ignores)."""
    width = max((len(row) for row in rows), default=0)
    batch = np.full((len(rows), max(width, 1)), b"", dtype=np.object_)
    for i, row in enumerate(rows):
        for j, value in enumerate(row):
            batch[i, j] = value.encode("utf-8")
    return batch


def filter_inputs(rows: int, category: str | None, exclude_ids: Sequence[str]) -> dict[str, npt.NDArray[np.object_]]:
    """The optional CATEGORY / EXCLUDE_IDS tensors of a request of `rows` queries (none when unset)."""
    inputs: dict[str, npt.NDArray[np.object_]] = {}
    if category:
        inputs[c.CATEGORY] = string_batch([[check_text(category, "category")]] * rows)
    if isinstance(exclude_ids, str):
        raise InvalidRequestError("exclude_ids must be a sequence of product ids, not one str")
    excluded = [check_text(pid, "exclude_ids entry") for pid in exclude_ids if pid]
    if len(excluded) > c.MAX_EXCLUDE_IDS:
        raise InvalidRequestError(f"exclude_ids holds at most {c.MAX_EXCLUDE_IDS} ids, got {len(excluded)}")
    if excluded:
        inputs[c.EXCLUDE_IDS] = string_batch([excluded] * rows)
    return inputs


def decode_ids(raw: npt.NDArray[Any]) -> list[str]:
    values: list[object] = raw.reshape(-1).tolist()
    return [v.decode("utf-8") if isinstance(v, (bytes, bytearray)) else str(v) for v in values]


def matches(ids: npt.NDArray[Any], scores: npt.NDArray[Any]) -> list[Match]:
    """One result row -> Matches, best first, without the padding (`contract.NO_PRODUCT_ID`)."""
    row_scores: list[float] = [float(v) for v in scores.reshape(-1).tolist()]
    found = [(pid, score) for pid, score in zip(decode_ids(ids), row_scores) if pid != c.NO_PRODUCT_ID]
    return [Match(rank + 1, pid, float(score)) for rank, (pid, score) in enumerate(found)]


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


def _region_unknown(err: Exception) -> bool:
    """Whether the server refused a request because it does not know its shared-memory region."""
    return "unable to find shared memory region" in str(err).lower()


class LookalikeClient:
    """Calls `visual_search`, `similar_products`, `embed_image` and the index reload of a lookalike server.

    url: "host:port" of the gRPC (default 8001) or HTTP (default 8000) endpoint.
    timeout_s: per-request deadline; a request that exceeds it raises RequestTimeoutError.
    admin_key: key for the restricted model-control API (default: $LOOKALIKE_ADMIN_KEY); only
        `reload_index` and `shared_memory` need it, and only when the server is bound beyond loopback.
    shared_memory: send images through system shared memory. Only where the server runs on this
        host and sees its /dev/shm (same machine, same IPC namespace); the first request that needs a
        region says so (ServerUnavailableError) otherwise. Saves copying each photo through the socket
        (README Figures: 1-3 ms of client CPU and 3-4 ms of latency a 1.9 MB photo).
    """

    def __init__(
        self,
        url: str = "localhost:8001",
        protocol: str = "grpc",
        timeout_s: float = 30.0,
        admin_key: str | None = None,
        shared_memory: bool = False,
    ) -> None:
        if protocol not in ("grpc", "http"):
            raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
        self.url = url
        self.protocol = protocol
        self.timeout_s = timeout_s
        self.admin_key = admin_key if admin_key is not None else os.environ.get(c.ADMIN_KEY_ENV)
        self._local = threading.local()
        self._grpc: Any = None
        self._lock = threading.Lock()
        self._http_clients: list[Any] = []
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

                    self._grpc = grpcclient.InferenceServerClient(self.url)
                return self._grpc
        client = getattr(self._local, "http", None)
        if client is None:
            import tritonclient.http as httpclient  # pyright: ignore[reportMissingTypeStubs]

            client = httpclient.InferenceServerClient(
                self.url, connection_timeout=self.timeout_s, network_timeout=self.timeout_s
            )
            self._local.http = client
            with self._lock:
                self._http_clients.append(client)
        return client

    def _timeout_kwargs(self) -> dict[str, Any]:
        # gRPC takes a per-call deadline; HTTP's timeouts were set on the connection.
        return {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}

    def _admin_headers(self) -> dict[str, str] | None:
        if not self.admin_key:
            return None
        name = c.ADMIN_KEY_HEADER if self.protocol == "http" else f"triton-grpc-protocol-{c.ADMIN_KEY_HEADER}"
        return {name: self.admin_key}

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
            if self._grpc is not None:
                self._grpc.close()
                self._grpc = None
            for client in self._http_clients:
                client.close()
            self._http_clients.clear()

    def __enter__(self) -> "LookalikeClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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

    def _infer(self, model: str, inputs: dict[str, npt.NDArray[Any]], outputs: Sequence[str]) -> Any:
        module = self._module
        infer_outputs = [
            module.InferRequestedOutput(name, binary_data=True) if self.protocol == "http" else module.InferRequestedOutput(name)
            for name in outputs
        ]
        for attempt in (1, 2):
            infer_inputs, region = self._infer_inputs(inputs)
            try:
                result = self._client().infer(model, infer_inputs, outputs=infer_outputs, **self._timeout_kwargs())
            except Exception as exc:  # tritonclient raises its own and transport errors
                err = translate(exc)
                if region is None:
                    raise err from exc
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
                raise err from exc
            if region is not None:
                self._release_region(region)
            return result
        raise AssertionError("unreachable")  # the second attempt returns or raises

    # -- health ----------------------------------------------------------------------------------
    def is_ready(self, model: str = c.VISUAL_SEARCH_MODEL) -> bool:
        try:
            client = self._client()
            return bool(client.is_server_ready() and client.is_model_ready(model))
        except Exception:
            return False

    def wait_until_ready(self, timeout_s: float = 120.0, model: str = c.VISUAL_SEARCH_MODEL) -> None:
        """Returns once the server and `model` are ready; ServerUnavailableError after `timeout_s`."""
        wait_for(lambda: self.is_ready(model), timeout_s, what=f"{model} at {self.url}")

    # -- inference -------------------------------------------------------------------------------
    def search(self, image: ImageLike, top_k: int = c.DEFAULT_TOP_K, *, category: str | None = None,
               exclude_ids: Sequence[str] = ()) -> list[Match]:
        """The catalog products most similar to one image, best first. `category`: only products of
        that category (an unknown one gives no results); `exclude_ids`: never these products (e.g. the
        one being viewed). A filtered search still returns `top_k` products when that many match."""
        return self.search_batch([image], top_k, category=category, exclude_ids=exclude_ids)[0]

    def search_batch(self, images: Sequence[ImageLike], top_k: int = c.DEFAULT_TOP_K, *, category: str | None = None,
                     exclude_ids: Sequence[str] = ()) -> list[list[Match]]:
        """One request for several images (the same filters for all): cheaper than one each, but one
        bad image fails them all. For independent images, call `search` from several threads instead
        (the server batches them)."""
        if not images:
            return []
        top_k = check_top_k(top_k)
        data = [read_image_bytes(image) for image in images]
        inputs = {c.IMAGE: image_batch(data), c.TOP_K: np.full((len(data), 1), top_k, dtype=np.int32),
                  **filter_inputs(len(data), category, exclude_ids)}
        return self._results(self._infer(c.VISUAL_SEARCH_MODEL, inputs, [c.PRODUCT_IDS, c.SCORES]), len(data))

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
        top_k = check_top_k(top_k)
        ids = [check_text(pid, "product_id") for pid in product_ids]
        if any(not pid for pid in ids):
            raise InvalidRequestError("product_id must not be empty")
        inputs = {c.PRODUCT_ID: string_batch([[pid] for pid in ids]),
                  c.TOP_K: np.full((len(ids), 1), top_k, dtype=np.int32), **filter_inputs(len(ids), category, exclude_ids)}
        return self._results(self._infer(c.SIMILAR_PRODUCTS_MODEL, inputs, [c.PRODUCT_IDS, c.SCORES]), len(ids))

    @staticmethod
    def _results(result: Any, rows: int) -> list[list[Match]]:
        ids = result.as_numpy(c.PRODUCT_IDS).reshape(rows, -1)
        scores = result.as_numpy(c.SCORES).reshape(rows, -1)
        return [matches(row_ids, row_scores) for row_ids, row_scores in zip(ids, scores)]

    def embed(self, images: Sequence[ImageLike]) -> npt.NDArray[np.float32]:
        """[N, D] float32 L2-normalised embeddings of N images, in one request."""
        if not images:
            raise ValueError("embed needs at least one image")
        data = [read_image_bytes(image) for image in images]
        result = self._infer(c.EMBED_IMAGE_MODEL, {c.IMAGE: image_batch(data)}, [c.EMBEDDING])
        return result.as_numpy(c.EMBEDDING).reshape(len(data), -1)

    def served_index_versions(self) -> list[int]:
        """The index versions that `product_search` serves now, from the model's metadata (which,
        unlike model control, needs no admin key)."""
        try:
            metadata = self._client().get_model_metadata(c.SEARCH_MODEL, **self._timeout_kwargs())
        except Exception as exc:
            raise translate(exc) from exc
        versions = cast("list[str]", metadata["versions"] if isinstance(metadata, dict) else metadata.versions)
        return sorted(int(v) for v in versions)

    # -- model control ---------------------------------------------------------------------------
    def reload_index(self, timeout_s: float = 300.0) -> None:
        """Asks the server to load the newest index version of `product_search`. Requests in flight
        finish on the old version; Triton swaps in the new one once it is loaded."""
        kwargs = {"client_timeout": timeout_s} if self.protocol == "grpc" else {}
        try:
            self._client().load_model(c.SEARCH_MODEL, headers=self._admin_headers(), **kwargs)
        except Exception as exc:
            raise translate(exc) from exc
