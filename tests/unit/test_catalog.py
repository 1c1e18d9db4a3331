"""lookalike.indexing.catalog: CSV and folder catalogs, bad rows reported and skipped."""

from pathlib import Path

import pytest
from PIL import Image

from lookalike.indexing.catalog import CatalogError, read_catalog
from tests.conftest import finishes


def make_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(path)
    return path


def test_csv_with_bad_rows(tmp_path):
    make_image(tmp_path / "img" / "a.png")
    make_image(tmp_path / "img" / "b.png")
    absolute = make_image(tmp_path / "elsewhere" / "c.png")
    (tmp_path / "catalog.csv").write_text(
        "product_id,image,category\n"
        "A-1,img/a.png,shoes\n"
        f"C-3,{absolute},bags\n"
        "B-2,img/b.png\n"
        ",img/a.png,shoes\n"          # empty id
        "D-4,img/missing.png,shoes\n"  # no such file
        "E-5\n"                        # too few fields
        "A-1,img/b.png,shoes\n"        # a second image of A-1
        "A-1,img/a.png,shoes\n"        # A-1's first image again
        "A-1,img/c.png,bags\n"         # another category than A-1's
        "\n"
    )
    make_image(tmp_path / "img" / "c.png")
    items, problems = read_catalog(tmp_path / "catalog.csv")
    assert [(i.product_id, i.image.name, i.category) for i in items] == [
        ("A-1", "a.png", "shoes"), ("C-3", "c.png", "bags"), ("B-2", "b.png", ""), ("A-1", "b.png", "shoes")]
    assert items[1].image == absolute
    reasons = {p.where: p.reason for p in problems}
    assert reasons == {
        "catalog.csv:5": "empty product id",
        "catalog.csv:6": f"image file not found: {tmp_path / 'img' / 'missing.png'}",
        "catalog.csv:7": "expected product_id,image[,category], got 1 fields",
        "catalog.csv:9": "duplicate row: product 'A-1' already has image a.png (at catalog.csv:2)",
        "catalog.csv:10": "product 'A-1' is in category 'shoes' (at catalog.csv:2), this row says 'bags'",
    }


def test_csv_without_header(tmp_path):
    make_image(tmp_path / "x.png")
    (tmp_path / "c.csv").write_text("X,x.png,toys\n")
    items, problems = read_catalog(tmp_path / "c.csv")
    assert [i.product_id for i in items] == ["X"] and not problems


def test_folder_catalog(tmp_path):
    make_image(tmp_path / "shoes" / "S1.jpg")
    make_image(tmp_path / "bags" / "B1.png")
    make_image(tmp_path / "bags" / "S1.png")  # same stem as a shoe: one id in two categories
    (tmp_path / "bags" / "notes.txt").write_text("hi")
    make_image(tmp_path / ".hidden" / "H.png")
    items, problems = read_catalog(tmp_path)
    # files are read in sorted order: bags/S1.png comes first, shoes/S1.jpg is the duplicate
    assert [(i.product_id, i.category) for i in items] == [("B1", "bags"), ("S1", "bags")]
    assert sorted(p.reason.split(" (")[0] for p in problems) == ["not an image file name", "product 'S1' is in category 'bags'"]


def test_csv_header_names_the_columns(tmp_path):
    """A shop's export: columns in another order, extra columns ignored, a short row reported."""
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.png")
    (tmp_path / "export.csv").write_text(
        "Title,Category,Image,Price,Product_ID\n"
        "Red shoe,shoes,a.png,19.99,A-1\n"
        '"Bag, large",bags,b.png,5,B-2\n'
        "Short,shoes,a.png\n"
    )
    items, problems = read_catalog(tmp_path / "export.csv")
    assert [(i.product_id, i.image.name, i.category) for i in items] == [("A-1", "a.png", "shoes"), ("B-2", "b.png", "bags")]
    assert [str(p) for p in problems] == [
        "export.csv:4: expected 5 fields or more (product_id in column 5, image in column 3), got 3 fields"]


def test_csv_standard_header_with_extra_columns(tmp_path):
    make_image(tmp_path / "a.png")
    (tmp_path / "c.csv").write_text("product_id,image,category,price\nA-1,a.png,shoes,3\nB-2\n")
    items, problems = read_catalog(tmp_path / "c.csv")
    assert [(i.product_id, i.category) for i in items] == [("A-1", "shoes")]
    assert [str(p) for p in problems] == ["c.csv:3: expected product_id,image[,category], got 1 fields"]


def test_csv_header_without_a_required_column_is_refused_whole(tmp_path):
    (tmp_path / "c.csv").write_text("sku,url,category\nX,x.png,toys\n")
    with pytest.raises(CatalogError, match=r"c\.csv: the header \(sku,url,category\) has no column product_id or image"):
        read_catalog(tmp_path / "c.csv")
    (tmp_path / "d.csv").write_text("product_id,image,image\nX,x.png,y.png\n")
    with pytest.raises(CatalogError, match="names column image more than once"):
        read_catalog(tmp_path / "d.csv")


