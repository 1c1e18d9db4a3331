"""The asyncio client of lookalike, for FastAPI, aiohttp and any event loop: the sync client's methods
as coroutines, on tritonclient's asyncio clients (`tritonclient.grpc.aio`, `tritonclient.http.aio`),
with no threads.

    from lookalike_client import AsyncLookalikeClient
    async with AsyncLookalikeClient("localhost:8001") as client:
        for match in await client.search("shoe.jpg", top_k=5):
            print(match.rank, match.product_id, match.score)

Create one per event loop and share it by all tasks of that loop (the app's lifetime, say); it opens
its connection on the first call. Deadlines, retries and errors are the sync client's
(`LookalikeClient`): each call's `timeout_s` covers all its attempts, enforced with asyncio's timeouts.
Shared memory is the sync client's only.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable, Sequence, TypeVar

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
from .client import DEFAULT_TIMEOUT_S, ClientOptions, grpc_channel_args
from .errors import LookalikeError, RequestTimeoutError, translate
from .images import ImageLike, read_image_bytes
from .waiting import wait_for_async

T = TypeVar("T")


class AsyncLookalikeClient(ClientOptions):
    """`LookalikeClient`'s calls as coroutines: `await client.search(...)`. Arguments as there."""

    def __init__(
        self,
        url: str = "localhost:8001",
        protocol: str = "grpc",
        timeout_s: float = DEFAULT_TIMEOUT_S,
        admin_key: str | None = None,
        retry: RetryPolicy | None = None,
        max_image_bytes: int = c.MAX_IMAGE_BYTES,
    ) -> None:
        super().__init__(url, protocol, timeout_s, admin_key, retry, max_image_bytes)
        self._aio: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- transport -------------------------------------------------------------------------------
    @property
    def _module(self) -> Any:
        if self.protocol == "grpc":
            import tritonclient.grpc.aio as module  # pyright: ignore[reportMissingTypeStubs]
        else:
            import tritonclient.http.aio as module  # pyright: ignore[reportMissingTypeStubs]
        return module

    def _client(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._aio is not None and self._loop is not loop:
            raise RuntimeError("an AsyncLookalikeClient belongs to the event loop of its first call; "
                               "create one per loop")
        if self._aio is None:
            module = self._module
            self._aio = (module.InferenceServerClient(self.url, channel_args=grpc_channel_args()) if self.protocol == "grpc" else
                         module.InferenceServerClient(self.url, conn_timeout=self.timeout_s))
            self._loop = loop
        return self._aio

    async def _bounded(self, budget_s: float, op: Callable[[Any], Awaitable[T]]) -> T:
        """One attempt of `await op(tritonclient aio client)` within `budget_s`; LookalikeError on failure."""
        try:
            return await asyncio.wait_for(op(self._client()), timeout=budget_s)
        except asyncio.TimeoutError as exc:
            raise RequestTimeoutError(f"timed out after {budget_s:.3g} s: the call's deadline passed") from exc
        except LookalikeError:
            raise
        except Exception as exc:  # tritonclient's, aiohttp's and grpc's errors
            raise translate(exc) from exc

    async def _retrying(self, op: Callable[[float], Awaitable[T]]) -> T:
        started = time.monotonic()
        deadline = started + self.timeout_s
        attempt = 0
        while True:
            attempt += 1
            try:
                return await op(max(deadline - time.monotonic(), 0.001))
            except LookalikeError as err:
                await asyncio.sleep(self._wait_before_retry(err, attempt, started, deadline))

    async def _run(self, call: Call) -> Any:
        return call.parse(await self._retrying(lambda budget_s: self._infer_once(call, budget_s)))

    async def _infer_once(self, call: Call, budget_s: float) -> dict[str, npt.NDArray[Any]]:
        module = self._module
        http = self.protocol == "http"
        inputs: list[Any] = []
        for name, array in call.inputs.items():
            tensor = module.InferInput(name, list(array.shape), c.DATATYPES[name])
            if http:
                tensor.set_data_from_numpy(array, binary_data=True)
            else:
                tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        outputs = [module.InferRequestedOutput(name, binary_data=True) if http else module.InferRequestedOutput(name)
                   for name in call.outputs]
        timeout = {} if http else {"client_timeout": budget_s}
        result = await self._bounded(budget_s, lambda cl: cl.infer(call.model, inputs, outputs=outputs, **timeout))
        return {name: result.as_numpy(name) for name in call.outputs}

    async def close(self) -> None:
        client, self._aio = self._aio, None
        if client is not None:
            await client.close()

    async def __aenter__(self) -> "AsyncLookalikeClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- health ----------------------------------------------------------------------------------
    async def is_ready(self, model: str = c.VISUAL_SEARCH_MODEL) -> bool:
        try:
            return bool(await self._bounded(self.timeout_s, lambda cl: cl.is_server_ready()) and
                        await self._bounded(self.timeout_s, lambda cl: cl.is_model_ready(model)))
        except LookalikeError:
            return False

    async def wait_until_ready(self, timeout_s: float = 120.0, model: str = c.VISUAL_SEARCH_MODEL) -> None:
        """Returns once the server and `model` are ready; ServerUnavailableError after `timeout_s`."""
        await wait_for_async(lambda: self.is_ready(model), timeout_s, what=f"{model} at {self.url}")

    async def health(self) -> Health:
        """Live, ready and each model's readiness, from the server (one attempt each, no retries; the
        models asked concurrently). Never raises."""
        try:
            live = bool(await self._bounded(self.timeout_s, lambda cl: cl.is_server_live()))
            ready = bool(await self._bounded(self.timeout_s, lambda cl: cl.is_server_ready()))
            states = await asyncio.gather(*(self._bounded(self.timeout_s, lambda cl, n=name: cl.is_model_ready(n))
                                            for name in SERVED_MODELS))
        except LookalikeError as err:
            return Health(live=False, ready=False, models=dict.fromkeys(SERVED_MODELS, False), error=str(err))
        return Health(live=live, ready=ready, models={name: bool(s) for name, s in zip(SERVED_MODELS, states)})

    async def info(self) -> ServerInfo:
        """What the server serves (see `LookalikeClient.info`), all from the server."""
        models = (await self.health()).models
        metadata = await self._retrying(lambda b: self._bounded(b, lambda cl: cl.get_server_metadata()))
        embedder = await self._retrying(lambda b: self._bounded(b, lambda cl: cl.get_model_metadata(c.EMBEDDER_MODEL)))
        dim = embedding_dim(embedder)
        index = await self._run(index_info_call(dim))
        return server_info(self.url, self.protocol, metadata, dim, index, models)

    async def served_index_versions(self) -> list[int]:
        """The index versions that `product_search` serves now, from its model metadata."""
        return metadata_versions(await self._retrying(
            lambda b: self._bounded(b, lambda cl: cl.get_model_metadata(c.SEARCH_MODEL))))

    # -- inference -------------------------------------------------------------------------------
    async def search(self, image: ImageLike, top_k: int = c.DEFAULT_TOP_K, *, category: str | None = None,
                     exclude_ids: Sequence[str] = ()) -> list[Match]:
        """The catalog products most similar to one image, best first (see `LookalikeClient.search`)."""
        return (await self.search_batch([image], top_k, category=category, exclude_ids=exclude_ids))[0]

    async def search_batch(self, images: Sequence[ImageLike], top_k: int = c.DEFAULT_TOP_K, *,
                           category: str | None = None, exclude_ids: Sequence[str] = ()) -> list[list[Match]]:
        """One request for up to 64 images, all or nothing (see `LookalikeClient.search_batch`)."""
        if not images:
            return []
        return await self._run(search_call([read_image_bytes(image, self.max_image_bytes) for image in images], top_k,
                                           category, exclude_ids))

    async def search_many(self, images: Sequence[ImageLike], top_k: int = c.DEFAULT_TOP_K, *,
                          category: str | None = None, exclude_ids: Sequence[str] = (),
                          batch_size: int = DEFAULT_MANY_BATCH,
                          max_concurrency: int = DEFAULT_MANY_CONCURRENCY) -> list[SearchResult]:
        """Any number of images, each with its own outcome, in order (see `LookalikeClient.search_many`):
        requests of up to `batch_size` images, at most `max_concurrency` in flight, as tasks of this loop."""
        search_call([], top_k, category, exclude_ids)  # checks top_k and the filters before any work
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        results: list[SearchResult | None] = [None] * len(images)
        data = read_many(images, results, self.max_image_bytes)
        readable = [i for i, d in enumerate(data) if d is not None]
        chunks = [[readable[j] for j in chunk] for chunk in many_chunks(len(readable), batch_size)]
        gate = asyncio.Semaphore(max_concurrency)

        async def drive(chunk: list[int]) -> None:
            plan: Settle = settle(chunk, results)
            pending = next(plan)
            try:
                while True:
                    async with gate:
                        try:
                            outcome: Any = await self._run(search_call([data[i] or b"" for i in pending], top_k,
                                                                       category, exclude_ids))
                        except LookalikeError as err:
                            outcome = err
                    pending = plan.send(outcome)
            except StopIteration:
                pass

        await asyncio.gather(*(drive(chunk) for chunk in chunks))
        return [r if r is not None else SearchResult(error=LookalikeError("no result")) for r in results]

    async def similar(self, product_id: str, top_k: int = c.DEFAULT_TOP_K, *, category: str | None = None,
                      exclude_ids: Sequence[str] = ()) -> list[Match]:
        """"Customers also viewed" (see `LookalikeClient.similar`); NotFoundError for an unknown id."""
        return (await self.similar_batch([product_id], top_k, category=category, exclude_ids=exclude_ids))[0]

    async def similar_batch(self, product_ids: Sequence[str], top_k: int = c.DEFAULT_TOP_K, *,
                            category: str | None = None, exclude_ids: Sequence[str] = ()) -> list[list[Match]]:
        if not product_ids:
            return []
        return await self._run(similar_call(product_ids, top_k, category, exclude_ids))

    async def embed(self, images: Sequence[ImageLike]) -> npt.NDArray[np.float32]:
        """[N, D] float32 L2-normalised embeddings of N images, in one request."""
        return await self._run(embed_call([read_image_bytes(image, self.max_image_bytes) for image in images]))

    async def reload_index(self, timeout_s: float = 300.0) -> None:
        """Asks the server to load the newest index version of `product_search` (one attempt)."""
        grpc = self.protocol == "grpc"
        # over HTTP the session's timeout is every request's: a loading index gets a session of its own
        loader = self._client() if grpc else self._module.InferenceServerClient(self.url, conn_timeout=timeout_s)
        kwargs: dict[str, Any] = {"client_timeout": timeout_s} if grpc else {}
        try:
            await asyncio.wait_for(loader.load_model(c.SEARCH_MODEL, headers=self._admin_headers(), **kwargs),
                                   timeout=timeout_s)
        except asyncio.TimeoutError as exc:
            raise RequestTimeoutError(f"reload_index timed out after {timeout_s:g} s") from exc
        except Exception as exc:
            raise translate(exc) from exc
        finally:
            if not grpc:
                await loader.close()
