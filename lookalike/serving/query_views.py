"""Query views: each shopper photo framed several ways, decoded once, all views embedded in one batch.

One framing cannot serve every photo. The centre crop keeps a product that fills the middle of a
phone photo and cuts off the edges of a tall frame; a zoomed crop finds a small product in a big
scene; the letterbox keeps the whole picture, which is what a screenshot of the shop's own packshot
(a near-duplicate) needs. `query_views` in the preprocessing file lists the framings, each as keys
over the query side's (`PreprocessConfig.for_side("query")`):

    {"name": "crop"}                                 the query side itself
    {"name": "zoom 60%", "zoom": 0.6}               the central 60 % of the crop, at full resolution
    {"name": "letterbox", "resize_mode": "letterbox"}

The photo is decoded once, at the resolution of its most demanding view, and each view is cut from
that picture. `product_search` then scores each product by its views (lookalike.serving.fusion). The model
`preprocess_query` (IMAGE -> EMBEDDING [V x D]) is this module plus one BLS call to `embedder`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from lookalike.serving.preprocessing import RESIZE_MODES, ImageLimits, PreprocessConfig, Preprocessor, decode, encoded, resize, stack_each

KEYS = ("name", "resize_mode", "resize_size", "zoom")
# The offline default embedder's query views (docs/quality.md, `make eval-candidates`): the centre
# crop and its central 60 %, fused by the best view. The best of the sets that keep at least half of the
# single-view throughput on 2 CPU cores; the crop + 60 % + letterbox set, mean of the two best views, scores
# higher on shopper photos and near-duplicates alike at about 0.4 of it (the set for GPU hosts).
DEFAULT_QUERY_VIEWS: tuple[dict[str, Any], ...] = ({"name": "crop"}, {"name": "zoom 60%", "zoom": 0.6})
DEFAULT_QUERY_FUSION = "max"
ZOOM_DECODE_SHARE = 0.75


@dataclass(frozen=True)
class QueryView:
    """A framing of the query photo: the query side's settings with these keys over them."""

    name: str = ""
    resize_mode: str | None = None  # None: the query side's
    resize_size: int | None = None  # crop mode: the shorter side before the crop; None: the query side's
    zoom: float = 1.0  # crop mode: keep the central `zoom` of the crop, i.e. resize to resize_size / zoom

    def __post_init__(self) -> None:
        if self.resize_mode is not None and self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"query view resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.resize_size is not None and not (isinstance(self.resize_size, int) and self.resize_size > 0):
            raise ValueError(f"query view resize_size must be a positive integer, got {self.resize_size!r}")
        if not 0.2 <= self.zoom <= 1.0:
            raise ValueError(f"query view zoom must be in 0.2..1, got {self.zoom!r}")
        if self.resize_mode == "letterbox" and self.zoom != 1.0:
            raise ValueError("query view zoom needs resize_mode crop (a letterbox keeps the whole picture)")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QueryView":
        if not isinstance(data, dict):
            raise ValueError(f"a query view is an object of {KEYS}, got {data!r}")
        unknown = set(data) - set(KEYS)
        if unknown:
            raise ValueError(f"unknown query view keys: {sorted(unknown)} (known: {', '.join(KEYS)})")
        return cls(**data)

    def config(self, query: PreprocessConfig) -> PreprocessConfig:
        """The query side's settings (`query`) framed as this view."""
        mode = self.resize_mode or query.resize_mode
        size = self.resize_size or query.resize_size
        if mode == "crop":
            size = size or max(query.height, query.width)
            size = int(round(size / self.zoom))
        elif self.zoom != 1.0:
            raise ValueError("query view zoom needs resize_mode crop (a letterbox keeps the whole picture)")
        return replace(query, resize_mode=mode, resize_size=size if mode == "crop" else query.resize_size)


def views_enabled(value: str) -> bool:
    """preprocess_query's `query_views` parameter: "on" (the preprocessing file's views) or "off" (the
    query side's framing alone: one embedding a photo, for CPU-bound servers)."""
    text = value.strip().lower()
    if text not in ("on", "off"):
        raise ValueError(f"parameter query_views must be on or off, got {value!r}")
    return text == "on"


def view_names(views: Sequence[QueryView]) -> list[str]:
    """Each view's name, or its position when it has none."""
    return [view.name or f"view {i}" for i, view in enumerate(views)]


def views_of(config: PreprocessConfig, enabled: bool = True) -> list[QueryView]:
    """The views a config's query side embeds: its `query_views`, or (none, or `enabled` false) the query
    side's own framing alone."""
    views = [QueryView.from_dict(v) for v in config.query_views] if enabled else []
    return views or [QueryView(name="query")]


