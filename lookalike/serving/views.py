"""Catalog views: the extra images of each product that `lookalike index` embeds beside its packshot.

A packshot shows the product large, upright and on white; a shopper's photo shows it smaller, tilted
and on something else. Each view cuts the product out of its packshot and renders it the way photos
differ: at `scale` of a square canvas, rotated by `rotate` degrees, on a plain `background`. The
index keeps all vectors of a product and a query scores the product by its best-matching one, so
queries cost nothing more. The views are data (`catalog_views` in the preprocessing file), chosen by
`lookalike eval` (docs/quality.md).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Sequence, cast

import numpy as np
from PIL import Image, ImageFilter

CANVAS = 448  # side of a rendered view; the catalog-side preprocessing then resizes it

# The offline default embedder's views (docs/quality.md): the product at 60 % on grey, dark
# and white, at 40 % on grey, tilted 20 degrees either way large on white and at 60 % on grey, and
# the packshot exactly as the query side frames a photo, which keeps packshots and close re-shots of
# them, sent as queries, finding themselves. Ten vectors per product.
DEFAULT_CATALOG_VIEWS: tuple[dict[str, Any], ...] = (
    {"scale": 0.6, "background": [128, 128, 128]},
    {"scale": 0.6, "background": [40, 40, 40]},
    {"scale": 0.6, "background": [255, 255, 255]},
    {"scale": 0.9, "background": [255, 255, 255], "rotate": 20.0},
    {"scale": 0.9, "background": [255, 255, 255], "rotate": -20.0},
    {"scale": 0.4, "background": [128, 128, 128]},
    {"scale": 0.6, "background": [128, 128, 128], "rotate": 20.0},
    {"scale": 0.6, "background": [128, 128, 128], "rotate": -20.0},
    {"as_query": True},
)


@dataclass(frozen=True)
class CatalogView:
    """The cut-out product at `scale` of the canvas, rotated by `rotate` degrees, on `background`; or,
    with `as_query`, the packshot's pixels exactly as the query side of the preprocessing frames a
    photo (a centre crop by default), so that a packshot or a close re-shot of it, sent as a query,
    meets itself."""

    scale: float = 1.0  # the product's longer side as a share of the canvas side
    background: tuple[int, int, int] = (255, 255, 255)
    rotate: float = 0.0  # degrees, counter-clockwise
    as_query: bool = False

    def __post_init__(self) -> None:
        if self.as_query and (self.scale, self.background, self.rotate) != (1.0, (255, 255, 255), 0.0):
            raise ValueError("an as_query catalog view takes no scale, background or rotate")
        if not 0.05 <= self.scale <= 1.0:
            raise ValueError(f"catalog view scale must be in 0.05..1, got {self.scale}")
        if len(self.background) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in self.background):
            raise ValueError(f"catalog view background must be 3 integers 0..255, got {self.background}")
        if not -180 <= self.rotate <= 180:
            raise ValueError(f"catalog view rotate must be in -180..180 degrees, got {self.rotate}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CatalogView":
        unknown = set(data) - {"scale", "background", "rotate", "as_query"}
        if unknown:
            raise ValueError(f"unknown catalog view keys: {sorted(unknown)}")
        values = dict(data)
        if "background" in values:
            values["background"] = tuple(values["background"])
        return cls(**values)


def cutout(packshot: Image.Image, white_tolerance: int = 24) -> Image.Image:
    """The product as RGBA, cropped to it: its alpha channel when it has one, else the pixels that are
    not the white packshot background connected to the border. A photo without a white border is
    the product as a whole (a poster, a print)."""
    from scipy import ndimage

    if packshot.mode in ("RGBA", "LA", "PA") or "transparency" in packshot.info:
        rgba = packshot.convert("RGBA")
        alpha = np.asarray(rgba)[..., 3]
        if (alpha > 16).mean() < 0.995:
            box = Image.fromarray(((alpha > 16) * 255).astype(np.uint8)).getbbox()
            return rgba.crop(box) if box else rgba
        packshot = rgba.convert("RGB")
    rgb = np.asarray(packshot.convert("RGB"), dtype=np.int16)
    near_white = (255 - rgb).max(axis=2) <= white_tolerance
    border = np.concatenate([near_white[0], near_white[-1], near_white[:, 0], near_white[:, -1]])
    if border.mean() < 0.9:  # not a packshot on white: the whole picture is the product
        return packshot.convert("RGBA")
    labels = cast(np.ndarray, ndimage.label(near_white)[0])  # type: ignore[index]
    edge = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))) - {0}
    background = np.isin(labels, list(edge))
    mask = ndimage.binary_dilation(~background, iterations=1)
    alpha = Image.fromarray((mask * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.8))
    rgba = packshot.convert("RGB").convert("RGBA")
    rgba.putalpha(alpha)
    box = Image.fromarray((mask * 255).astype(np.uint8)).getbbox()
    return rgba.crop(box) if box else rgba


def render(product: Image.Image, view: CatalogView, size: int = CANVAS) -> Image.Image:
    """The cut-out product (RGBA) rendered as `view` on a `size` x `size` RGB canvas."""
    shaped = product.rotate(view.rotate, expand=True, resample=Image.Resampling.BICUBIC) if view.rotate else product
    factor = view.scale * size / max(shaped.size)
    shaped = shaped.resize((max(1, round(shaped.width * factor)), max(1, round(shaped.height * factor))),
                           Image.Resampling.BILINEAR)
    canvas = Image.new("RGBA", (size, size), (*view.background, 255))
    canvas.alpha_composite(shaped, ((size - shaped.width) // 2, (size - shaped.height) // 2))
    return canvas.convert("RGB")


def view_images(packshot: Image.Image, views: Sequence[CatalogView], as_query: Image.Image | None = None,
                max_side: int = 1024) -> list[bytes]:
    """PNG bytes of each view of a decoded packshot (upright RGB, transparency over white is fine: a
    white packshot background is cut away either way). `as_query` is the packshot as the query side
    framed it (lookalike.serving.preprocessing.resize), needed when a view is `as_query`."""
    if not views:
        return []
    image = packshot.copy()
    image.thumbnail((max_side, max_side))
    product = cutout(image) if any(not view.as_query for view in views) else image
    out = []
    for view in views:
        if view.as_query and as_query is None:
            raise ValueError("an as_query view needs the packshot as the query side frames it")
        picture = as_query if view.as_query else render(product, view)
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG", compress_level=1)  # type: ignore[union-attr]
        out.append(buffer.getvalue())
    return out
