"""The README's examples, run as written against the real test server, in a directory holding a catalog
photo as `photo.jpg`: the sync and asyncio SDK examples (only the demo's gRPC address replaced by the test
server's) and the curl example over HTTP (only its HTTP address replaced)."""

import csv
import json
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def readme_section(start: str, end: str) -> str:
    text = (ROOT / "README.md").read_text()
    return text[text.index(start):text.index(end, text.index(start))]


def sdk_examples() -> list[str]:
    section = readme_section("### The Python SDK\n", "### curl over HTTP\n")
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return [b for b in blocks if "LookalikeClient(\"localhost:8001\")" in b or "AsyncLookalikeClient(\"localhost:8001\")" in b]


def curl_example() -> str:
    blocks = re.findall(r"```bash\n(.*?)```", readme_section("### curl over HTTP\n", "### Any gRPC client\n"), flags=re.S)
    assert len(blocks) == 1, blocks
    return blocks[0]


def small_catalog_photo(catalog, tmp_path) -> dict[str, str]:
    with open(catalog / "catalog.csv") as handle:
        row = next(r for r in csv.DictReader(handle) if (catalog / r["image"]).stat().st_size < 200_000)
    shutil.copy(catalog / row["image"], tmp_path / "photo.jpg")  # the server reads the bytes, not the name
    return row


def test_the_readme_shows_a_short_sync_and_a_short_async_example():
    examples = sdk_examples()
    assert len(examples) == 2 and "AsyncLookalikeClient" in examples[1] and "AsyncLookalikeClient" not in examples[0]
    assert all(len(e.strip().splitlines()) <= 10 for e in examples), [len(e.strip().splitlines()) for e in examples]


def test_the_readme_curl_example_uses_the_binary_data_extension():
    script = curl_example()
    for needed in ("Inference-Header-Content-Length", '"binary_data_size"', '"binary_data":false',
                   'struct.pack("<I"', "localhost:8000/v2/models/visual_search/infer"):
        assert needed in script, needed


@pytest.mark.parametrize("which", [0, 1], ids=["sync", "async"])
def test_readme_example_runs_as_written(which, server, catalog, tmp_path):
    row = small_catalog_photo(catalog, tmp_path)
    code = sdk_examples()[which].replace("localhost:8001", server.options.grpc_url)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert row["product_id"] in done.stdout, done.stdout[-2000:]
    if which == 0:
        assert "refused: not_an_image" in done.stdout and "ServerInfo(" in done.stdout
    else:
        assert done.stdout.strip().endswith("True")


def test_readme_curl_example_runs_as_written(server, catalog, tmp_path):
    if shutil.which("curl") is None or shutil.which("python3") is None:
        pytest.fail("the README's curl example needs curl and python3 on PATH")
    row = small_catalog_photo(catalog, tmp_path)
    script = curl_example().replace("localhost:8000", server.options.http_url)
    done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    outputs = {output["name"]: output for output in json.loads(done.stdout)["outputs"]}
    ids, scores = outputs["PRODUCT_IDS"], outputs["SCORES"]
    assert ids["shape"] == scores["shape"] == [1, 5], outputs
    assert row["product_id"] in ids["data"], ids["data"]
    assert scores["data"] == sorted(scores["data"], reverse=True), scores["data"]