class ViewPreprocessor:
    """Encoded photo -> float32 [V, 3, H, W], one row per view. Built once per model instance."""

    def __init__(self, config: PreprocessConfig, limits: ImageLimits | None = None, enabled: bool = True) -> None:
        query = config.for_side("query")
        self.views = views_of(config, enabled)
        self.fusion = config.query_fusion
        self.configs = [view.config(query) for view in self.views]
        self.preprocessors = [Preprocessor(c, limits) for c in self.configs]
        self.limits = self.preprocessors[0].limits
        # Decoded once, at what the most demanding view needs: a crop to the largest resize_size needs
        # more pixels than any other crop, and more than a letterbox (it scales by the shorter side). A
        # zoomed crop may upsample its region by up to 1 / ZOOM_DECODE_SHARE rather than have the JPEG
        # decoded at a finer DCT scale: a 45 % zoom otherwise decoded most phone photos in full.
        crops = [(v, c) for v, c in zip(self.views, self.configs) if c.resize_mode == "crop"]
        if crops:
            need = max(int(round((c.resize_size or 0) * max(v.zoom, ZOOM_DECODE_SHARE))) for v, c in crops)
            self.decode_config = replace(crops[0][1], resize_size=need)
        else:
            self.decode_config = self.configs[0]

    def __len__(self) -> int:
        return len(self.views)

    @property
    def names(self) -> list[str]:
        return view_names(self.views)

    def describe(self) -> str:
        """One line for the log: each view's name and framing."""
        framings = [f"{name} ({c.resize_mode}" + (f" {c.resize_size})" if c.resize_mode == "crop" else ")")
                    for name, c in zip(self.names, self.configs)]
        return f"{len(self)} query view(s): {', '.join(framings)}"

    def __call__(self, data: bytes) -> np.ndarray:
        """One encoded photo -> [V, 3, H, W]. Raises ImageError."""
        image = decode(encoded(data), self.decode_config, self.limits)
        return np.stack([p.normalise(resize(image, p.config) if view.zoom == 1.0 else zoomed_crop(image, p.config))
                         for view, p in zip(self.views, self.preprocessors)])

    def batch(self, items: Sequence[bytes]) -> np.ndarray:
        """N encoded photos -> [N, V, 3, H, W]. The first bad photo raises ImageError naming it."""
        return stack_each(items, (len(self), *self.preprocessors[0].output_shape), self)


def zoomed_crop(image: Image.Image, config: PreprocessConfig) -> Image.Image:
    """`resize(image, config)` for a crop, without resizing the whole picture first: only the region
    that the centre crop keeps is resampled, straight to (width, height). A zoomed view's resize_size is
    large (a 45 % zoom of a 256 crop resizes the shorter side to 569), which made resize-then-crop cost
    three times the decode; this gives the same picture within resampling at the crop's edges."""
    resample = Image.Resampling.BICUBIC if config.interpolation == "bicubic" else Image.Resampling.BILINEAR
    new_w, new_h = config.resized_size(*image.size)
    top = int(round((new_h - config.height) / 2.0))
    left = int(round((new_w - config.width) / 2.0))
    sx, sy = image.width / new_w, image.height / new_h
    box = (left * sx, top * sy, (left + config.width) * sx, (top + config.height) * sy)
    return image.resize((config.width, config.height), resample=resample, box=box)


class EmbedderUnavailableError(RuntimeError):
    """The embedder did not answer a BLS request of preprocess_query (unloaded, reloading, its stub gone,
    the server shutting down): UNAVAILABLE for the requests of that batch, which clients retry, as an
    ensemble step whose model is not there is answered."""


def embed_views(pixels: Sequence[np.ndarray], embed: Callable[[np.ndarray], np.ndarray], max_batch: int) -> list[np.ndarray]:
    """The views of several requests ([N_i, V, 3, H, W] each) embedded together, `max_batch` rows per
    `embed` call ([B, 3, H, W] -> [B, D]); returns [N_i, V * D] per request: each photo's V
    L2-normalised embeddings end to end, the EMBEDDING that product_search reads as V views."""
    if not pixels:
        return []
    rows = np.concatenate([p.reshape(-1, *p.shape[2:]) for p in pixels])
    parts = [np.asarray(embed(rows[start : start + max_batch])) for start in range(0, len(rows), max_batch)]
    embeddings = np.concatenate(parts).astype(np.float32, copy=False)
    if len(embeddings) != len(rows):
        raise RuntimeError(f"{len(embeddings)} embeddings for {len(rows)} views")
    out, start = [], 0
    for p in pixels:
        count = p.shape[0] * p.shape[1]
        out.append(embeddings[start : start + count].reshape(p.shape[0], -1))
        start += count
    return out
