"""lookalike_client: error mapping and request building, without a server."""

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from lookalike_client import (
    InvalidRequestError,
    PermissionDeniedError,
    RequestTimeoutError,
    ServerError,
    ServerUnavailableError,
)
from lookalike_client.calls import check_top_k, decode_ids, image_batch
from lookalike_client.errors import translate
from lookalike_client.images import read_image_bytes
from tests.conftest import finishes


@pytest.mark.parametrize("status,cls", [
    ("StatusCode.INVALID_ARGUMENT", InvalidRequestError), ("400", InvalidRequestError),
    ("StatusCode.UNAVAILABLE", ServerUnavailableError), ("503", ServerUnavailableError),
    ("StatusCode.DEADLINE_EXCEEDED", RequestTimeoutError), ("403", PermissionDeniedError),
    ("StatusCode.INTERNAL", ServerError), ("500", ServerError),
])
def test_status_mapping(status, cls):
    err = translate(InferenceServerException("boom", status=status))
    assert type(err) is cls and str(err) == "boom" and isinstance(err.__cause__, InferenceServerException)


def test_restricted_grpc_protocol_is_permission_denied_not_unavailable():
    exc = InferenceServerException("This protocol is restricted, expecting header 'triton-grpc-protocol-k'",
                                   status="StatusCode.UNAVAILABLE")
    assert isinstance(translate(exc), PermissionDeniedError)


def test_transport_errors():
    assert isinstance(translate(ConnectionRefusedError("refused")), ServerUnavailableError)
    assert isinstance(translate(TimeoutError("timed out")), RequestTimeoutError)


