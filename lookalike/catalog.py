"""Reading a catalog: a CSV `product_id,image[,category]` or a folder with one subfolder per category.

A product may have several images: one row (or file) each, with the same product id; the index scores
the product by its best image. Rows that cannot be used are returned as `Problem`s (where, why) and
never stop the others.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif"}


@dataclass(frozen=True)
class CatalogItem:
    product_id: str
    image: Path
    category: str = ""
    where: str = ""  # "catalog.csv:12" or the file path, for messages


@dataclass(frozen=True)
class Problem:
    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


def read_catalog(path: str | Path) -> tuple[list[CatalogItem], list[Problem]]:
    path = Path(path)
    if path.is_dir():
        return _read_folder(path)
    if path.is_file():
        return _read_csv(path)
    raise FileNotFoundError(f"catalog {path} is neither a CSV file nor a folder")


def _dedupe(items: list[CatalogItem], problems: list[Problem]) -> list[CatalogItem]:
    """A product may have several images, one row each. A row that repeats one of its product's images,
    or gives it another category than its first row, is reported and skipped."""
    first: dict[str, CatalogItem] = {}
    images: dict[str, dict[Path, str]] = {}
    unique = []
    for item in items:
        known = first.get(item.product_id)
        if known is not None:
            seen = images[item.product_id]
            if item.image in seen:
                problems.append(Problem(item.where, f"duplicate row: product {item.product_id!r} already has image "
                                                    f"{item.image.name} (at {seen[item.image]})"))
                continue
            if item.category != known.category:
                problems.append(Problem(item.where, f"product {item.product_id!r} is in category {known.category!r} "
                                                    f"(at {known.where}), this row says {item.category!r}"))
                continue
        else:
            first[item.product_id] = item
            images[item.product_id] = {}
        images[item.product_id][item.image] = item.where
        unique.append(item)
    return unique


def _read_csv(path: Path) -> tuple[list[CatalogItem], list[Problem]]:
    items: list[CatalogItem] = []
    problems: list[Problem] = []
    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.reader(handle))
    start = 0
    if rows and [cell.strip().lower() for cell in rows[0][:2]] == ["product_id", "image"]:
        start = 1
    for number, row in enumerate(rows[start:], start=start + 1):
        where = f"{path.name}:{number}"
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) < 2 or len(row) > 3:
            problems.append(Problem(where, f"expected product_id,image[,category], got {len(row)} fields"))
            continue
        product_id, image = row[0].strip(), row[1].strip()
        category = row[2].strip() if len(row) == 3 else ""
        if not product_id:
            problems.append(Problem(where, "empty product id"))
            continue
        if not image:
            problems.append(Problem(where, "empty image path"))
            continue
        image_path = Path(image) if Path(image).is_absolute() else (path.parent / image)
        if not image_path.is_file():
            problems.append(Problem(where, f"image file not found: {image_path}"))
            continue
        items.append(CatalogItem(product_id, image_path.resolve(), category, where))
    return _dedupe(items, problems), problems


def _read_folder(root: Path) -> tuple[list[CatalogItem], list[Problem]]:
    items: list[CatalogItem] = []
    problems: list[Problem] = []
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = file.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if file.suffix.lower() not in IMAGE_SUFFIXES:
            problems.append(Problem(str(relative), f"not an image file name (suffix {file.suffix or 'none'})"))
            continue
        category = relative.parts[0] if len(relative.parts) > 1 else ""
        items.append(CatalogItem(file.stem, file.resolve(), category, str(relative)))
    return _dedupe(items, problems), problems
