"""The client SDK against the real tritonserver: both protocols, the sync and the asyncio client; every
error type from a real answer, search_many with bad images among good ones, health/info, concurrent
use from 16 threads and 64 asyncio tasks, retries over a model reload, and a server stopped mid-run."""

from __future__ import annotations

import asyncio
import csv
import io
import random
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lookalike.indexing.repository import copy_repository
from lookalike.server.launcher import ServerOptions, free_port
from lookalike.server.serve import lookalike_server
from lookalike_client import (
    AsyncLookalikeClient,
    InvalidImageError,
    InvalidRequestError,
    LookalikeClient,
    LookalikeError,
    ModelNotReadyError,
    NotFoundError,
    RequestTimeoutError,
    RetryPolicy,
    ServerUnavailableError,
)
from lookalike_client import contract as c

pytestmark = pytest.mark.integration

PROTOCOLS = ("grpc", "http")
MODES = [(p, m) for p in PROTOCOLS for m in ("sync", "async")]


class Sync:
    """One SDK client, sync or asyncio, behind the same blocking calls (the asyncio one runs on a loop
    of its own, as in an app: one client, one loop, many calls)."""

    def __init__(self, url: str, protocol: str, mode: str, **kwargs) -> None:
        self.mode = mode
        if mode == "sync":
            self.client = LookalikeClient(url, protocol=protocol, **kwargs)
        else:
            self.loop = asyncio.new_event_loop()
            self.client = AsyncLookalikeClient(url, protocol=protocol, **kwargs)

    def __getattr__(self, name):
        method = getattr(self.client, name)
        if self.mode == "sync":
            return method
        return lambda *args, **kwargs: self.loop.run_until_complete(method(*args, **kwargs))

    def close(self) -> None:
        if self.mode == "sync":
            self.client.close()
        else:
            self.loop.run_until_complete(self.client.close())
            self.loop.close()


def url_of(options: ServerOptions, protocol: str) -> str:
    return options.grpc_url if protocol == "grpc" else options.http_url


@pytest.fixture(params=MODES, ids=[f"{p}-{m}" for p, m in MODES])
def sdk(request, server):
    protocol, mode = request.param
    client = Sync(url_of(server.options, protocol), protocol, mode, timeout_s=60)
    yield client
    client.close()


def rows(catalog: Path, n: int, seed: int = 0) -> list[dict]:
    with open(catalog / "catalog.csv") as handle:
        everything = list(csv.DictReader(handle))
    def servable(row: dict) -> bool:  # the sample catalog holds a few images over the server's pixel limit
        with warnings.catch_warnings(), Image.open(catalog / row["image"]) as image:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return image.width * image.height < 20_000_000

    return [r for r in random.Random(seed).sample(everything, len(everything)) if servable(r)][:n]


def png(size=(48, 48), colour=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "PNG")
    return out.getvalue()


