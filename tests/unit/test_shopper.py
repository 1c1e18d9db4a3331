"""The shopper-photo simulator: reproducible, tagged truthfully, products cut out of their packshots,
and never a catalog image as a background."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from lookalike.quality.shopper import (
    DIMENSIONS,
    FRAMES,
    OCCLUSIONS,
    ROTATIONS,
    SCALES,
    ShopperSimulator,
    cutout,
    exclude_lookalikes,
    rotation_bucket,
    scale_bucket,
    signature,
)


def packshot(colour=(200, 30, 30), size=(300, 400)) -> Image.Image:
    """A red product with a white hole (a handle) on a white packshot background."""
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.rectangle((60, 80, 240, 330), fill=colour)
    draw.rectangle((130, 150, 170, 200), fill=(255, 255, 255))
    return image


def backgrounds():
    rng = np.random.default_rng(0)
    return [(f"bg{i}", Image.fromarray(rng.integers(0, 255, (600, 800, 3), dtype=np.uint8))) for i in range(3)]


def test_cutout_keeps_the_product_and_its_inner_white_but_not_the_packshot_background():
    product = cutout(packshot())
    assert product.mode == "RGBA"
    assert abs(product.width - 181) <= 3 and abs(product.height - 251) <= 3  # cropped to the product
    alpha = np.asarray(product.getchannel("A"))
    assert alpha[product.height // 2, product.width // 2 - 60] == 255
    # the white hole is enclosed by the product: it is part of it, not background
    assert alpha[(150 + 200) // 2 - 80, (130 + 170) // 2 - 60] == 255


def test_cutout_of_a_transparent_png_uses_its_alpha_and_a_full_photo_stays_whole():
    rgba = Image.new("RGBA", (200, 200), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).ellipse((50, 50, 150, 130), fill=(0, 0, 255, 255))
    assert cutout(rgba).size == (101, 81)
    photo = Image.fromarray(np.random.default_rng(1).integers(0, 200, (120, 160, 3), dtype=np.uint8))
    assert cutout(photo).size == (160, 120)


def test_same_seed_same_photo_other_seed_other_photo():
    sim = ShopperSimulator(backgrounds())
    a, b, c = sim(packshot(), seed=7), sim(packshot(), seed=7), sim(packshot(), seed=8)
    assert a.tags == b.tags and np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.jpeg() == b.jpeg()
    assert not (a.image.size == c.image.size and np.array_equal(np.asarray(a.image), np.asarray(c.image)))


@pytest.mark.parametrize("frame", list(FRAMES))
def test_tags_say_what_was_done(frame):
    sim = ShopperSimulator(backgrounds())
    for seed in range(3):
        photo = sim(packshot(), seed=seed, frame=frame, occlusion="sticker" if seed else "none")
        assert set(photo.tags) == set(DIMENSIONS)
        assert photo.tags["frame"] == frame and photo.image.size == FRAMES[frame]
        assert photo.tags["scale"] in SCALES and photo.tags["rotation"] in ROTATIONS
        assert photo.tags["occlusion"] in OCCLUSIONS
        assert photo.tags["scale"] == scale_bucket(photo.params["frame_extent"])
        assert photo.tags["rotation"] == rotation_bucket(photo.params["angle"])
        assert Image.open(__import__("io").BytesIO(photo.jpeg())).format == "JPEG"


def test_requested_scale_is_the_share_of_the_frame_the_product_fills():
    sim = ShopperSimulator(backgrounds())
    for scale, (lo, hi) in SCALES.items():
        photo = sim(packshot(), seed=3, frame="square", scale=scale, rotation="upright")
        assert lo - 0.02 <= photo.params["frame_extent"] <= hi + 0.02


def test_buckets():
    assert [scale_bucket(x) for x in (0.3, 0.5, 0.69, 0.7)] == ["small", "medium", "medium", "large"]
    assert [rotation_bucket(a) for a in (0, -4.9, 5, -14, 15, 30)] == ["upright", "upright", "tilted", "tilted", "rotated", "rotated"]


def test_backgrounds_that_look_like_catalog_images_are_dropped():
    bgs = backgrounds()
    catalog = [bgs[1][1].resize((400, 300)), packshot()]  # one background is (a resized copy of) a product
    kept, dropped = exclude_lookalikes(bgs, [signature(image) for image in catalog])
    assert dropped == ["bg1"] and [name for name, _ in kept] == ["bg0", "bg2"]
    assert exclude_lookalikes(bgs, [])[1] == []


def test_no_backgrounds_is_an_error():
    with pytest.raises(ValueError, match="background"):
        ShopperSimulator([])
