"""Encoded image bytes -> normalised float32 CHW pixels, exactly as the embedder was exported to expect.

The parameters (size, resize mode, interpolation, mean, std, padding) come from the preprocessing file
that the export step writes next to the embedder (`PreprocessConfig`); nothing here hard-codes them.
Safety limits (encoded bytes, decoded pixels) are server policy and come from the `preprocess` model's
config (`ImageLimits`).

Every way an upload can be bad raises `ImageError` with a `reason` and a message that names the
problem; the Triton model turns it into INVALID_ARG for that request alone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from lookalike.serving.decode import ImageError, ImageLimits, decode, lift_pillow_pixel_limit
from lookalike.serving.views import CatalogView, view_images

# How much larger than the resize target a JPEG is DCT-downscaled while decoding (Pillow's
# `reducing_gap`), unless a PreprocessConfig says otherwise (`draft_oversample`): >= 2 keeps the final
# antialiased resize close to a full decode.
DRAFT_OVERSAMPLE = 2.0

_INTERPOLATION = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
RESIZE_MODES = ("letterbox", "crop")
# Which photos a setting is for: catalog packshots (indexing, `embed_image`) or shopper photos (`visual_search`).
SIDES = ("catalog", "query")


@dataclass(frozen=True)
class PreprocessConfig:
    """How the embedder's input is made; written by export next to the embedder, read at model load.

    resize_mode "letterbox": scale the whole image to fit (height, width), pad the rest with pad_rgb.
    resize_mode "crop": scale the shorter side to resize_size, then centre-crop (height, width)
        (torchvision's Resize + CenterCrop).
    """

    height: int
    width: int
    resize_mode: str
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_size: int | None = None  # crop mode only
    pad_rgb: tuple[int, int, int] = (255, 255, 255)  # letterbox fill
    background_rgb: tuple[int, int, int] = (255, 255, 255)  # transparent pixels are composited over this
    # A large JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that leaves it this many times
    # the resize target; the resize then antialiases the rest. Lower is faster (decoding dominates a
    # phone photo's CPU time) and further from a full decode.
    draft_oversample: float = DRAFT_OVERSAMPLE
    # Shopper photos (`visual_search`) may need other settings than catalog packshots (`embed_image`,
    # `lookalike index`): keys here override the ones above on the query side (`for_side("query")`).
    # Only how the picture is framed may differ: size, mean and std are the embedder's.
    query: dict[str, Any] = field(default_factory=dict)
    # Extra images of each catalog product that indexing embeds beside its packshot (lookalike.serving.views):
    # [{"scale": 0.6, "background": [128, 128, 128], "rotate": 0}, ...]. Empty: the packshot alone.
    catalog_views: list[dict[str, Any]] = field(default_factory=list)
    # Each shopper photo is embedded several ways (lookalike.serving.query_views): [{"name": "crop"}, {"name":
    # "zoom 60%", "zoom": 0.6}, {"name": "letterbox", "resize_mode": "letterbox"}, ...], each framing
    # keys over the query side's. Empty: the query side's framing alone. `query_fusion` is how a
    # product's per-view scores make its score (lookalike.serving.fusion). Both are query side only: they stay
    # out of the embedder's fingerprint, so changing them never asks for a re-index.
    query_views: list[dict[str, Any]] = field(default_factory=list)
    query_fusion: str = "max"
    notes: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.interpolation not in _INTERPOLATION:
            raise ValueError(f"interpolation must be one of {tuple(_INTERPOLATION)}, got {self.interpolation!r}")
        if self.resize_mode == "crop" and not self.resize_size:
            raise ValueError("resize_mode 'crop' needs resize_size")
        if self.height <= 0 or self.width <= 0:
            raise ValueError("height and width must be positive")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need 3 values, std > 0")
        if not self.draft_oversample >= 1.0:
            raise ValueError(f"draft_oversample must be at least 1, got {self.draft_oversample!r}")
        self.views()  # validates them
        from lookalike.serving.fusion import FUSIONS
        from lookalike.serving.query_views import QueryView

        if self.query_fusion not in FUSIONS:
            raise ValueError(f"query_fusion must be one of {FUSIONS}, got {self.query_fusion!r}")
        for view in self.query_views:
            QueryView.from_dict(view)
        fixed = {"height", "width", "mean", "std", "query", "catalog_views", "query_views", "query_fusion",
                 "notes"} & set(self.query)
        if fixed:
            raise ValueError(f"query settings cannot change {sorted(fixed)}: they are the embedder's input")
        unknown = set(self.query) - set(self.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown query preprocessing keys: {sorted(unknown)}")
        if self.query:
            self.for_side("query")  # validates the query side too

    def views(self) -> list[CatalogView]:
        return [CatalogView.from_dict(view) for view in self.catalog_views]

    def render_views(self, data: bytes, limits: "ImageLimits") -> list[bytes]:
        """PNG bytes of the catalog views of one packshot (`catalog_views`), each to be embedded with
        the catalog-side settings like the packshot itself. Raises ImageError if it does not decode."""
        views = self.views()
        if not views:
            return []
        catalog, query = self.for_side("catalog"), self.for_side("query")
        framed = None
        if any(view.as_query for view in views):  # decoded as preprocess_query would, pixel for pixel
            framed = resize(decode(data, query, limits), query)
        return view_images(decode(data, catalog, limits), views, framed)

    def for_side(self, side: str) -> "PreprocessConfig":
        """The settings of one side: "catalog" (the top-level settings) or "query" (with `query` applied)."""
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        if side == "catalog" or not self.query:
            return replace(self, query={})
        values = {**self.query}
        for key in ("pad_rgb", "background_rgb"):
            if key in values:
                values[key] = tuple(values[key])
        return replace(self, query={}, **values)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PreprocessConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown preprocessing keys: {sorted(unknown)}")
        values = dict(data)
        for key in ("mean", "std", "pad_rgb", "background_rgb"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> "PreprocessConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("mean", "std", "pad_rgb", "background_rgb"):
            data[key] = list(data[key])
        return data

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(w, h) of the image after the resize step, before padding or cropping."""
        if self.resize_mode == "letterbox":
            scale = min(self.width / width, self.height / height)
            return max(1, round(width * scale)), max(1, round(height * scale))
        # torchvision.transforms.functional.resize with an int size: shorter side -> size, the longer
        # one truncated, not rounded.
        size = int(self.resize_size or 0)
        if width <= height:
            return size, int(size * height / width)
        return int(size * width / height), size


def resize(image: Image.Image, config: PreprocessConfig) -> Image.Image:
    """RGB image -> RGB image of exactly (config.width, config.height)."""
    resample = _INTERPOLATION[config.interpolation]
    new_w, new_h = config.resized_size(*image.size)
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), resample=resample)
    if config.resize_mode == "letterbox":
        if image.size == (config.width, config.height):
            return image
        canvas = Image.new("RGB", (config.width, config.height), tuple(config.pad_rgb))
        canvas.paste(image, ((config.width - new_w) // 2, (config.height - new_h) // 2))
        return canvas
    # torchvision CenterCrop: offsets rounded, so the crop matches the reference transform exactly.
    top = int(round((new_h - config.height) / 2.0))
    left = int(round((new_w - config.width) / 2.0))
    return image.crop((left, top, left + config.width, top + config.height))


class Preprocessor:
    """Turns encoded images into the embedder's input. Built once per model instance."""

    def __init__(self, config: PreprocessConfig, limits: ImageLimits | None = None) -> None:
        self.config = config
        self.limits = limits or ImageLimits()
        # A process-wide Pillow setting, raised (never lowered) so that a configured max_pixels above
        # Pillow's own hard limit is not silently capped by it.
        lift_pillow_pixel_limit(self.limits.max_pixels)
        std = np.asarray(config.std, dtype=np.float32)
        # (x / 255 - mean) / std == x * scale + offset, per channel
        self._scale = (1.0 / (255.0 * std)).reshape(1, 1, 3)
        self._offset = (-np.asarray(config.mean, dtype=np.float32) / std).reshape(1, 1, 3)

    @property
    def output_shape(self) -> tuple[int, int, int]:
        return (3, self.config.height, self.config.width)

    def normalise(self, image: Image.Image) -> np.ndarray:
        hwc = np.asarray(image, dtype=np.float32)
        return np.ascontiguousarray((hwc * self._scale + self._offset).transpose(2, 0, 1))

    def __call__(self, data: bytes) -> np.ndarray:
        """One encoded image -> float32 [3, H, W]. Raises ImageError."""
        return self.normalise(resize(decode(encoded(data), self.config, self.limits), self.config))

    def batch(self, items: Sequence[bytes]) -> np.ndarray:
        """N encoded images -> float32 [N, 3, H, W]. The first bad image raises ImageError naming it."""
        return stack_each(items, self.output_shape, self)


def encoded(data: object) -> bytes:
    """An upload's bytes; anything else (a number, a nested array) is not an image."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError("not_an_image", f"expected encoded image bytes, got {type(data).__name__}")
    return bytes(data)


def stack_each(items: Sequence[bytes], shape: tuple[int, ...], one: Callable[[bytes], np.ndarray]) -> np.ndarray:
    """`one` of each of N encoded images, float32 [N, *shape]. The first bad image raises ImageError
    naming its position (unless it is the only one)."""
    out = np.empty((len(items), *shape), dtype=np.float32)
    for i, data in enumerate(items):
        try:
            out[i] = one(data)
        except ImageError as exc:
            if len(items) == 1:
                raise
            raise ImageError(exc.reason, f"image {i} of {len(items)}: {exc.message}") from None
    return out
