"""Real images that ship inside installed packages, for the demo catalog, tests and export parity.

Nothing is downloaded: photos come from scikit-image's data module, scikit-learn's sample images and
matplotlib's sample data; clip art from Debian's openclipart-png (public domain, in category folders).
"""

from __future__ import annotations

import csv
import hashlib
import random
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageEnhance

CLIPART_ROOT = Path("/usr/share/openclipart/png")
# Folders of openclipart-png that look like product categories, as (category, folder).
CLIPART_CATEGORIES = (
    ("fruit", "food/fruit"),
    ("desserts", "food/desserts"),
    ("beverages", "food/beverages"),
    ("clothing", "people/clothing"),
    ("vehicles", "transportation/vehicles"),
    ("computer_hardware", "computer/hardware"),
    ("music", "recreation/music"),
    ("sports", "recreation/sports"),
    ("birds", "animals/birds"),
    ("mammals", "animals/mammals"),
    ("bugs", "animals/bugs"),
    ("flowers", "plants/flowers"),
    ("homes", "buildings/homes"),
    ("boats", "transportation/boating"),
)
_SKIMAGE_PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
    "colorwheel", "camera", "moon", "clock", "coins", "cell", "brick", "grass", "gravel", "page", "text", "logo",
)


def real_photos() -> Iterator[tuple[str, Image.Image]]:
    """(name, RGB image) of every photo the installed packages ship, in a fixed order."""
    import skimage.data

    for name in _SKIMAGE_PHOTOS:
        array = getattr(skimage.data, name)()
        image = Image.fromarray(np.asarray(array))
        yield f"skimage_{name}", image.convert("RGB")
    left, right, _ = skimage.data.stereo_motorcycle()
    yield "skimage_motorcycle_left", Image.fromarray(left).convert("RGB")
    yield "skimage_motorcycle_right", Image.fromarray(right).convert("RGB")
    from sklearn.datasets import load_sample_images

    for name, array in zip(("china", "flower"), load_sample_images().images):
        yield f"sklearn_{name}", Image.fromarray(array).convert("RGB")
    import matplotlib

    sample = Path(matplotlib.get_data_path()) / "sample_data"
    for file in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png"):
        if (sample / file).exists():
            with Image.open(sample / file) as image:
                yield f"mpl_{Path(file).stem.lower()}", image.convert("RGB")


def perturb(image: Image.Image, seed: int) -> Image.Image:
    """A plausible re-shot of the same product: off-centre crop, rescale, light change."""
    rng = random.Random(seed)
    image = image.convert("RGB")
    w, h = image.size
    fx, fy = rng.uniform(0.8, 0.92), rng.uniform(0.8, 0.92)
    cw, ch = int(w * fx), int(h * fy)
    x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
    image = image.crop((x0, y0, x0 + cw, y0 + ch))
    scale = rng.uniform(0.6, 1.3)
    image = image.resize((max(16, int(cw * scale)), max(16, int(ch * scale))), Image.Resampling.BICUBIC)
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.85, 1.15))
    return image


def clipart_files(folder: str) -> list[Path]:
    return sorted(p for p in (CLIPART_ROOT / folder).rglob("*.png") if p.is_file())


def build_sample_catalog(out: Path, per_category: int = 45, holdout: int = 3, seed: int = 0) -> dict:
    """Writes a catalog of real images to `out`:

        out/catalog.csv           product_id,image,category (images relative to the CSV)
        out/images/<category>/    the catalog images
        out/queries/              photos NOT in the catalog: held-out clip art of each category, and
                                  re-shot (cropped, rescaled, relit, JPEG) copies of catalog photos
        out/queries.csv           query,category,source_product (what a good answer looks like)
    """
    if not CLIPART_ROOT.is_dir():
        raise FileNotFoundError(
            f"{CLIPART_ROOT} is missing: install Debian's openclipart-png (make setup does: apt-get install openclipart-png)"
        )
    rng = random.Random(seed)
    if out.exists():
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True)
    (out / "queries").mkdir()
    rows: list[tuple[str, str, str]] = []
    queries: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    seen_content: set[str] = set()  # openclipart files the same drawing under several folders

    def unique(file: Path) -> bool:
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        if digest in seen_content:
            return False
        seen_content.add(digest)
        return True

    for category, folder in CLIPART_CATEGORIES:
        files = [f for f in clipart_files(folder) if unique(f)]
        rng.shuffle(files)
        held, kept = files[:holdout], files[holdout : holdout + per_category]
        (out / "images" / category).mkdir()
        for file in kept:
            product_id = f"{category}-{file.stem}"
            if product_id in seen:
                continue
            seen.add(product_id)
            shutil.copyfile(file, out / "images" / category / file.name)
            rows.append((product_id, f"images/{category}/{file.name}", category))
        for file in held:
            name = f"{category}-{file.stem}.png"
            shutil.copyfile(file, out / "queries" / name)
            queries.append((f"queries/{name}", category, ""))
    (out / "images" / "photos").mkdir()
    for i, (name, image) in enumerate(real_photos()):
        image.save(out / "images" / "photos" / f"{name}.jpg", quality=92)
        rows.append((name, f"images/photos/{name}.jpg", "photos"))
        if i % 3 == 0:  # every third photo also gets a re-shot query
            query = f"queries/reshot-{name}.jpg"
            perturb(image, seed + i).save(out / query, quality=80)
            queries.append((query, "photos", name))
    with open(out / "catalog.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("product_id", "image", "category"))
        writer.writerows(rows)
    with open(out / "queries.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("query", "category", "source_product"))
        writer.writerows(queries)
    categories = sorted({r[2] for r in rows})
    return {"products": len(rows), "categories": len(categories), "queries": len(queries), "path": str(out)}
