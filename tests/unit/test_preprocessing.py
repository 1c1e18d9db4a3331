"""lookalike.serving.preprocessing: formats, modes, limits, errors, and parity with the reference transforms."""

import dataclasses
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from lookalike.serving.preprocessing import (
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



def test_draft_oversample_picks_the_dct_scale_and_stays_close(photo):
    """draft_oversample 1 (the query side's) decodes a 12 MP JPEG at 1/8 of its size, 2 at 1/4; the
    pixels the embedder gets stay close to each other."""
    data = encode(photo.resize((4032, 3024), Image.Resampling.BICUBIC), "JPEG", quality=90)
    crop = PreprocessConfig(height=224, width=224, resize_mode="crop", interpolation="bilinear",
                            mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize_size=256)
    assert crop.draft_oversample == 2.0
    low = dataclasses.replace(crop, draft_oversample=1.0)
    assert decode(data, crop, ImageLimits()).size == (1008, 756)
    assert decode(data, low, ImageLimits()).size == (504, 378)  # still covers the 341 x 256 resize
    fine, coarse = Preprocessor(crop)(data), Preprocessor(low)(data)
    assert np.abs(fine - coarse).mean() < 0.03
    with pytest.raises(ValueError, match="draft_oversample"):
        dataclasses.replace(crop, draft_oversample=0.5)
    # a query-side override, as the exported preprocessing.json has it
    sides = dataclasses.replace(LETTERBOX, query={"resize_mode": "crop", "resize_size": 256, "draft_oversample": 1.0})
    assert sides.for_side("query").draft_oversample == 1.0 and sides.for_side("catalog").draft_oversample == 2.0


# -- errors ---------------------------------------------------------------------------------------
DEFAULT_LIMITS = ImageLimits()


def reason(data, limits=DEFAULT_LIMITS):
    with pytest.raises(ImageError) as info:
        Preprocessor(LETTERBOX, limits)(data)
    assert str(info.value) == f"invalid image ({info.value.reason}): {info.value.message}"  # the contract's form
    return info.value.reason, info.value.message


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


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height RGB pixels, with 1000 bytes of pixel data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = chunk(b"IDAT", zlib.compress(b"\x00" * 1000))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + pixels + chunk(b"IEND", b"")


PILLOWS_LIMITS = ("89,478,485", "89478485", "178,956,970", "178956970")


def test_decompression_bomb_is_refused_before_decoding():
    r, message = reason(png_header_only(30000, 30000))  # above Pillow's hard limit, 178,956,970 pixels
    assert r == "too_large" and "pixels" in message and "64,000,000" in message
    assert not any(limit in message for limit in PILLOWS_LIMITS), message


def test_too_many_pixels_quotes_our_limit_and_the_size():
    # between Pillow's warning (89,478,485) and error (178,956,970) thresholds
    r, message = reason(png_header_only(10000, 10000))
    assert (r, message) == ("too_large", "image too large: 10000x10000 = 100,000,000 pixels, the limit is 64,000,000")
    r, message = reason(png_header_only(2000, 2000), ImageLimits(max_pixels=1_000_000))
    assert (r, message) == ("too_large", "image too large: 2000x2000 = 4,000,000 pixels, the limit is 1,000,000")


def test_a_configured_pixel_limit_above_pillows_is_not_capped_by_pillow(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    limits = ImageLimits(max_pixels=400_000_000)
    # 20000x20000 is over Pillow's 178,956,970 but within ours: it gets as far as decoding, where its
    # 1000 bytes of pixel data are found short.
    assert reason(png_header_only(20000, 20000), limits)[0] == "truncated"
    r, message = reason(png_header_only(20001, 20000), limits)
    assert r == "too_large" and "the limit is 400,000,000" in message


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


# -- truncated JPEG: libjpeg fills missing data with grey, Pillow swallows the warning -------------
def jpeg_with_eoi_cut(data: bytes, fraction: float) -> bytes:
    """The first `fraction` of a JPEG, closed with an EOI marker as if it were whole."""
    return data[: int(len(data) * fraction)] + b"\xff\xd9"


def test_jpeg_header_larger_than_its_data(photo):
    data = encode(photo.crop((200, 150, 216, 166)), "JPEG", quality=90)
    sof = data.index(b"\xff\xc0")  # baseline frame header: FF C0, length, precision, height, width
    lying = data[: sof + 5] + struct.pack(">HH", 7900, 7900) + data[sof + 9 :]
    assert Image.open(io.BytesIO(lying)).size == (7900, 7900)
    r, message = reason(lying)
    assert r == "truncated"
    assert message == ("truncated image: the JPEG's data ends before its 7900x7900 pixels"
                       " (premature end of data segment)")


@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.8])
def test_jpeg_cut_and_closed_with_eoi_is_truncated(photo, fraction, progressive):
    data = encode(photo, "JPEG", quality=90, progressive=progressive)
    r, message = reason(jpeg_with_eoi_cut(data, fraction))
    assert r == "truncated" and "600x400" in message, message


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.8])
def test_cmyk_jpeg_cut_and_closed_with_eoi_is_truncated(photo, fraction):
    data = encode(photo.convert("CMYK"), "JPEG", quality=90)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    assert reason(jpeg_with_eoi_cut(data, fraction))[0] == "truncated"


