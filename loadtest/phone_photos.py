"""Full-size phone-camera JPEGs of catalog products, for benchmarks: what a shop's app uploads when a
shopper photographs a product, not a thumbnail.

Each photo is a shopper photo of a catalog packshot (`lookalike.quality.shopper.ShopperSimulator`: the product
on a real background, tilted, partly covered, relit), scaled up to a 12-megapixel phone frame (4032 x
3024 landscape or 3024 x 4032 portrait) or a 1080 x 2340 screenshot, given sensor noise at that size
(so that it compresses like a camera's photo, about 1.5-3 MB) and saved as a baseline JPEG at quality
88-92. Cached on disk: the same (catalog, count, seed) gives the same files.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
from PIL import Image

PHONE_FRAMES = {"landscape": (4032, 3024), "portrait": (3024, 4032)}


def camera_jpeg(image: Image.Image, size: tuple[int, int], *, seed: int, noise: float, quality: int) -> bytes:
    """`image` scaled to a camera frame of `size`, with sensor noise of `noise` (std, 0-255) at that
    size, as a baseline JPEG."""
    image = image.resize(size, Image.Resampling.BICUBIC)
    grain = np.random.default_rng(seed).normal(0, noise, (image.height, image.width, 1))
    image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + grain.astype(np.float32), 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def phone_photo(packshot: Image.Image, seed: int, simulator) -> bytes:
    """One phone-camera JPEG of a packshot; `simulator` is a `ShopperSimulator`."""
    rng = random.Random(seed)
    frame = rng.choice(("landscape", "portrait", "portrait", "screenshot"))
    shot = simulator(packshot, seed, frame=frame)
    if frame in PHONE_FRAMES:
        noise = rng.uniform(2.0, 4.0)
        return camera_jpeg(shot.image, PHONE_FRAMES[frame], seed=seed, noise=noise, quality=rng.randint(88, 92))
    buffer = io.BytesIO()  # a screenshot: its own pixels, no camera
    shot.image.save(buffer, format="JPEG", quality=rng.randint(88, 92))
    return buffer.getvalue()


def phone_photos(catalog_csv: Path, count: int, cache: Path, seed: int = 0) -> list[bytes]:
    """`count` phone JPEGs of products drawn from the catalog (cached under `cache`)."""
    from lookalike.indexing.catalog import read_catalog
    from lookalike.quality.shopper import ShopperSimulator, background_photos

    folder = Path(cache) / f"phone-{count}-{seed}"
    files = sorted(folder.glob("*.jpg"))
    if len(files) == count:
        return [f.read_bytes() for f in files]
    items, _ = read_catalog(Path(catalog_csv))
    picked = random.Random(seed).sample(items, min(count, len(items)))
    simulator = ShopperSimulator(background_photos())
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, item in enumerate(picked):
        packshot = Image.open(item.image).convert("RGBA")
        packshot.thumbnail((1024, 1024))  # some clip-art renders at tens of megapixels
        data = phone_photo(packshot, seed * 100_003 + i, simulator)
        (folder / f"{i:04d}.jpg").write_bytes(data)
        out.append(data)
    return out
