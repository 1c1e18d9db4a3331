"""Reading a catalog: a CSV `product_id,image[,category]` or a folder with one subfolder per category.

A CSV's first line may be a header naming its columns: then `product_id` and `image` (and `category`,
if present) are found by name, in any order, and other columns (a shop export's title, price, ...) are
ignored; a header without `product_id` or `image` is refused whole (`CatalogError`). Without a header
the columns are product_id, image[, category].

A product may have several images: one row (or file) each, with the same product id; the index scores
the product by its best image. Rows that cannot be used are returned as `Problem`s (where, why) and
never stop the others: a line the CSV parser refuses (a field over csv's limit of 131,072 characters),
an id or category over MAX_ID_CHARS, an image path that is not a regular file (missing, a FIFO, a
device, a directory, a socket: checked by `lookalike_client.files`, without opening it), a name too
long for the file system. Image paths are relative to the CSV's folder, or absolute.
"""

from __future__ import annotations

import csv
import io
import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from lookalike_client.contract import quoted
from lookalike_client.files import FileRefusedError, check_file, open_file

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif"}
COLUMNS = ("product_id", "image", "category")
# The longest product id or category a row may have, in characters: the index stores, and every answer
# carries, the ids; a row with a longer one is reported and skipped.
MAX_ID_CHARS = 1024


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


def csv_records(reader: Iterator[list[str]], name: str,
                on_error: Callable[[Problem], None]) -> Iterator[tuple[int, list[str]]]:
    """(record number from 1, fields) of each record of a csv.reader of the file `name`; a record the
    parser refuses (a field over csv.field_size_limit(), say) is handed to `on_error` as a Problem at
    its number, and reading goes on with the next line."""
    number = 0
    while True:
        number += 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            on_error(Problem(f"{name}:{number}", _csv_reason(exc)))
            continue
        yield number, row


def _csv_reason(exc: csv.Error) -> str:
    if "field larger than field limit" in str(exc):
        return f"field longer than {csv.field_size_limit():,} characters"
    return f"cannot parse the line: {exc}"


def _id_problem(product_id: str, category: str) -> str | None:
    for what, value in (("product id", product_id), ("category", category)):
        if len(value) > MAX_ID_CHARS:
            return f"{what} longer than {MAX_ID_CHARS:,} characters: {quoted(value)}"
    return None


def _image_problem(image_path: Path) -> str | None:
    """Why the image a row names cannot be used (not a regular file, ...), or None."""
    try:
        check_file(image_path)
    except FileRefusedError as exc:
        return f"image file not found: {image_path}" if exc.kind == "missing" else str(exc)
    return None


def _read_csv(path: Path) -> tuple[list[CatalogItem], list[Problem]]:
    items: list[CatalogItem] = []
    problems: list[Problem] = []
    with open_file(path) as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as handle:
        records = csv_records(csv.reader(handle), path.name, problems.append)
        first = next(records, None)
        columns = _columns(first[1], path) if first is not None and first[0] == 1 else None
        header = columns is not None  # then columns beyond the named ones are allowed (and ignored)
        columns = columns or {name: i for i, name in enumerate(COLUMNS)}
        named = (columns["product_id"], columns["image"]) != (0, 1)
        needed = max(columns["product_id"], columns["image"]) + 1
        expected = (f"{needed} fields or more (product_id in column {columns['product_id'] + 1}, image in column "
                    f"{columns['image'] + 1})" if named else "product_id,image[,category]")
        rows = records if header or first is None else itertools.chain([first], records)
        for number, row in rows:
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
            too_long = _id_problem(product_id, category)
            if too_long:
                problems.append(Problem(where, too_long))
                continue
            image_path = Path(image) if Path(image).is_absolute() else (path.parent / image)
            refused = _image_problem(image_path)
            if refused:
                problems.append(Problem(where, refused))
                continue
            items.append(CatalogItem(product_id, image_path.resolve(), category, where))
    return _dedupe(items, problems), problems


def _walk(root: Path, problems: list[Problem]) -> list[Path]:
    """Every entry under `root` but folders (walked) and hidden ones (names starting with "."), sorted;
    a folder that cannot be listed is a Problem. Symbolic links to folders are not followed."""
    found: list[Path] = []
    folders = [root]
    while folders:
        folder = folders.pop()
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError as exc:
            problems.append(Problem(str(folder.relative_to(root)), f"cannot list the folder: {exc.strerror or exc}"))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_folder = entry.is_dir(follow_symlinks=False)
            except OSError:
                is_folder = False
            (folders if is_folder else found).append(Path(entry.path))
    return sorted(found)


def _read_folder(root: Path) -> tuple[list[CatalogItem], list[Problem]]:
    items: list[CatalogItem] = []
    problems: list[Problem] = []
    for file in _walk(root, problems):
        relative = file.relative_to(root)
        try:
            check_file(file)
        except FileRefusedError as exc:  # a FIFO, a socket, a link to a device or to a folder, a broken link
            reason = exc.reason
            if exc.kind == "missing" and file.is_symlink():
                reason = "broken symbolic link (its target is not found)"
            elif isinstance(exc, IsADirectoryError):
                reason = "symbolic link to a folder (not followed)"
            problems.append(Problem(str(relative), reason))
            continue
        if file.suffix.lower() not in IMAGE_SUFFIXES:
            problems.append(Problem(str(relative), f"not an image file name (suffix {file.suffix or 'none'})"))
            continue
        category = relative.parts[0] if len(relative.parts) > 1 else ""
        items.append(CatalogItem(file.stem, file.resolve(), category, str(relative)))
    return _dedupe(items, problems), problems
