import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
REPOSITORY = ROOT / "model_repository"


def encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def photo() -> Image.Image:
    """A real photo (scikit-image's coffee, 600x400)."""
    import skimage.data

    return Image.fromarray(skimage.data.coffee())


@pytest.fixture(scope="session")
def photos():
    from lookalike.sample_data import real_photos

    return list(real_photos())


def pytest_report_header(config):
    return f"python {sys.version.split()[0]}, numpy {np.__version__}"
