"""Catalog views: validated data, rendered as the product smaller, tilted, on another background."""

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from lookalike.serving.preprocessing import PreprocessConfig
from lookalike.serving.views import CANVAS, DEFAULT_CATALOG_VIEWS, CatalogView, cutout, render, view_images


def packshot() -> Image.Image:
    image = Image.new("RGB", (400, 200), (255, 255, 255))
    ImageDraw.Draw(image).rectangle((100, 50, 299, 149), fill=(10, 200, 10))
    return image


def test_view_data_is_validated():
    assert CatalogView.from_dict({"scale": 0.6, "background": [1, 2, 3], "rotate": 20}) == CatalogView(0.6, (1, 2, 3), 20)
    for bad, message in (({"scale": 0}, "scale"), ({"scale": 0.5, "background": [300, 0, 0]}, "background"),
                         ({"scale": 0.5, "rotate": 400}, "rotate"), ({"scale": 0.5, "zoom": 2}, "unknown")):
        with pytest.raises(ValueError, match=message):
            CatalogView.from_dict(bad)
    assert [CatalogView.from_dict(v) for v in DEFAULT_CATALOG_VIEWS]
    assert CatalogView.from_dict({"as_query": True}) == CatalogView(as_query=True)
    with pytest.raises(ValueError, match="as_query"):
        CatalogView.from_dict({"as_query": True, "scale": 0.5})


def test_as_query_view_is_the_packshot_exactly_as_preprocess_query_frames_it():
    """Indexed with the catalog side, the as_query view gives the very pixels a query of the same
    packshot gets: the packshot sent as a query meets itself with cosine 1."""
    from lookalike.serving.preprocessing import ImageLimits, PreprocessConfig, Preprocessor

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 500, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    packshot = buffer.getvalue()
    config = PreprocessConfig(height=224, width=224, resize_mode="letterbox", interpolation="bilinear",
                              mean=(0.5,) * 3, std=(0.5,) * 3, query={"resize_mode": "crop", "resize_size": 256},
                              catalog_views=[{"scale": 0.6, "background": [128, 128, 128]}, {"as_query": True}])
    grey, framed = config.render_views(packshot, ImageLimits())
    with Image.open(io.BytesIO(grey)) as view:
        assert view.size == (CANVAS, CANVAS)
    indexed = Preprocessor(config.for_side("catalog"))(framed)
    queried = Preprocessor(config.for_side("query"))(packshot)
    np.testing.assert_array_equal(indexed, queried)
    with pytest.raises(ValueError, match="as_query"):
        view_images(image, [CatalogView(as_query=True)])


def test_render_places_the_product_at_its_scale_on_the_background():
    product = cutout(packshot())
    assert abs(product.width - 200) <= 2 and abs(product.height - 100) <= 2  # cropped to it (+ a 1 px edge)
    image = render(product, CatalogView(0.5, (128, 128, 128)))
    pixels = np.asarray(image).astype(int)
    assert image.size == (CANVAS, CANVAS)
    assert (pixels[0, 0] == 128).all() and (pixels[-1, -1] == 128).all()
    green = (pixels[..., 1] > 150) & (pixels[..., 0] < 80)
    ys, xs = np.nonzero(green)
    assert abs((xs.max() - xs.min() + 1) - CANVAS * 0.5) <= 3  # the longer side is half the canvas
    assert abs((xs.max() + xs.min()) / 2 - CANVAS / 2) <= 2  # centred
    tilted = np.asarray(render(product, CatalogView(0.9, (255, 255, 255), 30.0))).astype(int)
    tys, txs = np.nonzero((tilted[..., 1] > 150) & (tilted[..., 0] < 80))
    assert (tys.max() - tys.min()) > (ys.max() - ys.min()) * 1.3  # rotated: taller than the upright one


def test_view_images_are_pngs_one_per_view():
    views = [CatalogView.from_dict(v) for v in DEFAULT_CATALOG_VIEWS]
    framed = packshot().resize((224, 224))
    images = view_images(packshot(), views, framed)
    assert len(images) == len(views)
    for view, data in zip(views, images):
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "PNG"
            assert image.size == ((224, 224) if view.as_query else (CANVAS, CANVAS))
    assert view_images(packshot(), []) == []


def test_preprocessing_file_carries_query_side_and_catalog_views(tmp_path):
    base = PreprocessConfig(height=224, width=224, resize_mode="letterbox", interpolation="bilinear",
                            mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                            query={"resize_mode": "crop", "resize_size": 256},
                            catalog_views=[dict(v) for v in DEFAULT_CATALOG_VIEWS])
    base.save(tmp_path / "p.json")
    loaded = PreprocessConfig.load(tmp_path / "p.json")
    assert loaded == base and len(loaded.views()) == len(DEFAULT_CATALOG_VIEWS)
    query, catalog = loaded.for_side("query"), loaded.for_side("catalog")
    assert (query.resize_mode, query.resize_size, query.query) == ("crop", 256, {})
    assert (catalog.resize_mode, catalog.height, catalog.query) == ("letterbox", 224, {})
    assert query.height == catalog.height and query.mean == catalog.mean
    # a file without "query" serves the same settings on both sides
    plain = PreprocessConfig.from_dict({k: v for k, v in base.to_dict().items() if k != "query"})
    assert plain.for_side("query") == plain.for_side("catalog")
    with pytest.raises(ValueError, match="cannot change"):
        PreprocessConfig.from_dict({**base.to_dict(), "query": {"height": 256}})
    with pytest.raises(ValueError, match="unknown query"):
        PreprocessConfig.from_dict({**base.to_dict(), "query": {"zoom": 2}})
    with pytest.raises(ValueError, match="resize_size"):
        PreprocessConfig.from_dict({**base.to_dict(), "query": {"resize_mode": "crop", "resize_size": None}})
    with pytest.raises(ValueError, match="scale"):
        PreprocessConfig.from_dict({**base.to_dict(), "catalog_views": [{"scale": 3}]})
    with pytest.raises(ValueError, match="side"):
        loaded.for_side("shopper")
