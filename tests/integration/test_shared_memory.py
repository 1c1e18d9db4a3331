"""LookalikeClient(shared_memory=True) on the real server, over gRPC and HTTP: the photos travel through
Triton's system shared memory, the answers are those of the socket path, each thread has its own
region, a region grows for a large photo, a bad photo costs only its request, a server that lost the
regions gets them registered again, a timed-out request's region is never reused, and close() leaves
no region registered on the server nor in /dev/shm."""

import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from PIL import Image

from lookalike_client import InvalidRequestError, LookalikeClient, RequestTimeoutError
from lookalike_client.client import SHM_MIN_BYTES

pytestmark = pytest.mark.integration


def photos(catalog: Path, n: int) -> list[bytes]:
    return [p.read_bytes() for p in sorted((catalog / "queries").iterdir())[:n]]


def registered(server) -> list[str]:
    client = httpclient.InferenceServerClient(server.options.http_url)
    try:
        return [r["name"] for r in client.get_system_shared_memory_status() if r["name"].startswith("lookalike_")]
    finally:
        client.close()


def big_jpeg() -> bytes:
    """A 12-megapixel JPEG of noise: larger than a region's first size."""
    pixels = np.random.default_rng(0).integers(0, 255, (3024, 4032, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    assert len(buffer.getvalue()) > SHM_MIN_BYTES
    return buffer.getvalue()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_shared_memory_gives_the_socket_answers_and_cleans_up(server, catalog, protocol):
    url = server.options.grpc_url if protocol == "grpc" else server.options.http_url
    images = photos(catalog, 8)
    with LookalikeClient(url, protocol=protocol) as plain:
        expected = [plain.search(i, top_k=5) for i in images]
        expected_embeddings = plain.embed(images[:3])
    client = LookalikeClient(url, protocol=protocol, shared_memory=True)
    try:
        # four threads at once, each its own region: every answer is its own photo's
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda i: client.search(i, top_k=5), images * 2))
        for want, have in zip(expected * 2, got):
            assert [m.product_id for m in have] == [m.product_id for m in want]
            np.testing.assert_allclose([m.score for m in have], [m.score for m in want], atol=1e-5)
        np.testing.assert_allclose(client.embed(images[:3]), expected_embeddings, atol=1e-5)
        assert [[m.product_id for m in r] for r in client.search_batch(images[:3], top_k=5)] == \
            [[m.product_id for m in r] for r in expected[:3]]
        names = registered(server)
        assert 1 <= len(names) <= 4, names  # one a request in flight at once, not one a thread
        # a bad photo is refused and costs only itself; the region stays usable
        with pytest.raises(InvalidRequestError):
            client.search(b"not an image at all")
        assert [m.product_id for m in client.search(images[0], top_k=5)] == [m.product_id for m in expected[0]]
        # a photo larger than the region: a larger one replaces it
        assert len(client.search(big_jpeg(), top_k=3)) == 3
        # the server forgets every region (as after a restart): the client registers anew, once
        admin = httpclient.InferenceServerClient(server.options.http_url)
        admin.unregister_system_shared_memory()
        admin.close()
        assert [m.product_id for m in client.search(images[1], top_k=5)] == [m.product_id for m in expected[1]]
        assert len(registered(server)) == 1
        if protocol == "grpc":  # (over HTTP the deadline is the connection's, set when it opened)
            # a request abandoned at its deadline keeps its region registered and never written again
            client.timeout_s = 0.001
            with pytest.raises(RequestTimeoutError):
                client.search(images[2])
            client.timeout_s = 60
            abandoned = set(registered(server))
            assert [m.product_id for m in client.search(images[3], top_k=5)] == [m.product_id for m in expected[3]]
            assert abandoned < set(registered(server))
    finally:
        client.close()
    assert registered(server) == []
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"lookalike_{os.getpid()}_")]
    assert server.ready()
