"""The client SDK installs alone: `pip install client/` into a clean venv (no server package, no Pillow,
torch, ONNX Runtime or FAISS), and that venv's Python searches the real test server over gRPC and HTTP,
with the sync and the asyncio client, from a file and from a numpy array.

pip installs from the machine's package registry (its own configuration); when it cannot reach one,
the test is skipped, saying pip's error. Any other failure fails it."""

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lookalike.indexing.repository import Repository
from lookalike.serving.search import ProductIndex

ROOT = Path(__file__).resolve().parents[2]
PIP_TIMEOUT_S = 300
# Distributions of the server side that the SDK must not pull in.
SERVER_ONLY = {"lookalike", "pillow", "torch", "torchvision", "onnxruntime", "onnxruntime-gpu", "faiss", "faiss-cpu",
               "faiss-gpu", "onnx"}
# What pip says when it cannot reach a registry (urllib3 / socket errors, retries).
UNREACHABLE = ("NewConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "Max retries exceeded",
               "Temporary failure in name resolution", "Name or service not known", "Network is unreachable",
               "Connection refused", "ProxyError", "SSLError")

PROBE = textwrap.dedent('''
    """Run by the clean venv's Python: what it can import, and searches against the server."""
    import asyncio
    import importlib
    import json
    import sys

    out = {"prefix": sys.prefix, "unimportable": []}
    for name in ("lookalike", "PIL", "torch", "onnxruntime", "faiss"):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:
            out["unimportable"].append(name)

    import numpy as np

    import lookalike_client
    from lookalike_client import AsyncLookalikeClient, LookalikeClient

    grpc_url, http_url, image, pixels = sys.argv[1:5]
    array = np.load(pixels)
    out["client_file"] = lookalike_client.__file__
    out["version"] = lookalike_client.__version__

    def ids(matches):
        return [[m.product_id, m.score] for m in matches]

    async def asynchronous(url, protocol):
        async with AsyncLookalikeClient(url, protocol=protocol, timeout_s=60) as client:
            return ids(await client.search(image, top_k=3))

    for protocol, url in (("grpc", grpc_url), ("http", http_url)):
        with LookalikeClient(url, protocol=protocol, timeout_s=60) as client:
            out[f"{protocol} sync"] = ids(client.search(image, top_k=3))
            out[f"{protocol} numpy"] = ids(client.search(array, top_k=3))
        out[f"{protocol} asyncio"] = asyncio.run(asynchronous(url, protocol))
    print(json.dumps(out))
''')


def clean_env() -> dict[str, str]:
    """This process's environment (the machine's pip configuration included) without its venv."""
    return {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}


def catalog_image(catalog: Path, server) -> tuple[str, Path]:
    """A catalog product that the served index holds, with an RGB or RGBA image (numpy as it is)."""
    indexed = {p.product_id for p in ProductIndex.load(Repository(server.options.model_repository).latest_index_dir()).products}
    with open(catalog / "catalog.csv") as handle:
        for row in csv.DictReader(handle):
            path = catalog / row["image"]
            if row["product_id"] in indexed:
                with Image.open(path) as image:
                    if image.mode in ("RGB", "RGBA"):
                        return row["product_id"], path
    raise AssertionError("no indexed RGB or RGBA catalog image")


def test_client_installs_alone_and_searches_the_server(server, catalog, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120, env=clean_env())
    python = venv / "bin" / "python"
    try:
        pip = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", str(ROOT / "client")],
                             capture_output=True, text=True, timeout=PIP_TIMEOUT_S, env=clean_env(), cwd=tmp_path)
    except subprocess.TimeoutExpired as exc:
        pytest.skip(f"pip install did not finish in {PIP_TIMEOUT_S} s (no registry in reach?): {str(exc.stderr)[-1500:]}")
    if pip.returncode != 0:
        said = pip.stdout + pip.stderr
        if any(marker in said for marker in UNREACHABLE):
            pytest.skip(f"pip cannot reach a package registry: {said[-1500:]}")
        pytest.fail(f"pip install {ROOT / 'client'} failed ({pip.returncode}):\n{said[-3000:]}")

    listed = subprocess.run([str(python), "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"],
                            capture_output=True, text=True, check=True, timeout=120, env=clean_env())
    installed = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    assert {"lookalike-client", "tritonclient", "numpy"} <= installed, installed
    assert not installed & SERVER_ONLY, installed & SERVER_ONLY
    typed = list(venv.glob("lib/python*/site-packages/lookalike_client/py.typed"))
    assert len(typed) == 1, "lookalike_client/py.typed is not installed"

    product_id, image = catalog_image(catalog, server)
    with Image.open(image) as opened:
        np.save(tmp_path / "pixels.npy", np.asarray(opened, dtype=np.uint8))  # HWC uint8, RGB or RGBA
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    run = subprocess.run([str(python), str(probe), server.options.grpc_url, server.options.http_url, str(image),
                          str(tmp_path / "pixels.npy")],
                         capture_output=True, text=True, timeout=300, env=clean_env(), cwd=tmp_path)  # not the repo's root
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])

    assert sorted(out["unimportable"]) == sorted(["lookalike", "PIL", "torch", "onnxruntime", "faiss"]), out["unimportable"]
    assert Path(out["client_file"]).resolve().is_relative_to(venv.resolve()), out["client_file"]  # the installed copy
    assert Path(out["client_file"]).resolve().parent == typed[0].resolve().parent
    for protocol in ("grpc", "http"):
        for how in ("sync", "asyncio", "numpy"):
            matches = out[f"{protocol} {how}"]
            assert len(matches) == 3 and matches[0][0] == product_id, (protocol, how, product_id, matches)
            assert matches[0][1] > 0.999, (protocol, how, matches)  # the catalog image meets itself
    assert server.ready()