def test_csv_bad_rows_of_every_kind_cost_only_themselves(tmp_path):
    import os

    from lookalike.indexing.catalog import MAX_ID_CHARS
    from lookalike_client.contract import quoted

    make_image(tmp_path / "img" / "a.png")
    make_image(tmp_path / "img" / "b.png")
    make_image(tmp_path / "img" / "c.png")
    os.mkfifo(tmp_path / "img" / "pipe.png")
    os.symlink("/dev/zero", tmp_path / "img" / "zero.png")
    (tmp_path / "img" / "folder.png").mkdir()
    long_id = "L" * (MAX_ID_CHARS + 1)
    long_name = "n" * 300 + ".png"
    (tmp_path / "catalog.csv").write_text(
        "product_id,image,category\n"
        "A-1,img/a.png,shoes\n"
        f"X-1,img/{'x' * 200_000}.png,shoes\n"  # a field over csv's limit
        "B-2,img/b.png,shoes\n"
        f"N-1,img/{long_name},shoes\n"          # a name over 255 bytes
        "F-1,img/pipe.png,shoes\n"              # a FIFO: reading it would block for ever
        "Z-1,img/zero.png,shoes\n"              # a link to /dev/zero: it never ends
        "D-1,img/folder.png,shoes\n"            # a directory
        f"{long_id},img/a.png,shoes\n"          # an id over MAX_ID_CHARS
        f"K-1,img/a.png,{'k' * (MAX_ID_CHARS + 1)}\n"
        "C-3,img/c.png,bags\n"
    )
    items, problems = finishes(lambda: read_catalog(tmp_path / "catalog.csv"))
    assert [(i.product_id, i.image.name, i.category) for i in items] == [
        ("A-1", "a.png", "shoes"), ("B-2", "b.png", "shoes"), ("C-3", "c.png", "bags")]
    img = tmp_path / "img"
    reasons = {p.where: p.reason for p in problems}
    assert reasons == {
        "catalog.csv:3": "field longer than 131,072 characters",
        "catalog.csv:5": f"{quoted(str(img / long_name))}: file name too long (a name over 255 bytes or a path over 4,096)",
        "catalog.csv:6": f"{quoted(str(img / 'pipe.png'))}: not a regular file (a FIFO)",
        "catalog.csv:7": f"{quoted(str(img / 'zero.png'))}: not a regular file (a character device)",
        "catalog.csv:8": f"{quoted(str(img / 'folder.png'))}: not a regular file (a directory)",
        "catalog.csv:9": f"product id longer than 1,024 characters: {quoted(long_id)}",
        "catalog.csv:10": f"category longer than 1,024 characters: {quoted('k' * (MAX_ID_CHARS + 1))}",
    }
    assert all(len(p.reason) < 400 for p in problems)  # long inputs are quoted short


def test_csv_a_refused_first_line_is_no_header(tmp_path):
    make_image(tmp_path / "a.png")
    (tmp_path / "c.csv").write_text(f"{'h' * 200_000},image\nA-1,a.png\n")
    items, problems = read_catalog(tmp_path / "c.csv")
    assert [i.product_id for i in items] == ["A-1"]
    assert [str(p) for p in problems] == ["c.csv:1: field longer than 131,072 characters"]


def test_folder_catalog_reports_what_is_not_a_regular_file(tmp_path):
    import os

    make_image(tmp_path / "shoes" / "S1.jpg")
    make_image(tmp_path / "shoes" / "deeper" / "S2.jpg")  # folders are walked, not reported
    os.mkfifo(tmp_path / "shoes" / "pipe.jpg")
    (tmp_path / "bags").mkdir()
    os.symlink("/dev/zero", tmp_path / "bags" / "zero.png")
    os.symlink(tmp_path / "nowhere.png", tmp_path / "bags" / "broken.png")
    os.symlink(tmp_path / "shoes", tmp_path / "bags" / "linked")  # a link to a folder is not followed
    os.mkfifo(tmp_path / "shoes" / ".hidden.jpg")  # hidden entries stay ignored
    items, problems = finishes(lambda: read_catalog(tmp_path))
    assert [(i.product_id, i.category, i.where) for i in items] == [
        ("S1", "shoes", "shoes/S1.jpg"), ("S2", "shoes", "shoes/deeper/S2.jpg")]
    assert {p.where: p.reason for p in problems} == {
        "shoes/pipe.jpg": "not a regular file (a FIFO)",
        "bags/zero.png": "not a regular file (a character device)",
        "bags/broken.png": "broken symbolic link (its target is not found)",
        "bags/linked": "symbolic link to a folder (not followed)",
    }