def test_every_error_type_comes_from_a_real_answer(sdk, server, catalog):
    with pytest.raises(InvalidImageError) as bad:
        sdk.search(b"this is not an image" * 10)
    assert bad.value.reason == "not_an_image" and bad.value.status in ("StatusCode.INVALID_ARGUMENT", "400")
    assert bad.value.detail.startswith("invalid image (not_an_image): ") and bad.value.image_index is None
    data = (catalog / rows(catalog, 1)[0]["image"]).read_bytes()
    with pytest.raises(InvalidImageError) as cut:
        sdk.search_batch([data, data[: len(data) // 3]])  # all or nothing: names the bad one
    assert cut.value.reason == "truncated" and cut.value.image_index == 1
    with pytest.raises(InvalidRequestError) as too_many:  # a refusal that is not an image's
        sdk.embed([png()] * (c.MAX_BATCH_SIZE + 1))
    assert type(too_many.value) is InvalidRequestError and "batch" in too_many.value.detail.lower()
    with pytest.raises(NotFoundError) as missing:
        sdk.similar("no-such-product")
    assert c.UNKNOWN_PRODUCT in missing.value.detail and missing.value.status is not None
    with pytest.raises(RequestTimeoutError):
        Sync(url_of(server.options, sdk.client.protocol), sdk.client.protocol, sdk.mode,
             timeout_s=0.002).search(Image.open(catalog / rows(catalog, 1, seed=3)[0]["image"]).resize((2000, 2000)))
    dead = Sync(f"127.0.0.1:{free_port()}", sdk.client.protocol, sdk.mode, timeout_s=1.5)
    started = time.monotonic()
    with pytest.raises(ServerUnavailableError) as down:
        dead.search(png())
    took = time.monotonic() - started
    assert type(down.value) is ServerUnavailableError and "attempts" in str(down.value) and took < 3.0
    assert not dead.health().live and dead.health().error
    dead.close()


def test_inputs_of_every_kind_give_the_same_answer(sdk, catalog, tmp_path):
    row = rows(catalog, 1, seed=5)[0]
    path = catalog / row["image"]
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    as_png = io.BytesIO()
    rgb.save(as_png, "PNG")
    expected = sdk.search(as_png.getvalue(), top_k=3)
    assert expected[0].product_id == row["product_id"]
    with open(path, "rb") as handle:
        from_file = sdk.search(handle, top_k=3)
    assert from_file[0].product_id == row["product_id"]
    assert sdk.search(rgb, top_k=3) == expected  # a PIL image: lossless PNG, the same pixels
    assert sdk.search(np.asarray(rgb), top_k=3) == expected  # a numpy HWC uint8 array: the same


def test_search_many_gives_bad_images_their_own_errors(sdk, catalog):
    good = rows(catalog, 12, seed=1)
    data = [(catalog / r["image"]).read_bytes() for r in good]
    images = list(data)
    bad = {3: b"", 4: b"garbage" * 30, 9: data[0][: len(data[0]) // 2], 13: Path("/nonexistent/photo.jpg")}
    for where in sorted(bad):
        images.insert(where, bad[where])
    results = sdk.search_many(images, top_k=2, batch_size=4, max_concurrency=3)
    assert len(results) == len(images)
    reasons = {i: r.error.reason for i, r in enumerate(results) if not r.ok}
    assert reasons == {3: "empty", 4: "not_an_image", 9: "truncated", 13: "unreadable"}
    assert all(isinstance(results[i].error, InvalidImageError) for i in bad)
    assert all("image " not in results[i].error.detail.split(":")[1] for i in (3, 4, 9))  # no request offsets
    found = [r.matches[0].product_id for i, r in enumerate(results) if i not in bad]
    assert found == [r["product_id"] for r in good]  # order kept
    with pytest.raises(InvalidRequestError):
        sdk.search_many(images, top_k=0)  # bad arguments raise before any work
    assert sdk.search_many([]) == []


def test_health_and_info_come_from_the_server(sdk, server):
    health = sdk.health()
    assert health.ok and health.live and health.ready and set(health.models) >= {c.VISUAL_SEARCH_MODEL, c.SEARCH_MODEL}
    info = sdk.info()
    served = sdk.served_index_versions()
    from lookalike.indexing.repository import Repository
    from lookalike.serving.search import ProductIndex

    index = ProductIndex.load(Repository(server.options.model_repository).latest_index_dir())
    manifest = Repository(server.options.model_repository).manifest()
    assert [info.index_version] == served
    assert (info.products, info.index_kind, info.dim) == (len(index), index.kind, manifest.dim)
    assert (info.embedder_model, info.embedder_fingerprint) == (manifest.model, manifest.fingerprint)
    assert info.server_version.startswith("2.") and all(info.models.values())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_one_sync_client_shared_by_16_threads(server, catalog, protocol):
    sample = rows(catalog, 16, seed=2)
    with LookalikeClient(url_of(server.options, protocol), protocol=protocol, timeout_s=120) as client:
        def one(row):
            return [client.search(catalog / row["image"], top_k=1)[0].product_id for _ in range(3)]

        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(one, sample))
    assert got == [[r["product_id"]] * 3 for r in sample]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_one_async_client_shared_by_64_tasks(server, catalog, protocol):
    sample = rows(catalog, 16, seed=4)
    data = {r["product_id"]: (catalog / r["image"]).read_bytes() for r in sample}

    async def main():
        async with AsyncLookalikeClient(url_of(server.options, protocol), protocol=protocol, timeout_s=120) as client:
            jobs = [(pid, client.search(data[pid], top_k=1)) for pid in list(data) * 4]
            answers = await asyncio.gather(*(job for _, job in jobs))
            return [(pid, matches[0].product_id) for (pid, _), matches in zip(jobs, answers)]

    pairs = asyncio.run(main())
    assert len(pairs) == 64 and all(want == got for want, got in pairs)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_model_reloading_is_retried_within_the_deadline(server, mode):
    """similar_products unloaded, loaded again 1.5 s later: a call with a long deadline rides it out;
    one with a short deadline gets ModelNotReadyError. Model control on the test server needs no key."""
    with LookalikeClient(server.options.grpc_url) as admin:
        some_id = admin.search(png(), top_k=1)[0].product_id
        control = admin._client()
        control.unload_model(c.SIMILAR_PRODUCTS_MODEL)
        try:
            for protocol in PROTOCOLS:
                quick = Sync(url_of(server.options, protocol), protocol, mode, timeout_s=0.5)
                with pytest.raises(ModelNotReadyError) as not_ready:
                    quick.similar(some_id)
                assert "unknown model" in not_ready.value.detail.lower()
                quick.close()
            loader = threading.Timer(1.5, lambda: control.load_model(c.SIMILAR_PRODUCTS_MODEL))
            loader.start()
            patient = Sync(server.options.http_url, "http", mode, timeout_s=30,
                           retry=RetryPolicy(max_attempts=100, initial_backoff_s=0.05, max_backoff_s=0.3))
            started = time.monotonic()
            assert patient.similar(some_id, top_k=3)
            assert time.monotonic() - started >= 1.0  # it waited for the reload, by retrying
            patient.close()
            loader.join()
        finally:
            if not admin.is_ready(c.SIMILAR_PRODUCTS_MODEL):
                control.load_model(c.SIMILAR_PRODUCTS_MODEL)
        assert admin.is_ready(c.SIMILAR_PRODUCTS_MODEL)


def test_refused_inputs_are_never_retried(server):
    calls = []
    with LookalikeClient(server.options.grpc_url, retry=RetryPolicy(max_attempts=5)) as client:
        original = client._infer_once

        def counting(call, budget_s):
            calls.append(call.model)
            return original(call, budget_s)

        client._infer_once = counting  # type: ignore[method-assign]
        with pytest.raises(InvalidImageError):
            client.search(b"nope")
    assert calls == [c.VISUAL_SEARCH_MODEL]


def test_a_server_stopped_mid_run_fails_within_the_deadline_and_the_same_clients_recover(server, tmp_path, catalog):
    repo = copy_repository(Path(server.options.model_repository), tmp_path / "model_repository", with_indexes=True)
    options = ServerOptions(model_repository=repo.root, http_port=free_port(), grpc_port=free_port(),
                            metrics_port=free_port())
    row = rows(catalog, 1, seed=7)[0]
    data = (catalog / row["image"]).read_bytes()
    clients = {(p, m): Sync(url_of(options, p), p, m, timeout_s=2.0) for p, m in MODES}
    failures: list[BaseException] = []
    stop = threading.Event()

    def hammer():  # a sync client in use while the server goes away
        with LookalikeClient(options.grpc_url, timeout_s=2.0) as busy:
            while not stop.is_set():
                try:
                    busy.search(data, top_k=1)
                except LookalikeError as exc:
                    failures.append(exc)
                except BaseException as exc:  # noqa: BLE001 - anything untyped is the defect under test
                    failures.append(exc)
                    return

    with lookalike_server(options, log_file=tmp_path / "first.log"):
        for key, client in clients.items():
            assert client.search(data, top_k=1)[0].product_id == row["product_id"], key
        worker = threading.Thread(target=hammer)
        worker.start()
        time.sleep(1.0)
    for key, client in clients.items():
        started = time.monotonic()
        with pytest.raises(ServerUnavailableError):
            client.search(data, top_k=1)
        assert time.monotonic() - started < 2.0 + 1.0, key  # within the deadline (and some slack)
        assert not client.health().live
    with lookalike_server(options, log_file=tmp_path / "second.log"):  # the same ports
        for key, client in clients.items():
            deadline = time.monotonic() + 10
            while True:  # the same client objects, no new one
                try:
                    assert client.search(data, top_k=1)[0].product_id == row["product_id"], key
                    break
                except ServerUnavailableError:
                    assert time.monotonic() < deadline, f"{key} did not recover within 10 s of the restart"
                    time.sleep(0.2)
            assert client.health().ok, key
        stop.set()
        worker.join(timeout=30)
    for client in clients.values():
        client.close()
    assert all(isinstance(f, (ServerUnavailableError, RequestTimeoutError)) for f in failures), failures[:3]
