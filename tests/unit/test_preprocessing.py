"""lookalike.preprocessing: formats, modes, limits, errors, and parity with the reference transforms."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from lookalike.preprocessing import (
    ImageError,
    ImageLimits,
    PreprocessConfig,
    Preprocessor,
    decode,
)
from tests.conftest import encode

LETTERBOX = PreprocessConfig(height=224, width=224, resize_mode="letterbox", interpolation="bilinear",
                             mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
CROP = PreprocessConfig(height=224, width=224, resize_mode="crop", resize_size=256, interpolation="bilinear",
                        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def unnormalise(chw: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """float CHW -> uint8-scale HWC, to compare pixels."""
    hwc = chw.transpose(1, 2, 0)
    return (hwc * np.array(config.std) + np.array(config.mean)) * 255.0


# -- parity with the reference transforms (torchvision) -------------------------------------------
def test_crop_mode_matches_torchvision_resize_centercrop(photo):
    from torchvision import transforms as T

    reference = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(224),
                           T.ToTensor(), T.Normalize(CROP.mean, CROP.std)])
    for image in (photo, photo.transpose(Image.Transpose.ROTATE_90), photo.crop((0, 0, 301, 233))):
        expected = reference(image).numpy()
        got = Preprocessor(CROP)(encode(image))
        assert got.shape == expected.shape == (3, 224, 224)
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_letterbox_matches_torchvision_resize_and_pad(photo):
    from torchvision.transforms import functional as F

    image = photo  # 600x400 -> 224x149, padded top and bottom with white
    resized = F.resize(image, [149, 224], interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    top = (224 - 149) // 2
    padded = F.pad(resized, [0, top, 0, 224 - 149 - top], fill=255)
    expected = F.normalize(F.to_tensor(padded), LETTERBOX.mean, LETTERBOX.std).numpy()
    got = Preprocessor(LETTERBOX)(encode(image))
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_letterbox_keeps_the_whole_image_and_pads_with_white():
    image = Image.new("RGB", (400, 100), (255, 0, 0))
    pixels = unnormalise(Preprocessor(LETTERBOX)(encode(image)), LETTERBOX)
    assert np.allclose(pixels[112, :], [255, 0, 0], atol=1)  # the band across the middle is all red
    assert np.allclose(pixels[0, :], 255, atol=1) and np.allclose(pixels[-1, :], 255, atol=1)  # pad rows


def test_config_round_trip(tmp_path):
    path = tmp_path / "preprocessing.json"
    LETTERBOX.save(path)
    assert PreprocessConfig.load(path) == LETTERBOX
    with pytest.raises(ValueError, match="resize_mode"):
        PreprocessConfig.from_dict({**LETTERBOX.to_dict(), "resize_mode": "stretch"})
    with pytest.raises(ValueError, match="unknown"):
        PreprocessConfig.from_dict({**LETTERBOX.to_dict(), "size": 3})


# -- formats and modes ----------------------------------------------------------------------------
def test_exif_orientation_is_applied():
    # A landscape image stored with orientation 6 (rotate 90 CW to display) is portrait upright.
    image = Image.new("RGB", (300, 100), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 30, 100))  # red on the stored left edge
    exif = Image.Exif()
    exif[0x0112] = 6
    upright = decode(encode(image, "JPEG", exif=exif, quality=95), LETTERBOX, ImageLimits())
    assert upright.size == (100, 300)
    top = np.asarray(upright)[:20].reshape(-1, 3).mean(axis=0)
    assert top[0] > 200 and top[2] < 60  # the red edge is now at the top


@pytest.mark.parametrize("mode", ["P", "L", "1", "CMYK", "RGB", "I;16", "I", "F", "YCbCr"])
def test_modes_become_rgb(photo, mode):
    if mode == "I;16":  # a real 16-bit image uses the full 0..65535 range
        image = Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257)
    elif mode in ("I", "F"):
        image = photo.convert("L").convert(mode)
    else:
        image = photo.convert(mode)
    fmt = {"CMYK": "JPEG", "YCbCr": "JPEG", "F": "TIFF", "I": "TIFF"}.get(mode, "PNG")
    out = decode(encode(image, fmt), LETTERBOX, ImageLimits())
    assert out.mode == "RGB" and out.size == photo.size
    assert 40 < np.asarray(out).mean() < 220  # not all black or all white


def test_16_bit_png_is_scaled_not_clipped():
    ramp = (np.arange(256 * 64, dtype=np.uint16).reshape(64, 256) * 4)  # 0..65532
    data = encode(Image.fromarray(ramp.astype(np.uint16)), "PNG")
    out = np.asarray(decode(data, LETTERBOX, ImageLimits()))[..., 0].astype(float)
    expected = np.rint(ramp / 257.0)
    assert np.abs(out - expected).max() <= 1  # a clipping convert would make 99% of it 255
    assert out.min() == 0 and out.max() == 255


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_over_white(mode):
    image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    image.paste((200, 30, 30, 255), (16, 16, 48, 48))
    if mode == "LA":
        image = image.convert("LA")
    elif mode == "P":
        image = image.convert("RGBA").quantize(colors=8, method=Image.Quantize.FASTOCTREE)
        image.info["transparency"] = image.getpixel((0, 0))
    data = encode(image, "PNG", transparency=image.info["transparency"]) if mode == "P" else encode(image, "PNG")
    out = np.asarray(decode(data, LETTERBOX, ImageLimits()))
    assert (out[0, 0] == 255).all()  # transparent corner -> white, not black
    assert out[32, 32].tolist() != [255, 255, 255]


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_first_frame_of_animation(fmt):
    frames = [Image.new("RGB", (64, 64), color) for color in ((250, 10, 10), (10, 250, 10), (10, 10, 250))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True)
    out = np.asarray(decode(buffer.getvalue(), LETTERBOX, ImageLimits())).reshape(-1, 3).mean(axis=0)
    assert out[0] > 200 and out[1] < 60 and out[2] < 60


def test_large_jpeg_draft_decoding_is_close_to_full_decode(photo):
    big = photo.resize((4800, 3200), Image.Resampling.BICUBIC)
    data = encode(big, "JPEG", quality=90)
    drafted = Image.open(io.BytesIO(data))
    drafted.draft("RGB", (600, 400))
    assert drafted.size[0] < 4800  # Pillow reduced the decode
    fast = Preprocessor(LETTERBOX)(data)
    full_image = Image.open(io.BytesIO(data)).convert("RGB")
    full = Preprocessor(LETTERBOX)(encode(full_image, "PNG"))
    cosine = float((fast * full).sum() / np.linalg.norm(fast) / np.linalg.norm(full))
    assert cosine > 0.999
    assert np.abs(fast - full).mean() < 0.02


# -- errors ---------------------------------------------------------------------------------------
def reason(data, limits=ImageLimits()):
    with pytest.raises(ImageError) as info:
        Preprocessor(LETTERBOX, limits)(data)
    return info.value.reason, str(info.value)


def test_empty():
    assert reason(b"") == ("empty", "empty image: the request carried 0 bytes")


def test_not_an_image():
    r, message = reason(b"hello, this is text and not a picture at all" * 10)
    assert r == "not_an_image" and "not an image" in message


def test_truncated(photo):
    data = encode(photo, "JPEG", quality=90)
    r, message = reason(data[: len(data) // 2])
    assert r == "truncated" and "truncated" in message
    png = encode(photo, "PNG")
    assert reason(png[: len(png) // 2])[0] == "truncated"


def test_too_many_bytes(photo):
    data = encode(photo, "PNG")
    r, message = reason(data, ImageLimits(max_bytes=1000))
    assert r == "too_large" and "limit is 1,000 bytes" in message


def test_decompression_bomb_is_refused_before_decoding():
    # A valid PNG header claiming 30000 x 30000 pixels, in a few hundred bytes.
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b"")
    r, message = reason(bomb)
    assert r == "too_large" and "pixels" in message


@pytest.mark.parametrize("data,name", [(b"8BPS\x00\x01" + b"\x00" * 100, "PSD"), (b"%PDF-1.4\n" + b"x" * 100, "PDF"),
                                       (b"\x00\x00\x00\x18ftypheic" + b"\x00" * 100, "HEIC"),
                                       (b"<svg xmlns='http://www.w3.org/2000/svg'></svg>", "SVG")])
def test_unsupported_formats_are_named(data, name):
    r, message = reason(data)
    assert r == "unsupported" and name in message


def test_wrong_type():
    with pytest.raises(ImageError, match="expected encoded image bytes"):
        Preprocessor(LETTERBOX)("not bytes")  # type: ignore[arg-type]


def test_batch_names_the_bad_image(photo):
    good = encode(photo, "JPEG")
    out = Preprocessor(LETTERBOX).batch([good, good])
    assert out.shape == (2, 3, 224, 224) and out.dtype == np.float32
    with pytest.raises(ImageError, match="image 1 of 3: empty"):
        Preprocessor(LETTERBOX).batch([good, b"", good])
