"""visual_search / embed_image on a real tritonserver, over gRPC and HTTP."""

import csv
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lookalike.indexing.index_types import choose
from lookalike.indexing.indexer import index_catalog
from lookalike.indexing.publishing import publish_index, write_index_version
from lookalike.indexing.repository import Repository
from lookalike.quality.sample_data import perturb
from lookalike.serving.embedding import OnnxEmbedder
from lookalike.serving.images import over_background
from lookalike.serving.preprocessing import Preprocessor
from lookalike.serving.search import ProductIndex
from lookalike_client import InvalidRequestError, LookalikeClient
from tests.conftest import encode

pytestmark = pytest.mark.integration


def catalog_rows(catalog: Path) -> list[dict]:
    with open(catalog / "catalog.csv") as handle:
        return list(csv.DictReader(handle))


def sample(rows, n, seed=0):
    rng = np.random.default_rng(seed)
    return [rows[i] for i in sorted(rng.choice(len(rows), size=min(n, len(rows)), replace=False))]


def test_server_indexed_the_catalog(server):
    report = server.index_report
    assert report.products >= 200
    # openclipart ships a few PNGs over Pillow's decompression-bomb limit: reported, skipped.
    assert all("too large" in p.reason for p in report.problems), report.problems


def test_catalog_image_finds_itself(client, catalog, server):
    indexed = {p.product_id for p in ProductIndex.load(Repository(server.options.model_repository).latest_index_dir()).products}
    rows = [r for r in sample(catalog_rows(catalog), 25) if r["product_id"] in indexed]
    for row in rows:
        matches = client.search(catalog / row["image"], top_k=5)
        assert matches[0].product_id == row["product_id"], (row, matches[:2])
        assert matches[0].score > 0.9999  # it meets its own as_query catalog view
        assert [m.rank for m in matches] == [1, 2, 3, 4, 5]
        assert all(a.score >= b.score for a, b in zip(matches, matches[1:]))


def test_perturbed_copies_find_their_original(server, catalog):
    """Re-shot copies (off-centre crop, rescale, relight, JPEG re-encode) of catalog images."""
    indexed = {p.product_id for p in ProductIndex.load(Repository(server.options.model_repository).latest_index_dir()).products}
    rows = [r for r in sample(catalog_rows(catalog), 80, seed=1) if r["product_id"] in indexed]
    hits = {1: 0, 5: 0}
    with LookalikeClient(server.options.grpc_url) as client:
        def one(args):
            i, row = args
            with Image.open(catalog / row["image"]) as image:
                data = encode(perturb(over_background(image), seed=i), "JPEG", quality=75)
            return row["product_id"], [m.product_id for m in client.search(data, top_k=5)]

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, enumerate(rows)))
    for product_id, ids in results:
        hits[1] += ids[0] == product_id
        hits[5] += product_id in ids
    recall1, recall5 = hits[1] / len(results), hits[5] / len(results)
    print(f"\nperturbed-copy recall over {len(results)} catalog images: recall@1 {recall1:.3f}, recall@5 {recall5:.3f}")
    assert recall1 >= 0.8


def test_top_k_is_optional_and_range_checked(client, server):
    image = encode(Image.new("RGB", (64, 64), (200, 40, 40)), "PNG")
    assert len(client.search(image, top_k=3)) == 3
    # Without TOP_K at all (the optional ensemble input): the default, 10.
    module = client._module
    tensor = module.InferInput("IMAGE", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[image]], dtype=np.object_))
    result = client._client().infer("visual_search", [tensor])
    assert result.as_numpy("PRODUCT_IDS").shape == (1, 10)
    for bad in (0, -5, 1001):
        raw = module.InferInput("TOP_K", [1, 1], "INT32")
        raw.set_data_from_numpy(np.array([[bad]], dtype=np.int32))
        with pytest.raises(Exception) as info:
            client._client().infer("visual_search", [tensor, raw])
        assert info.value.status() in ("StatusCode.INVALID_ARGUMENT", "400"), info.value
        assert "TOP_K must be in 1..1000" in str(info.value)


def test_embed_image_matches_the_same_pipeline_in_process(server, photos):
    repo = Repository(server.options.model_repository)
    preprocessor = Preprocessor(repo.preprocessing())
    embedder = OnnxEmbedder(repo.embedder_dir / "1" / "model.onnx")
    images = [encode(image, "JPEG", quality=90) for _, image in photos[:6]]
    expected = embedder(preprocessor.batch(images))
    with LookalikeClient(server.options.grpc_url) as client:
        got = client.embed(images)
    assert got.shape == (6, 1280)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def _png(width: int, height: int, pixel_data: bytes) -> bytes:
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(pixel_data)) + chunk(b"IEND", b"")


