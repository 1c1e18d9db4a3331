"""The images a client may pass, turned into the encoded bytes the server takes.

bytes (sent as they are), a path, a binary file object, a `PIL.Image.Image` (encoded once, losslessly,
as PNG by Pillow: a Pillow user has it; the SDK does not need it) or a numpy HWC uint8 array (encoded as
PNG here, with zlib from the standard library, so Pillow stays optional).

A path is read only if it names a regular file of at most `max_bytes` (`lookalike_client.files`: never
a FIFO, a device or a directory, the size checked before reading); a file object is read up to
`max_bytes` + 1 bytes at most. Either is refused with `FileRefusedError` (an OSError) beyond that.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from typing import IO, Any, Union, cast

import numpy as np
import numpy.typing as npt

from . import contract as c
from .files import FileRefusedError, check_max_bytes, read_file

# What every method that takes an image accepts. PIL images are typed as Any (Pillow is optional).
ImageLike = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]", IO[bytes], "npt.NDArray[np.uint8]", Any]

# Pillow modes that PNG stores as they are; any other mode is converted to RGB (RGBA if it has alpha).
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"}
_PNG_COLOUR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> grey, grey+alpha, RGB, RGBA
PNG_COMPRESS_LEVEL = 1  # fast: the photo crosses a local network once, and is decoded on the server


def is_pil_image(image: object) -> bool:
    """Whether `image` is a Pillow image, without importing Pillow."""
    return any(cls.__module__.startswith("PIL.") and cls.__name__ == "Image" for cls in type(image).__mro__)


def pil_png(image: Any) -> bytes:
    """A Pillow image as lossless PNG bytes."""
    if image.mode not in _PNG_MODES:
        image = image.convert("RGBA" if "A" in image.mode or "a" in image.mode else "RGB")
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return out.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def array_png(array: npt.NDArray[Any]) -> bytes:
    """A numpy uint8 image, [H, W] or [H, W, C] with C = 1 (grey), 2 (grey+alpha), 3 (RGB) or 4 (RGBA),
    as lossless 8-bit PNG bytes (rows Sub-filtered, zlib-compressed)."""
    if array.dtype != np.uint8:
        raise TypeError(f"a numpy image must be uint8 HWC (0-255), got dtype {array.dtype}; "
                        "scale and convert it first, e.g. (x * 255).round().astype(np.uint8)")
    hwc = array[:, :, None] if array.ndim == 2 else array
    if hwc.ndim != 3 or hwc.shape[2] not in _PNG_COLOUR_TYPE:
        raise ValueError(f"a numpy image must be [H, W] or [H, W, C] with C in 1..4, got shape {list(array.shape)}")
    height, width, channels = hwc.shape
    if height == 0 or width == 0:
        raise ValueError(f"a numpy image must have pixels, got shape {list(array.shape)}")
    rows = np.ascontiguousarray(hwc).reshape(height, width * channels)
    filtered = np.empty((height, width * channels + 1), dtype=np.uint8)
    filtered[:, 0] = 1  # PNG filter type Sub: each byte minus the same channel's byte one pixel left
    filtered[:, 1 : 1 + channels] = rows[:, :channels]
    np.subtract(rows[:, channels:], rows[:, :-channels], out=filtered[:, 1 + channels :], dtype=np.uint8, casting="unsafe")
    header = struct.pack(">IIBBBBB", width, height, 8, _PNG_COLOUR_TYPE[channels], 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(filtered.tobytes(), PNG_COMPRESS_LEVEL)) + _chunk(b"IEND", b""))


def _read_stream(handle: Any, max_bytes: int) -> bytes:
    """At most `max_bytes` bytes of a binary file object; FileRefusedError("too_large") when it holds
    more (it is read up to `max_bytes` + 1 bytes, never further)."""
    chunks: list[bytes] = []
    total = 0
    while total <= max_bytes:
        data: object = handle.read(max_bytes + 1 - total)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"a file object must be opened in binary mode ('rb'), got {type(data).__name__} from read()")
        chunk = bytes(cast("bytes", data))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    if total > max_bytes:
        name: object = getattr(handle, "name", None)
        raise FileRefusedError(str(name) if name is not None else f"a {type(handle).__name__}", "too_large",
                               f"image too large: more than the limit of {max_bytes:,} bytes")
    return b"".join(chunks)


def read_image_bytes(image: ImageLike, max_bytes: int = c.MAX_IMAGE_BYTES) -> bytes:
    """The encoded bytes of one image: bytes as they are, a file's contents, or a PIL image / numpy
    array encoded as PNG. No decoding happens here: the server checks the bytes. A path must name a
    regular file of at most `max_bytes` bytes, a file object must end within them: else
    FileRefusedError (an OSError; its `kind` says why: "missing", "not_regular", "too_large",
    "name_too_long" or "unreadable")."""
    value: Any = image
    if type(value) is bytes:  # the common case, not copied (bytes are immutable)
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(cast("bytes", value))
    check_max_bytes(max_bytes)
    if isinstance(value, (str, os.PathLike)):
        return read_file(os.fsdecode(cast(str, value)), max_bytes)
    if isinstance(value, np.ndarray):
        return array_png(cast("npt.NDArray[Any]", value))
    if is_pil_image(value):
        return pil_png(value)
    if hasattr(value, "read"):
        return _read_stream(value, max_bytes)
    raise TypeError("expected bytes, a path, a binary file, a PIL image or a numpy uint8 HWC array, "
                    f"got {type(value).__name__}")