def test_jpeg_without_its_end_marker_is_truncated(photo):  # as Pillow already said
    data = encode(photo, "JPEG", quality=90)
    r, message = reason(data[:-2])
    assert r == "truncated"
    assert message == "truncated image: the JPEG's data ends before its 600x400 pixels (premature end of JPEG file)"


def test_mpo_phone_photos_decode_as_their_primary_jpeg(photo):
    """Phones write MPO (a JPEG followed by more images, e.g. depth maps); Pillow calls it "MPO". It
    takes the JPEG path: drafted like any JPEG, and refused when cut short."""
    big = photo.resize((2400, 1600), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    big.save(buffer, "MPO", save_all=True, append_images=[photo], quality=90)
    mpo = buffer.getvalue()
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    jpeg = encode(big, "JPEG", quality=90)
    np.testing.assert_array_equal(np.asarray(decode(mpo, LETTERBOX, ImageLimits())),
                                  np.asarray(decode(jpeg, LETTERBOX, ImageLimits())))
    assert reason(jpeg_with_eoi_cut(mpo, 0.4))[0] == "truncated"


def test_jpeg_with_extraneous_bytes_before_a_marker_is_accepted(photo):
    # libjpeg warns "2 extraneous bytes before marker 0xdb" and simplejpeg refuses it even when not
    # strict; Pillow decodes it, so it falls back to Pillow.
    for image in (photo, photo.resize((2400, 1600), Image.Resampling.BICUBIC)):  # the second one drafted
        data = encode(image, "JPEG", quality=90)
        dqt = data.index(b"\xff\xdb")
        quirky = data[:dqt] + b"\x00\x00" + data[dqt:]
        clean = np.asarray(decode(data, LETTERBOX, ImageLimits()))
        np.testing.assert_array_equal(np.asarray(decode(quirky, LETTERBOX, ImageLimits())), clean)


def pillow_reference(data: bytes, config: PreprocessConfig) -> Image.Image:
    """What decode() did with Pillow alone: draft, load, exif_transpose, RGB (Pillow inverts CMYK)."""
    image = Image.open(io.BytesIO(data))
    width, height = image.size
    orientation = image.getexif().get(0x0112, 1)
    upright = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    target = config.resized_size(*upright)
    scale = max(target[0] / upright[0], target[1] / upright[1]) * 2.0
    if scale < 1.0:
        image.draft("RGB" if image.mode == "RGB" else None, (int(width * scale) + 1, int(height * scale) + 1))
    image.load()
    return ImageOps.exif_transpose(image).convert("RGB")


@pytest.mark.parametrize("big", [False, True], ids=["600x400", "2400x1600-drafted"])
@pytest.mark.parametrize("kind", ["420", "444", "gray", "cmyk"])
def test_jpeg_pixels_equal_pillows_for_every_orientation(photo, monkeypatch, kind, big):
    import simplejpeg

    calls = []
    real = simplejpeg.decode_jpeg
    monkeypatch.setattr(simplejpeg, "decode_jpeg", lambda *a, **k: calls.append(k) or real(*a, **k))
    image = photo.resize((2400, 1600), Image.Resampling.BICUBIC) if big else photo
    image = image.convert({"gray": "L", "cmyk": "CMYK"}.get(kind, "RGB"))
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = encode(image, "JPEG", quality=90, exif=exif, **({"subsampling": 0} if kind == "444" else {}))
        expected = pillow_reference(data, LETTERBOX)
        got = decode(data, LETTERBOX, ImageLimits())
        assert got.size == expected.size
        assert got.size[0] < 2400 if big else got.size in ((600, 400), (400, 600))  # drafted, or not
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected), err_msg=f"orientation {orientation}")
    assert len(calls) == 8  # decoded by simplejpeg, not by the fallback


# -- PNG whose zlib stream is complete but short: Pillow leaves the missing rows black --------------
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def pack_row(row: np.ndarray, bit_depth: int) -> bytes:
    if bit_depth == 16:
        return row.astype(">u2").tobytes()
    if bit_depth == 8:
        return row.astype(np.uint8).tobytes()
    per_byte = 8 // bit_depth
    flat = row.ravel().astype(np.uint8)
    flat = np.concatenate([flat, np.zeros(-flat.size % per_byte, np.uint8)]).reshape(-1, per_byte)
    shifts = (np.arange(per_byte - 1, -1, -1) * bit_depth).astype(np.uint8)
    return (flat << shifts).sum(axis=1).astype(np.uint8).tobytes()


