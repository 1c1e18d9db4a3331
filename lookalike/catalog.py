"""Reading a catalog: a CSV `product_id,image[,category]` or a folder with one subfolder per category.

A CSV's first line may be a header naming its columns: then `product_id` and `image` (and `category`,
if present) are found by name, in any order, and other columns (a shop export's title, price, ...) are
ignored; a header without `product_id` or `image` is refused whole (`CatalogError`). Without a header
the columns are product_id, image[, category].

A product may have several images: one row (or file) each, with the same product id; the index scores
the product by its best image. Rows that cannot be used are returned as `Problem`s (where, why) and
never stop the others.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif"}
COLUMNS = ("product_id", "image", "category")


class CatalogError(ValueError):
    """A catalog that cannot be read at all (as opposed to rows that are reported and skipped)."""


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


def _columns(header: list[str], path: Path) -> dict[str, int] | None:
    """The position of each column named by a header line, or None when the line is data."""
    names = [cell.strip().lower() for cell in header]
    if not set(names) & set(COLUMNS):
        return None
    missing = [name for name in COLUMNS[:2] if name not in names]
    if missing:
        raise CatalogError(f"{path.name}: the header ({','.join(header)}) has no column {' or '.join(missing)}; "
                           f"a catalog needs product_id and image (and may have category)")
    repeated = sorted({name for name in names if name in COLUMNS and names.count(name) > 1})
    if repeated:
        raise CatalogError(f"{path.name}: the header names column {', '.join(repeated)} more than once")
    return {name: names.index(name) for name in COLUMNS if name in names}


def _read_csv(path: Path) -> tuple[list[CatalogItem], list[Problem]]:
    items: list[CatalogItem] = []
    problems: list[Problem] = []
    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.reader(handle))
    columns = _columns(rows[0], path) if rows else None
    start = 1 if columns else 0
    header = columns is not None  # then columns beyond the named ones are allowed (and ignored)
    columns = columns or {name: i for i, name in enumerate(COLUMNS)}
    named = (columns["product_id"], columns["image"]) != (0, 1)
    needed = max(columns["product_id"], columns["image"]) + 1
    expected = (f"{needed} fields or more (product_id in column {columns['product_id'] + 1}, image in column "
                f"{columns['image'] + 1})" if named else "product_id,image[,category]")
    for number, row in enumerate(rows[start:], start=start + 1):
        where = f"{path.name}:{number}"
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) < needed or (not header and len(row) > 3):
            problems.append(Problem(where, f"expected {expected}, got {len(row)} fields"))
            continue
        product_id, image = row[columns["product_id"]].strip(), row[columns["image"]].strip()
        category = row[columns["category"]].strip() if "category" in columns and columns["category"] < len(row) else ""
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
