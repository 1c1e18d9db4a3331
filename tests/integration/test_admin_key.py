"""Model control restricted to the admin key, as `lookalike serve` does beyond loopback (forced on here,
on loopback, so that no test binds a public address)."""

import pytest
from PIL import Image

from lookalike.publishing import write_empty_index
from lookalike.repository import copy_repository
from lookalike.server import ServerOptions, TritonServer, free_port
from lookalike_client import LookalikeClient, PermissionDeniedError
from tests.conftest import REPOSITORY, encode

pytestmark = pytest.mark.integration


def test_model_control_needs_the_admin_key_inference_does_not(tmp_path):
    repo = copy_repository(REPOSITORY, tmp_path / "model_repository")
    write_empty_index(repo)
    options = ServerOptions(model_repository=repo.root, http_port=free_port(), grpc_port=free_port(),
                            metrics_port=free_port(), restrict_admin=True, admin_key="k3y-for-tests")
    image = encode(Image.new("RGB", (32, 32), (10, 200, 10)), "PNG")
    with TritonServer(options, log_file=tmp_path / "tritonserver.log"):
        for protocol, url in (("grpc", options.grpc_url), ("http", options.http_url)):
            with LookalikeClient(url, protocol=protocol, admin_key="") as anonymous:
                assert anonymous.search(image, top_k=3) == []  # inference is open (empty catalog)
                with pytest.raises(PermissionDeniedError, match="restricted, expecting header .*lookalike-admin-key"):
                    anonymous.reload_index()
            with LookalikeClient(url, protocol=protocol, admin_key="wrong") as wrong:
                with pytest.raises(PermissionDeniedError):
                    wrong.reload_index()
            with LookalikeClient(url, protocol=protocol, admin_key="k3y-for-tests") as admin:
                admin.reload_index()
                assert admin.is_ready()
