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
