"""One client never harms another: a poisoned embedding sent straight to `product_search` fails alone,
and never shortens the results of the requests it was batched with (real tritonserver, gRPC)."""

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from lookalike.indexing.repository import Repository
from lookalike.serving.search import ProductIndex
from lookalike_client import LookalikeClient

pytestmark = pytest.mark.integration

K = 10


def search_request(client, embeddings: np.ndarray, k: int = K):
    inputs = [grpcclient.InferInput("EMBEDDING", list(embeddings.shape), "FP32"),
              grpcclient.InferInput("TOP_K", [len(embeddings), 1], "INT32")]
    inputs[0].set_data_from_numpy(embeddings.astype(np.float32))
    inputs[1].set_data_from_numpy(np.full((len(embeddings), 1), k, np.int32))
    result = client.infer("product_search", inputs, client_timeout=60)
    return result.as_numpy("PRODUCT_IDS"), result.as_numpy("SCORES")


def poisoned_rows(dim: int, rng) -> dict[str, tuple[np.ndarray, str]]:
    def unit(n):
        x = rng.standard_normal((n, dim)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    nan, inf, big, zero = unit(3), unit(2), unit(2), unit(1)
    nan[2, 7] = np.nan
    inf[0, 0] = np.inf
    big[1] *= 4.0
    zero[0] = 0.0
    return {"nan": (nan, "row 2 of 3 is not finite"), "inf": (inf, "row 0 of 2 is not finite"),
            "norm 4": (big, "row 1 of 2 has L2 norm 4"), "zero": (zero, "row 0 of 1 has L2 norm 0")}


def test_poisoned_embedding_fails_alone_and_batch_mates_get_their_full_top_k(server, catalog):
    index = ProductIndex.load(Repository(server.options.model_repository).latest_index_dir())
    assert len(index) > K
    rng = np.random.default_rng(0)
    catalog_vectors = index.index.reconstruct_n(0, len(index))
    poison = poisoned_rows(index.dim, rng)
    normal_failures, short, poison_results = [], [], []
    stop = threading.Event()
    image = next(iter(sorted((catalog / "images").glob("*/*.png")))).read_bytes()

    def normal_direct(worker: int) -> int:
        client = grpcclient.InferenceServerClient(server.options.grpc_url)
        pick = np.random.default_rng(worker)
        done = 0
        while not stop.is_set():
            rows = catalog_vectors[pick.integers(0, len(index), size=1 + worker % 3)]
            try:
                ids, scores = search_request(client, rows)
            except InferenceServerException as exc:
                normal_failures.append(str(exc))
                continue
            if ids.shape != (len(rows), K) or b"" in ids.reshape(-1).tolist() or not np.isfinite(scores).all():
                short.append(ids.shape)
            done += 1
        return done

    def normal_visual(_: int) -> int:
        done = 0
        with LookalikeClient(server.options.grpc_url, timeout_s=60) as client:
            while not stop.is_set():
                try:
                    matches = client.search(image, top_k=K)
                except Exception as exc:  # noqa: BLE001 - any failure of a good request is the bug
                    normal_failures.append(f"visual_search: {exc}")
                    continue
                if len(matches) != K:
                    short.append(len(matches))
                done += 1
        return done

    def poisoner(_: int) -> None:
        client = grpcclient.InferenceServerClient(server.options.grpc_url)
        for _round in range(15):
            for name, (rows, expected) in poison.items():
                try:
                    search_request(client, rows)
                    poison_results.append((name, "accepted"))
                except InferenceServerException as exc:
                    poison_results.append((name, exc.status(), expected in str(exc), str(exc)))

    with ThreadPoolExecutor(10) as pool:
        normals = [pool.submit(normal_direct, w) for w in range(6)] + [pool.submit(normal_visual, w) for w in range(2)]
        poisoners = [pool.submit(poisoner, w) for w in range(2)]
        for p in poisoners:
            p.result()
        stop.set()
        served = sum(f.result() for f in normals)
    print(f"\n{served} normal requests beside {len(poison_results)} poisoned ones: "
          f"{len(short)} short, {len(normal_failures)} failed")
    assert served > 100
    assert not normal_failures, normal_failures[:3]
    assert not short, f"{len(short)} normal requests came back short, e.g. {short[:5]}"
    assert len(poison_results) == 2 * 15 * len(poison)
    for result in poison_results:
        assert result[1] == "StatusCode.INVALID_ARGUMENT" and result[2], result
    assert server.ready()