def make_png(pixels: np.ndarray, colour_type: int, bit_depth: int = 8, interlace: int = 0,
             drop_rows: int = 0) -> bytes:
    """A PNG written by hand (filter 0, Adam7 when interlace), less its last `drop_rows` filtered rows,
    compressed as a complete zlib stream. Pillow accepts such a stream (it ends on a row boundary)
    and leaves the missing rows black; it refuses one that ends inside a row."""
    height, width = pixels.shape[:2]
    rows = []
    for x0, y0, dx, dy in ADAM7 if interlace else ((0, 0, 1, 1),):
        sub = pixels[y0::dy, x0::dx]
        if sub.shape[0] and sub.shape[1]:
            rows += [b"\x00" + pack_row(row, bit_depth) for row in sub]
    raw = b"".join(rows[: len(rows) - drop_rows])
    palette = chunk(b"PLTE", bytes(np.repeat(np.linspace(0, 255, 2**bit_depth).astype(np.uint8), 3)))
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, interlace))
    return (b"\x89PNG\r\n\x1a\n" + header + (palette if colour_type == 3 else b"")
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def photo_samples(photo: Image.Image, width: int, height: int, colour_type: int, bit_depth: int) -> np.ndarray:
    """Real photo pixels at the given size, channels and bit depth, the last two rows zero (black or
    transparent), so that the short-data check cannot tell from the decoded rows and must count."""
    rgb = np.asarray(photo.resize((width, height)), dtype=np.float64) / 255.0
    grey = rgb.mean(axis=2, keepdims=True)
    alpha = np.full_like(grey, 0.8)
    planes = {0: grey, 2: rgb, 3: grey, 4: np.concatenate([grey, alpha], 2), 6: np.concatenate([rgb, alpha], 2)}
    samples = np.rint(planes[colour_type] * (2**bit_depth - 1)).astype(np.uint16)
    samples[-2:] = 0
    return samples[..., 0] if PNG_CHANNELS[colour_type] == 1 else samples


PNG_KINDS = [(0, 1), (0, 2), (0, 4), (0, 8), (0, 16), (2, 8), (2, 16), (3, 1), (3, 2), (3, 4), (3, 8),
             (4, 8), (4, 16), (6, 8), (6, 16)]


@pytest.mark.parametrize("interlace", [0, 1], ids=["plain", "adam7"])
@pytest.mark.parametrize("colour_type,bit_depth", PNG_KINDS)
def test_png_every_kind_whole_is_accepted_and_short_is_truncated(photo, colour_type, bit_depth, interlace):
    for width, height in ((97, 61), (13, 6), (5, 3), (1, 2), (3, 1)):
        samples = photo_samples(photo, width, height, colour_type, bit_depth)
        whole = make_png(samples, colour_type, bit_depth, interlace)
        assert decode(whole, LETTERBOX, ImageLimits()).size == (width, height)
        # (Pillow refuses some of these itself, as "image file is truncated")
        assert reason(make_png(samples, colour_type, bit_depth, interlace, drop_rows=1))[0] == "truncated"


def test_png_with_16_of_4000_rows_is_truncated(photo):
    # IHDR 4000x4000 RGB, IDAT a complete zlib stream of 16 filtered rows of a photo, then IEND.
    rows = np.asarray(photo.resize((4000, 16)))
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 4000, 4000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    r, message = reason(data)
    assert r == "truncated"
    assert message == ("truncated image: the PNG's data holds 192,016 of the 48,004,000 bytes"
                       " its 4000x4000 pixels need")


@pytest.mark.parametrize("height", [400, 399])
def test_adam7_png_short_in_its_last_pass_is_truncated(photo, height):
    pixels = np.asarray(photo)[:height]
    whole = decode(make_png(pixels, 2, interlace=1), LETTERBOX, ImageLimits())
    np.testing.assert_array_equal(np.asarray(whole), pixels)
    # the 7th pass holds the odd rows, the last half of the data
    for drop_rows in (1, 50, height // 2):
        r, message = reason(make_png(pixels, 2, interlace=1, drop_rows=drop_rows))
        assert r == "truncated" and f"its 600x{height} pixels need" in message, message


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "I;16", "1"])
def test_pillow_written_png_with_black_or_transparent_bottom_is_accepted(photo, mode):
    # the decoded last row is all zero, so the data is counted: it must be found whole
    image = photo.copy()
    image.paste((0, 0, 0), (0, 380, 600, 400))
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257)
    elif mode == "RGBA":
        image = image.convert("RGBA")
        alpha = np.where(np.arange(400)[:, None] < 380, 255, 0).astype(np.uint8).repeat(600, axis=1)
        image.putalpha(Image.fromarray(alpha))  # the bottom 20 rows transparent black
    else:
        image = image.convert(mode)
    for data in (encode(image, "PNG"), encode(image, "PNG", optimize=True)):
        assert decode(data, LETTERBOX, ImageLimits()).size == (600, 400)
