"""Query views (lookalike.serving.query_views), their fusion (lookalike.serving.fusion) and how product_search reads and
searches a query of several views, without Triton."""

import dataclasses

import numpy as np
import pytest

from lookalike.serving.fusion import depth, fuse
from lookalike.serving.index_files import Product
from lookalike.serving.preprocessing import ImageError, PreprocessConfig, Preprocessor
from lookalike.serving.product_search import SearchRequest, parse_request, search_requests
from lookalike.serving.query_views import QueryView, ViewPreprocessor, embed_views, views_enabled, views_of
from lookalike.serving.search import ProductIndex
from lookalike_client import contract as c
from tests.conftest import encode

BASE = PreprocessConfig(height=32, width=32, resize_mode="letterbox", interpolation="bilinear", mean=(0.5, 0.5, 0.5),
                        std=(0.5, 0.5, 0.5), query={"resize_mode": "crop", "resize_size": 36})
VIEWS = [{"name": "crop"}, {"name": "zoom 50%", "zoom": 0.5}, {"name": "letterbox", "resize_mode": "letterbox"}]


def tall_photo():
    """A tall picture: a red band at the top, a blue square in the middle, green at the bottom."""
    from PIL import Image

    image = Image.new("RGB", (60, 180), (0, 160, 0))
    image.paste((200, 0, 0), (0, 0, 60, 40))
    image.paste((0, 0, 220), (20, 80, 40, 100))
    return image


def test_each_view_is_the_query_side_framed_its_way_and_equals_a_preprocessor_of_those_settings():
    config = dataclasses.replace(BASE, query_views=VIEWS)
    views = ViewPreprocessor(config)
    assert views.names == ["crop", "zoom 50%", "letterbox"]
    assert [(v.resize_mode, v.resize_size) for v in views.configs[:2]] == [("crop", 36), ("crop", 72)]
    assert views.configs[2].resize_mode == "letterbox"
    assert views.decode_config.resize_size == 54  # the 50 % zoom (72) may upsample by 1 / 0.75: decoded for 54
    data = encode(tall_photo(), "PNG")
    pixels = views.batch([data, data])
    assert pixels.shape == (2, 3, 3, 32, 32)
    for v, settings in enumerate(views.configs):  # the pixels of a one-view preprocessor of that framing
        alone = Preprocessor(settings).batch([data])[0]
        if views.views[v].zoom == 1.0:
            np.testing.assert_allclose(pixels[0, v], alone, atol=1e-6)
        else:  # resampled once, straight from the decoded photo (zoomed_crop)
            assert np.abs(pixels[0, v] - alone).mean() < 0.02
    # the letterbox keeps the red top band, the crops do not; the zoomed crop is mostly the blue square
    red = lambda p: float(((p[0] > 0.3) & (p[1] < -0.5)).mean())  # noqa: E731
    assert red(pixels[0, 2]) > 0.05 and red(pixels[0, 0]) == 0.0
    blue = lambda p: float(((p[2] > 0.5) & (p[0] < -0.5)).mean())  # noqa: E731
    assert blue(pixels[0, 1]) > 2 * blue(pixels[0, 0])


def test_no_views_or_switched_off_is_the_query_side_alone():
    data = encode(tall_photo(), "JPEG")
    single = Preprocessor(BASE.for_side("query")).batch([data])[0]
    for views in (ViewPreprocessor(BASE), ViewPreprocessor(dataclasses.replace(BASE, query_views=VIEWS), enabled=False)):
        assert len(views) == 1
        np.testing.assert_allclose(views.batch([data])[0, 0], single, atol=1e-6)
    assert views_enabled("on") and not views_enabled(" OFF ")
    with pytest.raises(ValueError, match="on or off"):
        views_enabled("maybe")


def test_bad_views_are_refused_when_the_preprocessing_file_loads():
    for bad, match in (({"zoom": 0.1}, "zoom"), ({"resize_mode": "stretch"}, "resize_mode"), ({"tile": 2}, "unknown"),
                       ({"resize_mode": "letterbox", "zoom": 0.5}, "needs resize_mode crop")):
        with pytest.raises(ValueError, match=match):
            ViewPreprocessor(dataclasses.replace(BASE, query_views=[bad]))
    with pytest.raises(ValueError, match="query_fusion"):
        dataclasses.replace(BASE, query_fusion="vote")
    with pytest.raises(ValueError, match="cannot change"):
        dataclasses.replace(BASE, query={"query_views": VIEWS})
    assert views_of(BASE) == [QueryView(name="query")]


def test_a_bad_photo_fails_with_its_position():
    views = ViewPreprocessor(dataclasses.replace(BASE, query_views=VIEWS))
    with pytest.raises(ImageError, match="image 1 of 2: empty image"):
        views.batch([encode(tall_photo(), "PNG"), b""])


def test_embed_views_batches_every_view_of_every_request_and_splits_them_back():
    calls = []

    def embed(rows):  # a stand-in embedder: each row's mean pixel per channel, normalised
        calls.append(len(rows))
        vectors = rows.mean(axis=(2, 3)) + np.arange(3)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    rng = np.random.default_rng(0)
    pixels = [rng.normal(size=(2, 3, 3, 4, 4)).astype(np.float32), rng.normal(size=(1, 3, 3, 4, 4)).astype(np.float32)]
    out = embed_views(pixels, embed, max_batch=4)
    assert calls == [4, 4, 1]  # 9 views, 4 rows a call
    assert [o.shape for o in out] == [(2, 9), (1, 9)]
    np.testing.assert_allclose(out[1].reshape(3, 3), embed(pixels[1][0]), atol=1e-6)


