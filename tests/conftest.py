import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lookalike.serving import images

ROOT = Path(__file__).resolve().parents[1]
REPOSITORY = ROOT / "model_repository"


def encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    """Lossless by default in tests."""
    return images.encode(image, fmt, **params)


@pytest.fixture(scope="session")
def photo() -> Image.Image:
    """A real photo (scikit-image's coffee, 600x400)."""
    import skimage.data

    return Image.fromarray(skimage.data.coffee())


@pytest.fixture(scope="session")
def photos():
    from lookalike.quality.sample_data import real_photos

    return list(real_photos())


def finishes(call, seconds: float = 10.0):
    """What `call()` returns or raises, run in a thread: a call that blocks (a read of a FIFO, say)
    fails the test after `seconds` instead of hanging the suite."""
    import threading

    outcome = {}

    def run():
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=seconds)
    assert not thread.is_alive(), f"blocked for more than {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def pytest_report_header(config):
    return f"python {sys.version.split()[0]}, numpy {np.__version__}"


TIERS = {"export": "export", "integration": "integration"}  # tests/<folder> -> marker


def pytest_collection_modifyitems(config, items):
    """Tiers by folder: tests/unit needs neither torch exports nor the exported embedder nor tritonserver
    (make unit); tests/export exports with torch or reads the exported embedder; tests/integration starts
    tritonserver. Each folder's tests carry its marker, so `-m "not integration"` and the like work.
    Tests marked `last` run after all the others."""
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT).parts
        if len(parts) > 1 and parts[1] in TIERS:
            item.add_marker(TIERS[parts[1]])
    items.sort(key=lambda item: item.get_closest_marker("last") is not None)  # stable: the order is kept otherwise
