"""Upload bytes -> an upright RGB image, refusing every bad upload with a reason (`ImageError`).

This is the hostile edge of the server: the bytes come from the network. Only the formats a shop uploads
are decoded (others are named and refused before any decoder runs); decoded pixels are bounded before
decoding (decompression bombs); a JPEG is decoded by libjpeg-turbo at a reduced DCT scale when it is much
larger than the embedder needs, strictly, so a truncated file is an error and never a half-grey image;
a PNG whose data stops before its last row (which Pillow would pad silently) is detected by counting its
inflated bytes. EXIF orientation is applied and transparency composed over the background colour.

The decode target (`PreprocessConfig` of `lookalike.serving.preprocessing`) says how large the image must
be and what the background is; the limits are server policy (`ImageLimits`, the preprocess models' config).
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import numpy as np
import simplejpeg
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError, features

from lookalike.serving.errors import RequestError
from lookalike.serving.images import over_background
from lookalike_client import contract as c

# A truncated file is an error, never a silently half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Formats a shop can upload. Everything else (EPS, PSD, PDF, ...) is refused before any decoder runs:
# fewer decoders reachable from the network, and no Ghostscript.
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF") + (
    ("AVIF",) if features.check("avif") else ()
)

# Magic numbers of formats we recognise but do not decode, to say "unsupported" rather than
# "not an image".
_KNOWN_UNSUPPORTED = (
    (b"8BPS", "PSD"),
    (b"%PDF", "PDF"),
    (b"%!PS", "PostScript"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"DDS ", "DDS"),
)
_FTYP_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"mif1": "HEIF", b"msf1": "HEIF", b"avif": "AVIF", b"avis": "AVIF"}

# EXIF orientation (1-8) -> the transpose that makes the image upright, as ImageOps.exif_transpose.
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION = 0x0112

# A JPEG's Pillow mode -> (simplejpeg colorspace, Pillow rawmode of those bytes). Pillow reads every
# CMYK/YCCK JPEG as Adobe's inverted CMYK ("CMYK;I"); unpacking libjpeg's CMYK the same way gives its pixels.
_JPEG_LAYOUT = {"RGB": ("RGB", "RGB"), "L": ("GRAY", "L"), "CMYK": ("CMYK", "CMYK;I")}

# PNG colour type -> samples per pixel (grey, RGB, palette, grey+alpha, RGBA).
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
# Adam7 passes: (x0, y0, dx, dy).
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
# Output bytes per inflate step while counting a PNG's pixel data: bounds the memory the check holds.
_INFLATE_STEP = 1 << 20



class DecodeTarget(Protocol):
    """What decoding needs to know of the preprocessing (`PreprocessConfig`)."""

    @property
    def draft_oversample(self) -> float: ...
    @property
    def background_rgb(self) -> tuple[int, int, int]: ...
    def resized_size(self, width: int, height: int) -> tuple[int, int]: ...


class ImageError(RequestError):
    """An upload that cannot be turned into pixels. `reason` is one of REASONS; str() is the message
    the client gets, "invalid image (REASON): MESSAGE" (the contract's, which the SDK parses)."""

    REASONS = c.IMAGE_ERROR_REASONS

    def __init__(self, reason: str, message: str) -> None:
        assert reason in self.REASONS, reason
        super().__init__(f"{c.INVALID_IMAGE} ({reason}): {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = c.MAX_IMAGE_BYTES  # encoded bytes per image
    max_pixels: int = 64_000_000  # decoded width * height (8000 x 8000), against decompression bombs

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> "ImageLimits":
        """From the `preprocess` model's config parameters (string values), as the model reads them."""
        return cls(max_bytes=int(params["max_image_bytes"]), max_pixels=int(params["max_image_pixels"]))


def _sniff_unsupported(data: bytes) -> str | None:
    head = data[:32]
    for magic, name in _KNOWN_UNSUPPORTED:
        if head.startswith(magic):
            return name
    if head[4:8] == b"ftyp":
        return _FTYP_BRANDS.get(head[8:12], "ISO media (HEIF/AVIF/MP4)")
    stripped = head.lstrip()
    if stripped.startswith(b"<svg") or (stripped.startswith(b"<?xml") and b"<svg" in data[:1024]):
        return "SVG"
    return None


def _truncation(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(word in text for word in ("truncated", "broken data stream", "premature end", "unexpected end"))


def lift_pillow_pixel_limit(max_pixels: int) -> None:
    """Makes sure Pillow's own decompression-bomb error never fires on an image our limit allows.

    Pillow refuses outright above 2 x Image.MAX_IMAGE_PIXELS (178,956,970 by default) and warns above
    1 x. Our limit (`ImageLimits.max_pixels`) is the documented, configurable one, so a larger
    configured limit must not be silently capped by Pillow. MAX_IMAGE_PIXELS is process-wide; this
    only ever raises it, and only as far as our limit, so Pillow's error stays as a backstop above it.
    """
    if Image.MAX_IMAGE_PIXELS is not None and 2 * Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def _too_many_pixels(limits: ImageLimits) -> ImageError:
    """Pillow's DecompressionBombError: it does not return the size, only that it is above 2 x
    Image.MAX_IMAGE_PIXELS, which `lift_pillow_pixel_limit` keeps at or above our limit."""
    return ImageError("too_large", f"image too large: more pixels than the limit of {limits.max_pixels:,}")


def open_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Identifies the image and checks its size from the header alone; nothing is decoded yet."""
    if not data:
        raise ImageError("empty", "empty image: the request carried 0 bytes")
    if len(data) > limits.max_bytes:
        raise ImageError(
            "too_large", f"image too large: {len(data):,} bytes, the limit is {limits.max_bytes:,} bytes"
        )
    lift_pillow_pixel_limit(limits.max_pixels)
    try:
        with warnings.catch_warnings():
            # Our own check below refuses with the size and our limit; Pillow's warning would quote its own.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError:
        raise _too_many_pixels(limits) from None
    except UnidentifiedImageError:
        name = _sniff_unsupported(data)
        if name:
            raise ImageError(
                "unsupported", f"unsupported image format {name}: send {', '.join(ALLOWED_FORMATS)}"
            ) from None
        raise ImageError("not_an_image", f"not an image: {len(data):,} bytes in no format this server reads") from None
    except Exception as exc:  # a header so broken that the plugin itself fails
        if _truncation(exc) or isinstance(exc, EOFError):
            raise ImageError("truncated", f"truncated image: {exc}") from None
        raise ImageError("not_an_image", f"not an image: {type(exc).__name__}: {exc}") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError("not_an_image", f"not an image: {width}x{height} pixels")
    if width * height > limits.max_pixels:
        raise ImageError(
            "too_large",
            f"image too large: {width}x{height} = {width * height:,} pixels, the limit is {limits.max_pixels:,}",
        )
    return image


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # 16-bit (and 32-bit) grayscale: Pillow's convert() clips to 0..255, which turns most of a
        # 16-bit image white. Scale to 8 bits instead.
        array = np.asarray(image, dtype=np.float64)
        if mode == "F" and array.size and float(array.max()) <= 1.0:
            array = array * 255.0
        elif mode != "F" and (mode.startswith("I;16") or (array.size and float(array.max()) > 255)):
            array = array / 257.0
        image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8))
        mode = "L"
    # L, 1, P, CMYK (Pillow inverts Adobe CMYK JPEGs), YCbCr, LAB, HSV: convert; alpha: over the background
    return over_background(image, background)


def _premature_end(exc: ValueError) -> str | None:
    """libjpeg's text for "the data ran out", or None for any other complaint.

    simplejpeg reports libjpeg's warnings only as their message text, so this is the one signal there
    is. The texts are libjpeg's jerror.h messages, unchanged for decades:
    JWRN_HIT_MARKER "Corrupt JPEG data: premature end of data segment" (a marker, e.g. an appended EOI,
    where entropy-coded data should be) and JWRN_JPEG_EOF "Premature end of JPEG file" (the bytes end).
    Every other warning ("N extraneous bytes before marker", ...) is a recoverable quirk.
    """
    text = str(exc)
    if "premature end" not in text.lower():
        return None
    text = text.removeprefix("Corrupt JPEG data: ")
    return text[:1].lower() + text[1:]


def _jpeg_pixels(
    data: bytes, header_size: tuple[int, int], size: tuple[int, int], colorspace: str
) -> np.ndarray | None:
    """Decodes a JPEG with libjpeg-turbo (simplejpeg) at the DCT scale that gives `size`, refusing
    data that ends early: libjpeg fills the missing blocks with grey and only warns, and Pillow swallows
    that warning. Returns None, for Pillow to decode instead, on any other complaint."""
    try:
        return simplejpeg.decode_jpeg(data, colorspace=colorspace, min_width=size[0], min_height=size[1], strict=True)
    except ValueError as exc:
        detail = _premature_end(exc)
        if detail is None:
            return None  # a quirk libjpeg recovers from (and simplejpeg refuses even with strict=False)
        width, height = header_size
        raise ImageError(
            "truncated", f"truncated image: the JPEG's data ends before its {width}x{height} pixels ({detail})"
        ) from None


def _exif_orientation(image: Image.Image) -> int:
    orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    return orientation if isinstance(orientation, int) else 1


def _draft(image: Image.Image, orientation: int, config: DecodeTarget) -> None:
    """Has Pillow decode straight at a reduced DCT scale when the JPEG is much larger than we need."""
    width, height = image.size
    upright = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    target = config.resized_size(*upright)
    scale = max(target[0] / upright[0], target[1] / upright[1]) * config.draft_oversample
    if scale < 1.0:
        image.draft("RGB" if image.mode == "RGB" else None, (int(width * scale) + 1, int(height * scale) + 1))


def _decode_jpeg(data: bytes, image: Image.Image, config: DecodeTarget) -> Image.Image:
    """Pillow reads the header and EXIF and picks the draft scale; libjpeg-turbo decodes, strictly."""
    header_size = image.size
    orientation = _exif_orientation(image)
    _draft(image, orientation, config)
    layout = _JPEG_LAYOUT.get(image.mode)
    # At the drafted size libjpeg-turbo picks the same DCT scale as Pillow, and its pixels are Pillow's,
    # bit for bit: the same library with the same IDCT and upsampling defaults.
    pixels = _jpeg_pixels(data, header_size, image.size, layout[0]) if layout else None
    if layout is None or pixels is None or pixels.shape[1::-1] != image.size:
        # A quirk simplejpeg will not decode (or, never seen, another mode or scale): Pillow decodes,
        # as it always did. Data that ends without an EOI marker it refuses itself.
        image.load()
        return ImageOps.exif_transpose(image)
    decoded = Image.frombytes(image.mode, image.size, pixels, "raw", layout[1])
    transpose = _EXIF_TRANSPOSE.get(orientation)  # the file's EXIF: `decoded` carries none
    return decoded.transpose(transpose) if transpose is not None else decoded


def _png_chunks(data: bytes) -> Iterator[tuple[bytes, memoryview]]:
    """(type, payload) of each chunk; a payload cut short by the end of the data is yielded as it is."""
    view = memoryview(data)
    offset = 8  # the signature, checked by Pillow already
    while offset + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, offset)
        yield kind, view[offset + 8 : offset + 8 + length]
        offset += 12 + length  # length, type, payload, CRC


def _png_filtered_size(
    width: int, height: int, bit_depth: int, colour_type: int, interlace: int
) -> int | None:
    """Bytes of filtered scanlines (a filter byte per row) a PNG's zlib stream must inflate to."""
    channels = _PNG_CHANNELS.get(colour_type)
    if channels is None:
        return None
    passes = _ADAM7 if interlace == 1 else ((0, 0, 1, 1),)
    total = 0
    for x0, y0, dx, dy in passes:
        pass_width, pass_height = (width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy
        if pass_width > 0 and pass_height > 0:  # an empty Adam7 pass has no rows, no filter bytes
            total += pass_height * (1 + (pass_width * channels * bit_depth + 7) // 8)
    return total


def _inflated_size(parts: Sequence[memoryview], needed: int) -> int:
    """Inflates the zlib stream split over `parts` and counts its bytes, stopping at `needed`; holds
    at most _INFLATE_STEP output bytes at a time. Raises zlib.error on a corrupt stream."""
    inflater = zlib.decompressobj()
    total = 0
    for part in parts:
        pending: bytes | memoryview = part
        while True:
            out = inflater.decompress(pending, _INFLATE_STEP)
            total += len(out)
            if total >= needed or inflater.eof:
                return total
            pending = inflater.unconsumed_tail
            if not pending and len(out) < _INFLATE_STEP:  # this part is used up, no output held back
                break
    return total


def _png_last_row_decoded(image: Image.Image) -> bool:
    """Whether Pillow's decode of a PNG provably reached the end of its pixels.

    Pillow writes rows in stream order into a zero-filled image, so a non-zero byte in the last row
    that the stream holds proves every row before it arrived too. That is the last row or, for Adam7,
    the last odd row (the 7th pass holds exactly the odd rows). An all-zero row (a black or
    transparent border) proves nothing.
    """
    width, height = image.size
    row = height - 1
    if image.info.get("interlace"):
        if height < 2:
            return False
        row -= height % 2
    pixels = image.crop((0, row, width, row + 1)).tobytes()
    return pixels.count(0) != len(pixels)


def _check_png_extent(data: bytes, decoded: Image.Image) -> None:
    """Refuses a PNG whose pixel data holds fewer rows than its header says.

    Pillow stops quietly when the zlib stream ends, leaving the missing rows black, so a complete zlib
    stream of 16 rows under a 4000x4000 header decodes as a black image. This runs after Pillow's
    decode because that decode usually proves the rows all came (`_png_last_row_decoded`), which costs
    microseconds; only otherwise is the stream inflated again and counted, at about 2/3 of Pillow's
    own decode time (zlib's inflate is most of a PNG decode).
    """
    if _png_last_row_decoded(decoded):
        return
    header: tuple[int, ...] | None = None
    idat: list[memoryview] = []
    for kind, payload in _png_chunks(data):
        if kind == b"IHDR" and len(payload) >= 13:
            header = struct.unpack_from(">IIBBBBB", payload)
        elif kind == b"IDAT":
            idat.append(payload)
        elif idat or kind == b"IEND":
            # IDATs are consecutive and Pillow reads only that first run (APNG's fdAT are later frames)
            break
    if header is None:
        return  # Pillow read a header; leave anything stranger to its decoder
    width, height, bit_depth, colour_type, _, _, interlace = header
    needed = _png_filtered_size(width, height, bit_depth, colour_type, interlace)
    if needed is None:
        return
    try:
        found = _inflated_size(idat, needed)
    except zlib.error as exc:
        raise ImageError("not_an_image", f"corrupt image: the PNG's compressed pixels are broken ({exc})") from None
    if found < needed:
        raise ImageError(
            "truncated",
            f"truncated image: the PNG's data holds {found:,} of the {needed:,} bytes"
            f" its {width}x{height} pixels need",
        )


def decode(data: bytes, config: DecodeTarget, limits: ImageLimits) -> Image.Image:
    """Bytes -> upright RGB image: first frame, EXIF orientation applied, transparency over white."""
    image = open_image(data, limits)
    try:
        if image.format in ("JPEG", "MPO"):  # MPO: a JPEG with more images after it (phones' depth maps)
            image = _decode_jpeg(data, image, config)
        else:
            image.load()  # first frame of an animation
            if image.format == "PNG":
                _check_png_extent(data, image)
            image = ImageOps.exif_transpose(image)
        return _to_rgb(image, config.background_rgb)
    except ImageError:
        raise
    except Image.DecompressionBombError:  # a later frame or tile larger than the header's size
        raise _too_many_pixels(limits) from None
    except MemoryError:
        raise ImageError("too_large", "image too large to decode in this server's memory") from None
    except Exception as exc:
        if _truncation(exc) or isinstance(exc, EOFError):
            raise ImageError("truncated", f"truncated image: {exc}") from None
        if isinstance(exc, (NotImplementedError, KeyError)) or "not supported" in str(exc).lower():
            raise ImageError("unsupported", f"unsupported image: {type(exc).__name__}: {exc}") from None
        raise ImageError("not_an_image", f"corrupt image: {type(exc).__name__}: {exc}") from None