def test_request_building(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8abc")
    assert read_image_bytes(tmp_path / "a.jpg") == b"\xff\xd8abc"
    assert read_image_bytes(str(tmp_path / "a.jpg")) == b"\xff\xd8abc"
    assert read_image_bytes(bytearray(b"xy")) == b"xy"
    with open(tmp_path / "a.jpg", "rb") as handle:
        assert read_image_bytes(handle) == b"\xff\xd8abc"
    batch = image_batch([b"one", b"two\x00"])
    assert batch.shape == (2, 1) and batch.dtype == np.object_ and batch[1, 0] == b"two\x00"
    assert decode_ids(np.array([b"SKU-1", b"\xc3\xa9t\xc3\xa9"], dtype=np.object_)) == ["SKU-1", "été"]


def test_top_k_checked_before_sending():
    assert check_top_k(1) == 1 and check_top_k(np.int32(1000)) == 1000
    for bad in (0, 1001, 2.5, "3", None):
        with pytest.raises(InvalidRequestError):
            check_top_k(bad)


# -- errors the server's answers become ---------------------------------------------------------
from lookalike_client import (  # noqa: E402
    InvalidImageError,
    ModelNotReadyError,
    NotFoundError,
    RetryPolicy,
    SearchResult,
)
from lookalike_client.calls import Match, index_info_call, parse_index_info, settle  # noqa: E402
from lookalike_client.errors import retryable  # noqa: E402
from lookalike_client.images import array_png, pil_png  # noqa: E402


@pytest.mark.parametrize("status", ["StatusCode.INVALID_ARGUMENT", "400"])
def test_image_errors_keep_reason_and_index(status):
    raw = InferenceServerException("in ensemble 'visual_search', invalid image (truncated): image 2 of 5: truncated "
                                   "image: the JPEG's data ends early", status=status)
    err = translate(raw)
    assert type(err) is InvalidImageError and err.status == status
    assert (err.reason, err.image_index) == ("truncated", 2)
    assert err.detail.startswith("invalid image (truncated): image 2 of 5: ")
    item = err.for_item()
    assert item.detail == "invalid image (truncated): truncated image: the JPEG's data ends early"
    assert item.image_index is None and item.reason == "truncated" and item.status == status
    single = translate(InferenceServerException("invalid image (empty): empty image", status=status))
    assert isinstance(single, InvalidImageError) and single.image_index is None and single.reason == "empty"


def test_other_refusals_are_not_image_errors():
    err = translate(InferenceServerException("TOP_K must be in 1..1000, got 0", status="400"))
    assert type(err) is InvalidRequestError and not retryable(err)
    found = translate(InferenceServerException("unknown product id 'x': not in the served index", status="400"))
    assert type(found) is NotFoundError


@pytest.mark.parametrize("status", ["StatusCode.NOT_FOUND", "404", "StatusCode.UNAVAILABLE", "400"])
def test_model_not_loaded_is_model_not_ready_and_retryable(status):
    err = translate(InferenceServerException("Request for unknown model: 'visual_search' has no available versions",
                                             status=status))
    assert type(err) is ModelNotReadyError and isinstance(err, ServerUnavailableError) and retryable(err)


def test_what_is_retried():
    assert retryable(translate(ConnectionResetError("reset by peer")))
    assert retryable(translate(InferenceServerException("Socket closed", status="StatusCode.UNAVAILABLE")))
    for status in ("StatusCode.INVALID_ARGUMENT", "StatusCode.INTERNAL", "StatusCode.DEADLINE_EXCEEDED", "403"):
        assert not retryable(translate(InferenceServerException("no", status=status))), status


def test_backoff_grows_with_jitter_and_a_cap():
    policy = RetryPolicy(initial_backoff_s=0.1, multiplier=2.0, max_backoff_s=0.5, jitter=0.5)
    assert [policy.backoff_s(n, rng=lambda: 0.0) for n in (1, 2, 3, 4, 5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    assert policy.backoff_s(2, rng=lambda: 1.0) == pytest.approx(0.1)  # jitter takes up to half off
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


# -- inputs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(7, 5), (7, 5, 1), (7, 5, 2), (7, 5, 3), (7, 5, 4)])
def test_numpy_images_are_lossless_png(shape):
    import io

    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    data = read_image_bytes(pixels)
    assert data == array_png(pixels) and data.startswith(b"\x89PNG")
    decoded = np.asarray(Image.open(io.BytesIO(data)))
    assert np.array_equal(decoded, pixels.reshape(decoded.shape))


def test_numpy_images_must_be_uint8_hwc():
    with pytest.raises(TypeError, match="uint8"):
        read_image_bytes(np.zeros((4, 4, 3), np.float32))
    for shape in [(4, 4, 5), (4,), (0, 4, 3)]:
        with pytest.raises(ValueError):
            read_image_bytes(np.zeros(shape, np.uint8))
    with pytest.raises(TypeError, match="binary"):
        import io

        read_image_bytes(io.StringIO("text"))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK", "I;16"])
def test_pil_images_are_encoded_once_losslessly(mode):
    import io

    from PIL import Image

    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, size=(6, 9, 3), dtype=np.uint8)).convert(mode)
    data = read_image_bytes(image)
    assert data == pil_png(image)
    back = Image.open(io.BytesIO(data))
    expected = image if mode != "CMYK" else image.convert("RGB")  # PNG cannot hold CMYK
    assert back.mode == expected.mode and np.array_equal(np.asarray(back), np.asarray(expected))


# -- search_many's bookkeeping ----------------------------------------------------------------
def drive(chunk, answer):
    """Runs `settle` over one chunk with `answer(pending) -> rows or LookalikeError`; returns (results, sent)."""
    results = [None] * (max(chunk) + 1)
    sent = []
    plan = settle(chunk, results)
    pending = next(plan)
    try:
        while True:
            sent.append(list(pending))
            pending = plan.send(answer(pending))
    except StopIteration:
        pass
    return results, sent


def test_settle_all_good_in_one_request():
    results, sent = drive([0, 1, 2], lambda p: [[Match(1, f"p{i}", 1.0)] for i in p])
    assert sent == [[0, 1, 2]] and [r.matches[0].product_id for r in results] == ["p0", "p1", "p2"]


def test_settle_a_named_bad_image_gets_its_error_and_the_rest_are_sent_again():
    bad = {1, 3}

    def answer(pending):
        for position, i in enumerate(pending):
            if i in bad:
                return InvalidImageError(f"invalid image (truncated): image {position} of {len(pending)}: cut",
                                         status="400")
        return [[Match(1, f"p{i}", 1.0)] for i in pending]

    results, sent = drive([0, 1, 2, 3], answer)
    assert sent == [[0, 1, 2, 3], [0, 2, 3], [0, 2]]
    assert [r.ok for r in results] == [True, False, True, False]
    assert results[1].error.detail == "invalid image (truncated): cut" and results[1].error.reason == "truncated"
    assert results[2].unwrap()[0].product_id == "p2"
    with pytest.raises(InvalidImageError):
        results[3].unwrap()


def test_settle_an_unnamed_refusal_is_split_and_other_failures_hit_every_image():
    def answer(pending):
        if len(pending) > 1:
            return InvalidRequestError("something about the request", status="400")
        return InvalidRequestError("bad", status="400") if pending == [1] else [[Match(1, "ok", 1.0)]]

    results, sent = drive([0, 1, 2], answer)
    assert sent == [[0, 1, 2], [0], [1], [2]] and [r.ok for r in results] == [True, False, True]
    down = ServerUnavailableError("connection refused")
    results, sent = drive([0, 1], lambda p: down)
    assert sent == [[0, 1]] and all(r.error is down for r in results)
    assert SearchResult().ok and SearchResult().matches == []


def test_index_info_request_and_answer():
    call = index_info_call(4)
    assert call.model == "product_search" and call.outputs == ("INDEX_INFO",)
    assert call.inputs["EMBEDDING"].tolist() == [[1.0, 0.0, 0.0, 0.0]] and call.inputs["TOP_K"].tolist() == [[1]]
    raw = np.array([[b'{"version": 3, "products": 9, "kind": "flat", "dim": 4, "embedder_model": "m", '
                     b'"embedder_fingerprint": "f", "index_id": "abc"}']], dtype=np.object_)
    assert parse_index_info(raw)["products"] == 9 and parse_index_info(raw)["index_id"] == "abc"
    with pytest.raises(ServerError, match="lacks"):
        parse_index_info(np.array([[b'{"version": 3}']], dtype=np.object_))


# -- files the client reads ----------------------------------------------------------------------
def test_only_regular_files_within_the_limit_are_read(tmp_path):
    import os
    import tracemalloc

    from lookalike_client import FileRefusedError, contract

    os.mkfifo(tmp_path / "x.fifo")
    os.symlink("/dev/zero", tmp_path / "zero.jpg")
    huge = tmp_path / "huge.jpg"
    with open(huge, "wb"):
        pass
    os.truncate(huge, 2**31)
    for path, kind, reason in [
        (tmp_path / "x.fifo", "not_regular", "not a regular file (a FIFO)"),
        (str(tmp_path / "zero.jpg"), "not_regular", "not a regular file (a character device)"),
        (tmp_path, "not_regular", "not a regular file (a directory)"),
        (huge, "too_large", "image too large: 2,147,483,648 bytes, the limit is 20,971,520 bytes"),
        (tmp_path / "missing.jpg", "missing", "file not found"),
    ]:
        tracemalloc.start()
        try:
            with pytest.raises(FileRefusedError) as info:
                finishes(lambda path=path: read_image_bytes(path))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert (info.value.kind, info.value.reason) == (kind, reason)
        assert str(info.value) == f"{contract.quoted(str(path))}: {reason}"
        assert peak < 1024 * 1024
    (tmp_path / "small.jpg").write_bytes(b"\xff\xd8" + b"x" * 98)
    assert len(read_image_bytes(tmp_path / "small.jpg", max_bytes=100)) == 100
    with pytest.raises(FileRefusedError, match="image too large: 100 bytes, the limit is 99 bytes"):
        read_image_bytes(tmp_path / "small.jpg", max_bytes=99)
    assert contract.MAX_IMAGE_BYTES == 20 * 1024 * 1024


def test_a_file_object_is_read_up_to_the_limit_and_one_byte():
    import io

    from lookalike_client import FileRefusedError

    assert read_image_bytes(io.BytesIO(b"x" * 100), max_bytes=100) == b"x" * 100
    with pytest.raises(FileRefusedError) as info:
        read_image_bytes(io.BytesIO(b"x" * 101), max_bytes=100)
    assert info.value.kind == "too_large" and "more than the limit of 100 bytes" in str(info.value)

    class Endless:
        """A stream that never ends (a socket, a device opened by the caller)."""

        name = "endless.jpg"

        def __init__(self):
            self.given = 0

        def read(self, size=-1):
            assert size >= 0, "asked for everything"
            self.given += size
            return b"\0" * size

    stream = Endless()
    with pytest.raises(FileRefusedError, match="'endless.jpg': image too large"):
        read_image_bytes(stream, max_bytes=1000)
    assert stream.given == 1001


def test_clients_read_paths_within_their_max_image_bytes(tmp_path):
    import asyncio
    import os

    from lookalike_client import AsyncLookalikeClient, FileRefusedError, LookalikeClient, contract
    from lookalike_client.calls import read_many

    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8" + b"x" * 98)
    os.mkfifo(tmp_path / "x.fifo")
    # nothing is sent: every image is refused before a connection is made (there is no server)
    sync = LookalikeClient("127.0.0.1:1", max_image_bytes=99)
    assert LookalikeClient("127.0.0.1:1").max_image_bytes == contract.MAX_IMAGE_BYTES
    for call in (lambda: sync.search(tmp_path / "a.jpg"), lambda: sync.search_batch([b"ok", tmp_path / "a.jpg"]),
                 lambda: sync.embed([tmp_path / "a.jpg"])):
        with pytest.raises(FileRefusedError) as info:
            finishes(call)
        assert info.value.kind == "too_large"
    results = finishes(lambda: sync.search_many([tmp_path / "a.jpg", tmp_path / "x.fifo", tmp_path / "no.jpg"]))
    assert [(type(r.error), r.error.reason) for r in results] == [(InvalidImageError, "too_large")] + \
        [(InvalidImageError, "unreadable")] * 2
    assert "not a regular file (a FIFO)" in str(results[1].error)
    with pytest.raises(FileRefusedError, match="a FIFO"):
        finishes(lambda: sync.search(tmp_path / "x.fifo"))

    client = AsyncLookalikeClient("127.0.0.1:1", max_image_bytes=99)
    with pytest.raises(FileRefusedError, match="image too large: 100 bytes, the limit is 99 bytes"):
        finishes(lambda: asyncio.run(client.search(tmp_path / "a.jpg")))
    results = finishes(lambda: asyncio.run(client.search_many([tmp_path / "x.fifo"])))
    assert results[0].error.reason == "unreadable"
    with pytest.raises(FileRefusedError, match="a FIFO"):
        finishes(lambda: asyncio.run(client.embed([tmp_path / "x.fifo"])))

    slots = [None, None]
    data = read_many([tmp_path / "a.jpg", b"raw"], slots, max_bytes=100)
    assert data == [b"\xff\xd8" + b"x" * 98, b"raw"] and slots == [None, None]
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="max_image_bytes"):
            LookalikeClient(max_image_bytes=bad)
        with pytest.raises(ValueError, match="max_image_bytes"):
            AsyncLookalikeClient(max_image_bytes=bad)
