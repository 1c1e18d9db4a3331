"""The README's sync and asyncio SDK examples, run as written (only the demo's address replaced by the
test server's) in a directory holding a catalog photo as `photo.jpg`."""

import csv
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def sdk_examples() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Call it\n"):text.index("With plain tritonclient:")]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return [b for b in blocks if "LookalikeClient(\"localhost:8001\")" in b or "AsyncLookalikeClient(\"localhost:8001\")" in b]


def test_the_readme_shows_a_short_sync_and_a_short_async_example():
    examples = sdk_examples()
    assert len(examples) == 2 and "AsyncLookalikeClient" in examples[1] and "AsyncLookalikeClient" not in examples[0]
    assert all(len(e.strip().splitlines()) <= 10 for e in examples), [len(e.strip().splitlines()) for e in examples]


@pytest.mark.parametrize("which", [0, 1], ids=["sync", "async"])
def test_readme_example_runs_as_written(which, server, catalog, tmp_path):
    with open(catalog / "catalog.csv") as handle:
        row = next(r for r in csv.DictReader(handle) if (catalog / r["image"]).stat().st_size < 200_000)
    shutil.copy(catalog / row["image"], tmp_path / "photo.jpg")  # the server reads the bytes, not the name
    code = sdk_examples()[which].replace("localhost:8001", server.options.grpc_url)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert row["product_id"] in done.stdout, done.stdout[-2000:]
    if which == 0:
        assert "refused: not_an_image" in done.stdout and "ServerInfo(" in done.stdout
    else:
        assert done.stdout.strip().endswith("True")
