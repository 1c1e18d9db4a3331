"""Plain parts of `lookalike eval`: metrics, breakdown, category relevance, the baseline, query files."""

import io

import numpy as np
import pytest
from PIL import Image

from lookalike.quality.evaluation import (
    ColourHistogram,
    Outcome,
    Query,
    breakdown,
    category_precision,
    read_queries,
    retrieval_metrics,
)
from tests.conftest import finishes


def test_recall_and_mrr_count_misses_and_failures():
    m = retrieval_metrics([1, 3, None, 7, 1])
    assert m["queries"] == 5
    assert m["recall@1"] == pytest.approx(2 / 5) and m["recall@5"] == pytest.approx(3 / 5)
    assert m["recall@10"] == pytest.approx(4 / 5)
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 7 + 1) / 5)
    assert retrieval_metrics([])["recall@1"] is None


def test_outcome_rank():
    q = Query("q", "b", b"x")
    assert Outcome(q, ["a", "b"], [0.9, 0.8]).rank() == 2
    assert Outcome(q, ["a"], [0.9]).rank() is None
    assert Outcome(q, error="refused").rank() is None


def test_breakdown_groups_by_each_dimension():
    tags = [{"frame": "tall", "scale": "small"}, {"frame": "tall", "scale": "large"}, {"frame": "square", "scale": "large"}]
    out = breakdown(tags, [None, 1, 2])
    assert out["frame"]["tall"]["recall@1"] == 0.5 and out["frame"]["square"]["recall@1"] == 0.0
    assert out["scale"]["large"]["queries"] == 2 and "occlusion" not in out


def test_category_precision():
    categories = {"a1": "a", "a2": "a", "b1": "b"}
    result = category_precision([("a", ["a1", "b1", "a2"]), ("b", [])], categories, k=2)
    assert result == {"queries": 2, "precision@2": pytest.approx((0.5 + 0.0) / 2)}


def test_colour_histogram_ignores_the_white_packshot_background():
    hist = ColourHistogram()
    red = Image.new("RGB", (50, 50), (200, 20, 20))
    on_white = Image.new("RGB", (200, 200), (255, 255, 255))
    on_white.paste(red, (75, 75))
    assert float(hist(red) @ hist(on_white)) == pytest.approx(1.0)
    assert float(hist(red) @ hist(Image.new("RGB", (50, 50), (20, 20, 200)))) == pytest.approx(0.0)
    assert np.linalg.norm(hist(Image.new("RGB", (10, 10), (255, 255, 255)))) == pytest.approx(1.0)


def test_read_queries_keeps_unreadable_rows_as_failures(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    (tmp_path / "good.png").write_bytes(buffer.getvalue())
    (tmp_path / "q.csv").write_text("image,product_id\ngood.png,p1\nmissing.jpg,p2\n,p3\n")
    queries = read_queries(tmp_path / "q.csv")
    assert [q.product_id for q in queries] == ["p1", "p2", "p3"]
    assert queries[0].data == buffer.getvalue() and not queries[0].error
    assert queries[1].data is None and "cannot read" in queries[1].error
    assert queries[2].data is None and queries[2].error
    (tmp_path / "bad.csv").write_text("file,id\nx,y\n")
    with pytest.raises(ValueError, match="image,product_id"):
        read_queries(tmp_path / "bad.csv")


def test_thumbnails_from_bytes_or_files_never_fail_the_page(tmp_path):
    from lookalike.quality.report import figure, thumbnail_uri

    buffer = io.BytesIO()
    Image.new("RGBA", (300, 100), (255, 0, 0, 128)).save(buffer, format="PNG")
    (tmp_path / "a.png").write_bytes(buffer.getvalue())
    for source in (buffer.getvalue(), tmp_path / "a.png"):
        uri = thumbnail_uri(source, 150)
        assert uri is not None and uri.startswith("data:image/jpeg;base64,")
    assert thumbnail_uri(b"not an image") is None and thumbnail_uri(tmp_path / "missing.png") is None
    assert thumbnail_uri(None) is None
    assert figure(None, "x", "query") == '<figure class="query"><div class="missing">no image</div><figcaption>x</figcaption></figure>'


def test_read_queries_never_blocks_or_reads_what_is_not_a_small_regular_file(tmp_path):
    import os
    import tracemalloc

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    (tmp_path / "good.png").write_bytes(buffer.getvalue())
    os.mkfifo(tmp_path / "pipe.jpg")
    os.symlink("/dev/zero", tmp_path / "zero.jpg")
    with open(tmp_path / "huge.jpg", "wb"):
        pass
    os.truncate(tmp_path / "huge.jpg", 2**31)  # 2 GiB, sparse
    (tmp_path / "q.csv").write_text(
        "image,product_id\n"
        "pipe.jpg,p1\n"
        "zero.jpg,p2\n"
        "huge.jpg,p3\n"
        f"{'x' * 200_000}.jpg,p4\n"
        f"{tmp_path / 'good.png'},p5\n"  # absolute
        "photos,p6\n"
    )
    (tmp_path / "photos").mkdir()
    tracemalloc.start()
    try:
        queries = finishes(lambda: read_queries(tmp_path / "q.csv", 20 * 1024 * 1024))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [(q.product_id, q.error) for q in queries] == [
        ("p1", "cannot read: not a regular file (a FIFO)"),
        ("p2", "cannot read: not a regular file (a character device)"),
        ("p3", "cannot read: image too large: 2,147,483,648 bytes, the limit is 20,971,520 bytes"),
        ("", "cannot read: field longer than 131,072 characters"),
        ("p5", ""),
        ("p6", "cannot read: not a regular file (a directory)"),
    ]
    assert [q.name for q in queries] == ["q.csv:2 pipe.jpg", "q.csv:3 zero.jpg", "q.csv:4 huge.jpg", "q.csv:5",
                                         str(tmp_path / "good.png"), "q.csv:7 photos"]
    assert queries[4].data == buffer.getvalue() and all(q.data is None for q in queries if q.error)
    assert peak < 8 * 1024 * 1024  # nothing large was read (the 200,000-character line is the largest)