def _bomb() -> bytes:
    return _png(20000, 20000, b"\x00" * 1000)


def _lying_jpeg(photo) -> bytes:
    """16x16 pixels of data under a header that says 7900x7900, properly ended."""
    data = encode(photo.crop((200, 150, 216, 166)), "JPEG", quality=90)
    sof = data.index(b"\xff\xc0")
    return data[: sof + 5] + struct.pack(">HH", 7900, 7900) + data[sof + 9 :]


def bad_inputs(photo):
    jpeg = encode(photo, "JPEG", quality=90)
    return {
        "empty": (b"", "empty image"),
        "text": (b"this is not an image, it is a sentence. " * 20, "not an image"),
        "truncated": (jpeg[: len(jpeg) // 3], "truncated"),
        "jpeg header larger than its data": (_lying_jpeg(photo), "truncated image: the JPEG's data ends before its 7900x7900"),
        "jpeg cut, closed with EOI": (jpeg[: len(jpeg) // 2] + b"\xff\xd9", "truncated image"),
        "png with 16 of 2000 rows": (_png(2000, 2000, (b"\x00" + b"\x80" * 6000) * 16), "truncated image: the PNG's data holds"),
        "too many bytes": (b"\xff\xd8\xff\xe0" + b"\x00" * (21 * 1024 * 1024), "image too large"),
        "decompression bomb": (_bomb(), "image too large"),
        "psd": (b"8BPS\x00\x01" + b"\x00" * 200, "unsupported image format PSD"),
    }


def test_bad_inputs_fail_alone_while_good_requests_succeed(client, server, photo):
    good = encode(photo, "JPEG", quality=90)
    expected_top = client.search(good, top_k=1)[0].product_id
    failures, successes = [], []
    stop = threading.Event()

    def good_traffic():
        while not stop.is_set():
            try:
                successes.append(client.search(good, top_k=1)[0].product_id)
            except Exception as exc:  # noqa: BLE001 - any failure of a good request is the bug
                failures.append(exc)

    workers = [threading.Thread(target=good_traffic) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        for name, (data, message) in bad_inputs(photo).items():
            for _ in range(3):
                with pytest.raises(InvalidRequestError) as info:
                    client.search(data, top_k=1)
                assert message in str(info.value), (name, str(info.value))
            # A request that mixes good and bad images fails as a whole, with the bad one named.
            with pytest.raises(InvalidRequestError, match="image 1 of 2"):
                client.search_batch([good, data], top_k=1)
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert not failures, failures[:3]
    assert len(successes) > 10 and set(successes) == {expected_top}
    assert server.ready()


def test_wrongly_typed_image_is_invalid_argument(client, server):
    module = client._module
    tensor = module.InferInput("IMAGE", [1, 1], "INT32")
    tensor.set_data_from_numpy(np.array([[7]], dtype=np.int32))
    with pytest.raises(Exception) as info:
        client._client().infer("visual_search", [tensor])
    assert info.value.status() in ("StatusCode.INVALID_ARGUMENT", "400"), info.value
    assert server.ready()


def test_reindex_while_queries_run_loses_no_request(server, catalog):
    repo = Repository(server.options.model_repository)
    before = repo.index_versions()[-1]
    image = (catalog / catalog_rows(catalog)[0]["image"]).read_bytes()
    stop = threading.Event()
    counts = {"ok": 0}
    failures = []

    def traffic(protocol):
        url = server.options.grpc_url if protocol == "grpc" else server.options.http_url
        with LookalikeClient(url, protocol=protocol, timeout_s=60) as client:
            while not stop.is_set():
                try:
                    assert client.search(image, top_k=3)[0].score > 0.99
                    counts["ok"] += 1
                except Exception as exc:  # noqa: BLE001
                    failures.append(f"{protocol}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=traffic, args=(p,)) for p in ("grpc", "grpc", "http", "http")]
    for t in threads:
        t.start()
    try:
        with LookalikeClient(server.options.grpc_url) as client:
            for reuse in (False, True):  # everything embedded again, then an incremental update
                index_catalog(catalog / "catalog.csv", repo, client, progress=False, reuse=reuse)
                time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    print(f"\n{counts['ok']} queries during 2 re-indexes, {len(failures)} failed")
    assert not failures, failures[:5]
    assert counts["ok"] > 20
    assert repo.index_versions()[-1] == before + 2
    assert len(repo.index_versions()) <= 2  # old versions pruned


def test_index_from_another_embedder_is_refused_and_old_version_keeps_serving(server, catalog):
    repo = Repository(server.options.model_repository)
    serving = repo.index_versions()[-1]
    vectors = np.eye(3, 1280, dtype=np.float32)
    from lookalike.serving.index_files import Product

    stale = ProductIndex.build([Product(f"X{i}") for i in range(3)], vectors, embedder_fingerprint="another-embedder")
    version = write_index_version(repo, stale.save)
    with LookalikeClient(server.options.grpc_url) as client:
        with pytest.raises(Exception, match="built with embedder another-embedder"):
            client.reload_index()
        image = (catalog / catalog_rows(catalog)[0]["image"]).read_bytes()
        assert client.search(image, top_k=1)[0].product_id == catalog_rows(catalog)[0]["product_id"]
    import shutil

    shutil.rmtree(repo.search_dir / str(version))
    assert repo.index_versions()[-1] == serving


def test_plain_tritonclient_as_in_the_readme(server, catalog):
    import tritonclient.grpc as grpcclient

    row = catalog_rows(catalog)[3]
    client = grpcclient.InferenceServerClient(server.options.grpc_url)
    image = np.array([[(catalog / row["image"]).read_bytes()]], dtype=np.object_)
    inputs = [grpcclient.InferInput("IMAGE", [1, 1], "BYTES"), grpcclient.InferInput("TOP_K", [1, 1], "INT32")]
    inputs[0].set_data_from_numpy(image)
    inputs[1].set_data_from_numpy(np.array([[5]], dtype=np.int32))
    result = client.infer("visual_search", inputs)
    ids = [x.decode() for x in result.as_numpy("PRODUCT_IDS")[0]]
    scores = result.as_numpy("SCORES")[0]
    assert ids[0] == row["product_id"] and scores[0] > 0.99 and len(ids) == 5


def test_an_hnsw_version_is_served_like_a_flat_one(server, catalog):
    """`--index hnsw`'s result, built here from the served vectors (no re-embedding), hot-swapped in,
    finds catalog images; then the exact index is served again."""
    repo = Repository(server.options.model_repository)
    flat = ProductIndex.load(repo.latest_index_dir())
    vectors = flat.index.reconstruct_n(0, flat.index.ntotal)

    def rebuilt(choice):
        return ProductIndex.build(flat.products, vectors, factory=choice.factory, search=choice.search,
                                  embedder_fingerprint=flat.fingerprint, vectors=flat.vectors.tolist())

    rows = sample(catalog_rows(catalog), 20, seed=3)
    with LookalikeClient(server.options.grpc_url) as client:
        version = publish_index(repo, rebuilt(choose("hnsw", len(vectors), flat.dim, hnsw_m=16)), client).version
        assert client.served_index_versions() == [version]
        assert ProductIndex.load(repo.search_dir / str(version)).kind == "hnsw"
        found = [client.search((catalog / r["image"]).read_bytes(), top_k=3)[0].product_id for r in rows]
        assert found == [r["product_id"] for r in rows]
        publish_index(repo, rebuilt(choose("flat", len(vectors), flat.dim)), client)
    log = server.log_file.read_text(errors="replace")
    assert f"product_search: version {version}, {len(flat)} products, hnsw index HNSW16 {{'efSearch': 128}}" in log


def test_index_settings_that_cannot_work_are_refused_before_embedding(server, catalog):
    import subprocess
    import sys
    from pathlib import Path

    import tritonclient.grpc as grpcclient

    def embedded() -> int:
        stats = grpcclient.InferenceServerClient(server.options.grpc_url).get_inference_statistics("embed_image")
        return sum(m.inference_count for m in stats.model_stats)

    before = embedded()
    lookalike = Path(sys.executable).parent / "lookalike"
    out = subprocess.run([str(lookalike), "index", str(catalog / "catalog.csv"), "--index", "ivf-pq", "--quiet",
                          "--url", server.options.grpc_url, "--model-repository", str(server.options.model_repository)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "ivf-pq needs training data" in out.stderr, out.stderr
    assert embedded() == before  # refused before a single image was sent


def run_index(server, catalog_csv: Path, repository: Path):
    """`lookalike index` through the session's server into `repository`."""
    import subprocess
    import sys

    lookalike = Path(sys.executable).parent / "lookalike"
    return subprocess.run([str(lookalike), "index", str(catalog_csv), "--quiet", "--url", server.options.grpc_url,
                           "--model-repository", str(repository)], capture_output=True, text=True, timeout=300)


def test_index_refuses_a_server_of_another_repository_or_embedder_before_embedding(server, catalog, tmp_path):
    """`lookalike index --url` at a server that serves another model repository (its own history), or
    another embedder: refused with both sides named, before one image is sent; nothing written."""
    import tritonclient.grpc as grpcclient

    from lookalike.indexing.publishing import write_empty_index
    from lookalike.indexing.repository import copy_repository
    from lookalike.serving.artifacts import EmbedderManifest

    def embedded() -> int:
        stats = grpcclient.InferenceServerClient(server.options.grpc_url).get_inference_statistics("embed_image")
        return sum(m.inference_count for m in stats.model_stats)

    rows = catalog_rows(catalog)[:2]
    (tmp_path / "two.csv").write_text("product_id,image,category\n" + "".join(
        f"{r['product_id']},{catalog / r['image']},{r['category']}\n" for r in rows))
    with LookalikeClient(server.options.grpc_url) as client:
        served = client.info()
    before = embedded()

    other = copy_repository(Path(server.options.model_repository), tmp_path / "other")
    write_empty_index(other)  # its own history: its version 1 is not the server's
    out = run_index(server, tmp_path / "two.csv", other.root)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"serves index version {served.index_version}" in out.stderr and "serves another model repository" in out.stderr
    assert other.index_versions() == [1] and not other.rejected_dir.exists()

    foreign = copy_repository(Path(server.options.model_repository), tmp_path / "foreign", with_indexes=True)
    manifest = EmbedderManifest.load(foreign.manifest_file)
    EmbedderManifest.from_dict({**manifest.to_dict(), "fingerprint": "0123456789abcdef"}).save(foreign.manifest_file)
    out = run_index(server, tmp_path / "two.csv", foreign.root)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"fingerprint {served.embedder_fingerprint}" in out.stderr and "fingerprint 0123456789abcdef" in out.stderr
    assert embedded() == before  # refused before a single image was sent


def test_index_claims_only_what_the_server_confirmed(server, catalog, tmp_path):
    """A copy of the server's repository (same versions, same ids) passes the check before embedding,
    but the server never sees what is written there: after the reload it still serves its own version,
    so the new version is set aside in the copy, and nothing claims it is served."""
    from lookalike.indexing.repository import copy_repository

    rows = catalog_rows(catalog)[:2]
    (tmp_path / "two.csv").write_text("product_id,image,category\n" + "".join(
        f"{r['product_id']},{catalog / r['image']},{r['category']}\n" for r in rows))
    copy = copy_repository(Path(server.options.model_repository), tmp_path / "copy", with_indexes=True)
    with LookalikeClient(server.options.grpc_url) as client:
        served = client.info()
        out = run_index(server, tmp_path / "two.csv", copy.root)
        assert out.returncode == 1, out.stdout + out.stderr
        assert "now serves" not in out.stdout
        written = served.index_version + 1
        assert f"serves index version {served.index_version}" in out.stderr and f"not index version {written}" in out.stderr
        assert client.info() == served  # the server did not move
    assert written not in copy.index_versions()
    (aside,) = copy.rejected_dir.iterdir()
    assert aside.name.startswith(f"{written}-")


def test_a_product_with_several_images_is_found_by_each_and_listed_once(server, catalog, tmp_path):
    """A CSV listing one product id on several rows: one product, scored by its best image."""
    repo = Repository(server.options.model_repository)
    full = ProductIndex.load(repo.latest_index_dir())
    rows = sample(catalog_rows(catalog), 5, seed=7)
    lines = ["product_id,image,category", f"MULTI,{catalog / rows[0]['image']},x", f"MULTI,{catalog / rows[1]['image']},x"]
    lines += [f"{r['product_id']},{catalog / r['image']},y" for r in rows[2:]]
    (tmp_path / "catalog.csv").write_text("\n".join(lines) + "\n")
    with LookalikeClient(server.options.grpc_url) as client:
        try:
            report = index_catalog(tmp_path / "catalog.csv", repo, client, progress=False)
            assert (report.products, report.images, report.problems) == (4, 5, [])
            for row in rows[:2]:
                ids = [m.product_id for m in client.search((catalog / row["image"]).read_bytes(), top_k=4)]
                assert ids[0] == "MULTI" and ids.count("MULTI") == 1 and len(ids) == 4
        finally:
            publish_index(repo, full, client)  # the session's catalog again, for the other tests


def test_a_catalog_whose_every_row_fails_leaves_the_served_version(server, catalog, tmp_path):
    from lookalike.indexing.indexer import EmptyCatalogError

    repo = Repository(server.options.model_repository)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    (tmp_path / "catalog.csv").write_text("product_id,image\nGONE,missing.png\nBROKEN,broken.png\n")
    with LookalikeClient(server.options.grpc_url) as client:
        serving = client.served_index_versions()
        with pytest.raises(EmptyCatalogError, match=r"no row of the catalog could be indexed \(2 problem") as info:
            index_catalog(tmp_path / "catalog.csv", repo, client, progress=False)
        assert {p.where for p in info.value.problems} == {"catalog.csv:2", "catalog.csv:3"}
        assert client.served_index_versions() == serving and repo.index_versions()[-1] == serving[-1]
        row = catalog_rows(catalog)[0]
        assert client.search((catalog / row["image"]).read_bytes(), top_k=1)[0].product_id == row["product_id"]
