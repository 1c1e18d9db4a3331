"""lookalike.catalog: CSV and folder catalogs, bad rows reported and skipped."""

from pathlib import Path

from PIL import Image

from lookalike.catalog import read_catalog


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
        "A-1,img/b.png,shoes\n"        # duplicate id
        "\n"
    )
    items, problems = read_catalog(tmp_path / "catalog.csv")
    assert [(i.product_id, i.category) for i in items] == [("A-1", "shoes"), ("C-3", "bags"), ("B-2", "")]
    assert items[1].image == absolute
    reasons = {p.where: p.reason for p in problems}
    assert reasons == {
        "catalog.csv:5": "empty product id",
        "catalog.csv:6": f"image file not found: {tmp_path / 'img' / 'missing.png'}",
        "catalog.csv:7": "expected product_id,image[,category], got 1 fields",
        "catalog.csv:8": "duplicate product id 'A-1' (first at catalog.csv:2)",
    }


def test_csv_without_header(tmp_path):
    make_image(tmp_path / "x.png")
    (tmp_path / "c.csv").write_text("X,x.png,toys\n")
    items, problems = read_catalog(tmp_path / "c.csv")
    assert [i.product_id for i in items] == ["X"] and not problems


def test_folder_catalog(tmp_path):
    make_image(tmp_path / "shoes" / "S1.jpg")
    make_image(tmp_path / "bags" / "B1.png")
    make_image(tmp_path / "bags" / "S1.png")  # same stem as a shoe: duplicate id
    (tmp_path / "bags" / "notes.txt").write_text("hi")
    make_image(tmp_path / ".hidden" / "H.png")
    items, problems = read_catalog(tmp_path)
    # files are read in sorted order: bags/S1.png comes first, shoes/S1.jpg is the duplicate
    assert [(i.product_id, i.category) for i in items] == [("B1", "bags"), ("S1", "bags")]
    assert sorted(p.reason.split(" (")[0] for p in problems) == ["duplicate product id 'S1'", "not an image file name"]