def test_max_fusion_is_the_best_view_and_equals_searching_every_view_exhaustively():
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(60, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = ProductIndex.build([Product(f"p{i}") for i in range(30)], vectors, vectors=[2] * 30)
    views = rng.normal(size=(3, 8)).astype(np.float32)
    views /= np.linalg.norm(views, axis=1, keepdims=True)
    result = search_requests(index, [SearchRequest(views, 5, views=3)], "max")[0]
    assert not isinstance(result, Exception)
    best = (views @ vectors.T).max(axis=0).reshape(30, 2).max(axis=1)  # each product: its best (view, vector)
    order = np.argsort(-best)[:5]
    assert [pid.decode() for pid in result.product_ids[0]] == [f"p{i}" for i in order]
    np.testing.assert_allclose(result.scores[0], best[order], atol=1e-5)


def test_mean_of_two_best_views_rewards_products_two_views_agree_on():
    ids = [["a", "b", "c"], ["b", "c", "d"], ["e", "b", "c"]]
    scores = [np.array([0.9, 0.8, 0.4]), np.array([0.85, 0.8, 0.3]), np.array([0.95, 0.6, 0.5])]
    assert fuse(ids, scores, 3, "max")[0] == ["e", "a", "b"]
    fused, values = fuse(ids, scores, 3, "mean_top2")
    # b: 0.85 and 0.8; a: 0.9 and view 2's floor 0.5; e: 0.95 and view 0's floor 0.4 (upper bounds)
    assert fused == ["b", "a", "e"]
    np.testing.assert_allclose(values, [0.825, 0.7, 0.675])
    assert depth(10, 3, "max") == 10 and depth(10, 3, "mean_top2") == 20 and depth(10, 1, "mean_top2") == 10
    with pytest.raises(ValueError, match="fusion"):
        fuse(ids, scores, 3, "vote")


def test_product_search_reads_v_views_end_to_end_and_refuses_other_widths():
    rng = np.random.default_rng(2)
    views = rng.normal(size=(2, 3, 8)).astype(np.float32)
    views /= np.linalg.norm(views, axis=2, keepdims=True)
    request = parse_request({c.EMBEDDING: views.reshape(2, 24)}, dim=8)
    assert request.views == 3 and request.rows == 2 and request.embeddings is not None
    np.testing.assert_array_equal(request.embeddings, views.reshape(6, 8))
    assert parse_request({c.EMBEDDING: views[:, 0]}, dim=8).views == 1  # a single [N, D] query, as clients send
    for width in (12, 8 * 17):
        with pytest.raises(ValueError, match=r"\[N, V x 8\]"):
            parse_request({c.EMBEDDING: np.ones((1, width), np.float32)}, dim=8)
    bad = views.copy()
    bad[1, 2] *= 2
    with pytest.raises(ValueError, match="L2 norm"):
        parse_request({c.EMBEDDING: bad.reshape(2, 24)}, dim=8)


def test_a_zoomed_view_resamples_only_the_crop_and_matches_resize_then_crop():
    from PIL import Image

    from lookalike.serving.preprocessing import resize
    from lookalike.serving.query_views import zoomed_crop

    rng = np.random.default_rng(3)
    smooth = Image.fromarray(rng.integers(0, 255, (12, 9, 3), dtype=np.uint8)).resize((450, 600), Image.Resampling.BICUBIC)
    for zoom in (0.6, 0.45):
        settings = QueryView(zoom=zoom).config(dataclasses.replace(BASE, height=224, width=224,
                                                                   query={"resize_mode": "crop", "resize_size": 256}).for_side("query"))
        fast, slow = np.asarray(zoomed_crop(smooth, settings), np.float32), np.asarray(resize(smooth, settings), np.float32)
        assert fast.shape == slow.shape == (224, 224, 3)
        assert np.abs(fast - slow).mean() < 1.5  # grey levels: the same picture, resampled once


def test_an_embedder_that_does_not_answer_is_unavailable_for_the_batch_and_a_bad_photo_keeps_its_own_error():
    """preprocess_query's execute, without Triton: its requests parsed by the views, embedded together;
    an embedder BLS failure is UNAVAILABLE (clients retry), a bad photo is INVALID_ARG on its own."""
    from lookalike.serving.adapter import required, run_together
    from lookalike.serving.query_views import EmbedderUnavailableError

    views = ViewPreprocessor(dataclasses.replace(BASE, query_views=VIEWS))

    def gone(_rows):
        raise EmbedderUnavailableError("embedder: model is not ready")

    requests = [{c.IMAGE: np.array([[encode(tall_photo(), "PNG")]], dtype=object)},
                {c.IMAGE: np.array([[b"not an image"]], dtype=object)}]
    outcomes = run_together(requests, parse=lambda inputs: views.batch(required(inputs, c.IMAGE).reshape(-1).tolist()),
                            compute=lambda pixels: [{c.EMBEDDING: e} for e in embed_views(pixels, gone, 64)],
                            what="preprocess_query", refuse=(ImageError,), unavailable=(EmbedderUnavailableError,))
    assert outcomes[0].unavailable and "model is not ready" in (outcomes[0].error or "")
    assert outcomes[1].invalid and "not an image" in (outcomes[1].error or "")
