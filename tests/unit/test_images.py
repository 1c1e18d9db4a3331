"""lookalike.serving.images: the one encode and the one composite over a background."""

import io

from PIL import Image

from lookalike.serving.images import encode, over_background


def test_transparent_pixels_go_over_the_background_and_rgb_stays_as_is():
    rgba = Image.new("RGBA", (4, 4), (200, 10, 10, 0))
    rgba.putpixel((0, 0), (200, 10, 10, 255))
    flat = over_background(rgba, (0, 0, 255))
    assert flat.mode == "RGB" and flat.getpixel((0, 0)) == (200, 10, 10) and flat.getpixel((1, 1)) == (0, 0, 255)
    rgb = Image.new("RGB", (4, 4), (1, 2, 3))
    assert over_background(rgb) is rgb
    palette = Image.new("P", (4, 4), 0)
    palette.info["transparency"] = 0
    assert over_background(palette).getpixel((0, 0)) == (255, 255, 255)
    assert over_background(Image.new("L", (2, 2), 7)).getpixel((0, 0)) == (7, 7, 7)


def test_encode_round_trips():
    image = Image.new("RGB", (8, 6), (9, 8, 7))
    with Image.open(io.BytesIO(encode(image, "PNG"))) as decoded:
        assert decoded.size == (8, 6) and decoded.convert("RGB").getpixel((3, 3)) == (9, 8, 7)
    assert encode(image).startswith(b"\xff\xd8")  # JPEG by default
