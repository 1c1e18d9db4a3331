"""The serving image reads the indexes that the host writes. The image's FAISS (faiss-gpu, pinned in
docker/requirements-serve.txt) is the host's version (.venv, requirements.lock), and a CPU build of that
version (.venv-faiss-image/, made by `make setup`) reads every index type that lookalike writes and
searches it as the host does. A GPU build reads and writes index files with the same code as the CPU
build of its version: what differs between versions, not between builds, is what can break."""

import json
import os
import re
import subprocess
from pathlib import Path

import faiss
import numpy as np
import pytest

from lookalike.indexing.index_types import choose
from lookalike.serving import filtering
from lookalike.serving.artifacts import INDEX_FILE
from lookalike.serving.index_files import Product
from lookalike.serving.search import ProductIndex
from tests.conftest import ROOT
from tests.unit import image_faiss_reader
from tests.unit.test_docker import pins

IMAGE_VENV = ROOT / ".venv-faiss-image"
K = 10


def image_faiss() -> str:
    """The FAISS that the serving image installs (faiss-gpu==VERSION)."""
    return pins("docker/requirements-serve.txt")["faiss-gpu"]


def release(version: str) -> str:
    """faiss.__version__ of a wheel's version: 1.9.0.post1 -> 1.9.0."""
    return re.sub(r"\.post\d+$", "", version)


def test_the_image_pins_the_hosts_faiss_version():
    image = image_faiss()
    assert release(image) == faiss.__version__, (f"docker/requirements-serve.txt pins faiss-gpu {image}, the host runs "
                                                 f"FAISS {faiss.__version__}: the image may not load the host's indexes")
    lock = re.search(r"^faiss-cpu==(\S+)$", (ROOT / "requirements.lock").read_text(), flags=re.M)
    assert lock and lock.group(1) == image, "requirements.lock and docker/requirements-serve.txt pin different FAISS"


@pytest.fixture(scope="module")
def image_python() -> Path:
    python = IMAGE_VENV / "bin" / "python"
    if not python.exists():
        reason = f"no {IMAGE_VENV.name}/ (faiss-cpu=={image_faiss()}, the serving image's FAISS): run `make setup`"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must read the host's indexes with the image's FAISS")
        pytest.skip(reason)
    return python


def unit_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def written_by_the_host(directory: Path, rng: np.random.Generator, dim: int) -> list[dict]:
    """Each index type that lookalike builds (index_types.choose), written by ProductIndex.save and loaded
    back by ProductIndex.load: flat, hnsw with a sub-index per category, ivf-pq. Returns every FAISS file
    written, with the version's search parameters."""
    categories = ("shoes", "bags", "hats")
    files = []
    for kind, n in (("flat", 500), ("hnsw", 600), ("ivf-pq", 10_000)):  # ivf-pq: 39 x 256 vectors to train PQ8
        choice = choose(kind, n, dim, nlist=64)
        products = [Product(f"p{i}", categories[i % len(categories)]) for i in range(n)]
        ProductIndex.build(products, unit_vectors(rng, n, dim), factory=choice.factory, search=choice.search).save(directory / kind)
        loaded = ProductIndex.load(directory / kind)
        assert loaded.kind == kind
        names = [INDEX_FILE, *loaded.meta.subindexes.values()]
        files += [{"path": str(directory / kind / name), "params": loaded.meta.search} for name in names]
    return files


def test_the_images_faiss_reads_every_index_type_the_host_writes(image_python, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    dim = 32
    # hnsw's sub-indexes are for categories of more than FILTER_SCAN_MAX_VECTORS vectors: lowered, so that
    # each category of this small catalog (200 vectors) gets one
    monkeypatch.setattr(filtering, "FILTER_SCAN_MAX_VECTORS", 100)
    files = written_by_the_host(tmp_path / "indexes", rng, dim)
    assert sum("/hnsw/category-" in f["path"] for f in files) == 3
    queries = unit_vectors(rng, 5, dim)
    np.save(tmp_path / "queries.npy", queries)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"queries": str(tmp_path / "queries.npy"), "k": K, "indexes": files}))
    env = {name: value for name, value in os.environ.items() if name not in ("PYTHONPATH", "PYTHONHOME")}
    run = subprocess.run([str(image_python), image_faiss_reader.__file__, str(spec)], capture_output=True, text=True,
                         timeout=300, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    image = json.loads(run.stdout)
    # the point: the FAISS that reads here is the image's, and the host's
    assert image["version"] == release(image_faiss()) == faiss.__version__
    host = [image_faiss_reader.read(f["path"], f["params"], queries, K) for f in files]
    assert {h["class"] for h in host} == {"IndexFlatIP", "IndexHNSWFlat", "IndexIVFPQ"}  # flat, hnsw, ivf-pq
    assert all(min(map(min, h["ids"])) >= 0 for h in host)  # every query found K vectors
    for read_here, read_there in zip(host, image["indexes"], strict=True):
        assert read_there == read_here, read_here["path"]
