"""Small Pillow helpers shared by the pipeline, the reports, the sample data and the tests."""

from __future__ import annotations

import io

from PIL import Image

WHITE = (255, 255, 255)


def encode(image: Image.Image, fmt: str = "JPEG", **params: object) -> bytes:
    """`image` encoded as `fmt` (Pillow's save parameters in `params`)."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def over_background(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """`image` as RGB, its transparent pixels composited over `background`. An RGB image without
    transparency is returned as itself (no copy): copy it if it must outlive its file."""
    if not has_alpha(image):
        return image if image.mode == "RGB" else image.convert("RGB")
    rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (*background, 255))
    canvas.alpha_composite(rgba)
    return canvas.convert("RGB")
