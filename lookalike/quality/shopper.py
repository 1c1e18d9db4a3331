"""Synthetic shopper photos of catalog packshots: how a phone photo of a product differs from its packshot.

A shopper photographs the product on a table, in a hand or on a shelf, or screenshots it in a chat:
the product is cut out of its white packshot, placed at some scale and position on a real photo
background, tilted (rotation and perspective), shadowed, partly covered by a finger or a price
sticker, relit, blurred, noised and JPEG-compressed, in a landscape, portrait, square, tall phone or
screenshot frame. Every photo is reproducible from (packshot, seed) and carries tags saying what was
done to it, so that evaluation can break recall down by scale, frame shape, occlusion and rotation.

Backgrounds are real photos that ship in packages (`background_photos`), never catalog images:
`exclude_lookalikes` drops any that looks like an image of the catalog being evaluated.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

from lookalike.serving.views import cutout

# Debian's mate-backgrounds (GPL-2+): real photos of wood, sand, plants, water.
MATE_NATURE = Path("/usr/share/backgrounds/mate/nature")

FRAMES: dict[str, tuple[int, int]] = {  # (width, height) of the photo
    "landscape": (1600, 1200),
    "portrait": (1200, 1600),
    "square": (1280, 1280),
    "tall": (886, 1920),  # a modern phone's 9:19.5 camera frame
    "screenshot": (1080, 2340),  # a chat app showing a photo of the product
}
# How much of the frame the product fills: max(width share, height share) of its bounding box.
SCALES: dict[str, tuple[float, float]] = {"small": (0.28, 0.5), "medium": (0.5, 0.7), "large": (0.7, 0.95)}
ROTATIONS: dict[str, tuple[float, float]] = {"upright": (0.0, 5.0), "tilted": (5.0, 15.0), "rotated": (15.0, 35.0)}
OCCLUSIONS = ("none", "finger", "sticker")
# The breakdown dimensions, in report order.
DIMENSIONS = ("frame", "scale", "occlusion", "rotation")


def scale_bucket(extent: float) -> str:
    return "small" if extent < 0.5 else ("medium" if extent < 0.7 else "large")


def rotation_bucket(angle: float) -> str:
    a = abs(angle)
    return "upright" if a < 5 else ("tilted" if a < 15 else "rotated")


@dataclass
class ShopperPhoto:
    image: Image.Image  # RGB
    tags: dict[str, str]  # one value per DIMENSIONS entry
    params: dict[str, float] = field(default_factory=dict)
    quality: int = 85

    def jpeg(self) -> bytes:
        buffer = io.BytesIO()
        self.image.save(buffer, format="JPEG", quality=self.quality)
        return buffer.getvalue()


# --- backgrounds --------------------------------------------------------------------------------

def background_photos() -> list[tuple[str, Image.Image]]:
    """(name, RGB image) of the real photos available as backgrounds: mate-backgrounds' nature photos
    when that Debian package is installed, and the photos that scikit-image, scikit-learn and
    matplotlib ship (lookalike.quality.sample_data.real_photos)."""
    from lookalike.quality.sample_data import real_photos

    photos: list[tuple[str, Image.Image]] = []
    if MATE_NATURE.is_dir():
        for path in sorted(MATE_NATURE.glob("*.jpg")):
            with Image.open(path) as image:
                image.draft("RGB", (image.width // 2, image.height // 2))
                photos.append((f"mate_{path.stem.lower()}", image.convert("RGB")))
    for name, image in real_photos():
        if min(image.size) >= 256 and _colourful(image):
            photos.append((name, image))
    return photos


def _colourful(image: Image.Image) -> bool:
    """Grey scientific images (cells, moon, text) make poor table tops; keep photos with colour."""
    small = np.asarray(image.resize((32, 32)), dtype=np.float32)
    return float(np.std(small - small.mean(axis=2, keepdims=True))) > 6.0


def signature(image: Image.Image) -> np.ndarray:
    """A 16x16 grey thumbnail, zero-mean and unit-norm: near-identical images have a dot product near 1."""
    grey = np.asarray(image.convert("L").resize((16, 16), Image.Resampling.BILINEAR), dtype=np.float32).ravel()
    grey -= grey.mean()
    return grey / (float(np.linalg.norm(grey)) + 1e-6)


def exclude_lookalikes(
    backgrounds: Sequence[tuple[str, Image.Image]], catalog_signatures: Sequence[np.ndarray], threshold: float = 0.9
) -> tuple[list[tuple[str, Image.Image]], list[str]]:
    """Drops backgrounds that look like a catalog image (`signature`s of the catalog's images): a query
    must never contain another product of the catalog. Returns (kept, names dropped)."""
    if not len(catalog_signatures):
        return list(backgrounds), []
    matrix = np.stack(list(catalog_signatures))
    kept, dropped = [], []
    for name, image in backgrounds:
        if float((matrix @ signature(image)).max()) >= threshold:
            dropped.append(name)
        else:
            kept.append((name, image))
    return kept, dropped


# --- geometry ----------------------------------------------------------------------------------------

def _perspective_coefficients(src: Sequence[tuple[float, float]], dst: Sequence[tuple[float, float]]) -> list[float]:
    """Coefficients for Image.transform(PERSPECTIVE) that map output points `dst` to input points `src`."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(dst, src):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    return np.linalg.solve(np.asarray(rows, dtype=np.float64), np.asarray(rhs, dtype=np.float64)).tolist()


def _tilt(product: Image.Image, rng: random.Random, strength: float) -> Image.Image:
    """A random perspective of the product (a photo taken slightly from the side or above)."""
    w, h = product.size
    pad = int(max(w, h) * strength) + 2
    out_w, out_h = w + 2 * pad, h + 2 * pad
    corners = [(0, 0), (w, 0), (w, h), (0, h)]
    moved = [(x + pad + rng.uniform(-1, 1) * w * strength, y + pad + rng.uniform(-1, 1) * h * strength) for x, y in corners]
    coefficients = _perspective_coefficients(corners, moved)
    tilted = product.transform((out_w, out_h), Image.Transform.PERSPECTIVE, coefficients, Image.Resampling.BICUBIC)
    box = tilted.getchannel("A").getbbox()
    return tilted.crop(box) if box else tilted


# --- occluders ------------------------------------------------------------------------------------

_SKIN = ((224, 172, 140), (198, 134, 100), (141, 85, 57), (240, 200, 170), (170, 110, 80))


def _finger(canvas: Image.Image, box: tuple[int, int, int, int], rng: random.Random) -> float:
    """A finger entering from below or a side and covering part of the product; returns the share of
    the product's box it covers."""
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    width = max(8, int(min(bw, bh) * rng.uniform(0.18, 0.3)))
    reach = rng.uniform(0.25, 0.5)
    side = rng.choice(("bottom", "left", "right"))
    if side == "bottom":
        cx = rng.uniform(x0 + 0.15 * bw, x1 - 0.15 * bw)
        shape = (cx - width / 2, y1 - reach * bh, cx + width / 2, canvas.height + width)
    elif side == "left":
        cy = rng.uniform(y0 + 0.3 * bh, y1 - 0.1 * bh)
        shape = (-width, cy - width / 2, x0 + reach * bw, cy + width / 2)
    else:
        cy = rng.uniform(y0 + 0.3 * bh, y1 - 0.1 * bh)
        shape = (x1 - reach * bw, cy - width / 2, canvas.width + width, cy + width / 2)
    skin = rng.choice(_SKIN)
    layer = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    draw.rounded_rectangle(shape, radius=width // 2, fill=(*skin, 255))
    nail = (shape[0] + width * 0.2, shape[1] + width * 0.1, shape[2] - width * 0.2, shape[1] + width * 0.7) \
        if side == "bottom" else None
    if nail is not None:
        draw.rounded_rectangle(nail, radius=width // 4, fill=(min(255, skin[0] + 20), min(255, skin[1] + 30), min(255, skin[2] + 30), 255))
    shadow = layer.getchannel("A").filter(ImageFilter.GaussianBlur(width / 5))
    dark = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    dark.putalpha(shadow.point(lambda a: int(a * 0.35)))
    canvas.alpha_composite(dark, (int(width / 8), int(width / 8)))
    canvas.alpha_composite(layer.filter(ImageFilter.GaussianBlur(1.2)))
    covered = max(0.0, min(shape[2], x1) - max(shape[0], x0)) * max(0.0, min(shape[3], y1) - max(shape[1], y0))
    return covered / max(1, bw * bh)


def _sticker(canvas: Image.Image, box: tuple[int, int, int, int], rng: random.Random) -> float:
    """A price sticker on the product; returns the share of the product's box it covers."""
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    w, h = int(bw * rng.uniform(0.25, 0.4)), int(bh * rng.uniform(0.12, 0.2))
    w, h = max(w, 12), max(h, 8)
    sx = int(rng.uniform(x0, max(x0 + 1, x1 - w)))
    sy = int(rng.uniform(y0 + 0.1 * bh, max(y0 + 0.1 * bh + 1, y1 - h)))
    colour = rng.choice(((255, 255, 255), (255, 230, 40), (250, 120, 30), (230, 40, 40)))
    layer = Image.new("RGBA", (w, h), (*colour, 255))
    draw = ImageDraw.Draw(layer)
    try:
        font: ImageFont.ImageFont | ImageFont.FreeTypeFont = ImageFont.load_default(size=max(8, int(h * 0.55)))
    except TypeError:  # Pillow without FreeType
        font = ImageFont.load_default()
    price = f"{rng.choice(('€', '$', '£'))}{rng.randint(1, 199)}.{rng.choice(('99', '49', '95', '00'))}"
    draw.text((w * 0.08, h * 0.18), price, fill=(20, 20, 20, 255), font=font)
    layer = layer.rotate(rng.uniform(-12, 12), expand=True, resample=Image.Resampling.BICUBIC)
    canvas.alpha_composite(layer, (sx, sy))
    return (w * h) / max(1, bw * bh)


# --- the whole photo -------------------------------------------------------------------------------

class ShopperSimulator:
    """`simulator(packshot, seed)` -> ShopperPhoto. Frames, scales, occlusions and rotations are drawn
    evenly from their buckets, so that every bucket of the breakdown is filled."""

    def __init__(self, backgrounds: Sequence[tuple[str, Image.Image]]) -> None:
        if not backgrounds:
            raise ValueError("no background photos: install mate-backgrounds, or pass photos")
        self.backgrounds = list(backgrounds)

    def _background(self, size: tuple[int, int], rng: random.Random) -> tuple[int, Image.Image]:
        which = rng.randrange(len(self.backgrounds))
        _, photo = self.backgrounds[which]
        w, h = size
        aspect = w / h
        pw, ph = photo.size
        share = rng.uniform(0.35, 1.0)
        cw = min(pw, int(min(pw, ph * aspect) * share))
        ch = max(1, int(cw / aspect))
        x, y = rng.randint(0, pw - cw), rng.randint(0, max(0, ph - ch))
        region = photo.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            region = region.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        region = region.resize(size, Image.Resampling.BILINEAR)
        if rng.random() < 0.6:  # the background out of focus
            region = region.filter(ImageFilter.GaussianBlur(rng.uniform(1.5, 6.0)))
        return which, region

    def photo(self, product: Image.Image, frame: str, size: tuple[int, int], rng: random.Random,
              scale: str, rotation: str, occlusion: str) -> tuple[Image.Image, tuple[int, int, int, int], dict]:
        """The product placed in a photo of `size`; returns the photo, the product's box and parameters."""
        params: dict[str, float] = {}
        background, canvas_rgb = self._background(size, rng)
        canvas = canvas_rgb.convert("RGBA")
        W, H = size
        lo, hi = ROTATIONS[rotation]
        angle = rng.choice((-1, 1)) * rng.uniform(lo, hi)
        tilt = rng.uniform(0.0, 0.1)
        shaped = _tilt(product, rng, tilt) if tilt > 0.01 else product
        shaped = shaped.rotate(angle, expand=True, resample=Image.Resampling.BICUBIC)
        box = shaped.getchannel("A").getbbox() or (0, 0, *shaped.size)
        shaped = shaped.crop(box)
        target = rng.uniform(*SCALES[scale])
        factor = target / max(shaped.width / W, shaped.height / H)
        shaped = shaped.resize((max(4, int(shaped.width * factor)), max(4, int(shaped.height * factor))), Image.Resampling.LANCZOS)
        pw, ph = shaped.size
        x = int((W - pw) / 2 + rng.uniform(-0.8, 0.8) * (W - pw) / 2)
        y = int((H - ph) / 2 + rng.uniform(-0.8, 0.8) * (H - ph) / 2)
        # a soft shadow under the product
        alpha = shaped.getchannel("A")
        radius = max(2.0, 0.02 * max(pw, ph))
        shadow = Image.new("RGBA", shaped.size, (0, 0, 0, 0))
        shadow.putalpha(alpha.point(lambda a: int(a * rng.uniform(0.25, 0.5))).filter(ImageFilter.GaussianBlur(radius)))
        canvas.alpha_composite(shadow, (int(x + radius), int(y + radius * 1.5)))
        canvas.alpha_composite(shaped, (x, y))
        product_box = (x, y, x + pw, y + ph)
        if occlusion == "finger":
            params["covered"] = _finger(canvas, product_box, rng)
        elif occlusion == "sticker":
            params["covered"] = _sticker(canvas, product_box, rng)
        params.update(angle=angle, tilt=tilt, extent=max(pw / W, ph / H))
        params["background"] = background
        return canvas.convert("RGB"), product_box, params

    def __call__(self, packshot: Image.Image, seed: int, *, frame: str | None = None, scale: str | None = None,
                 rotation: str | None = None, occlusion: str | None = None) -> ShopperPhoto:
        rng = random.Random(seed)
        frame = frame or rng.choice(tuple(FRAMES))
        scale = scale or rng.choice(tuple(SCALES))
        rotation = rotation or rng.choice(tuple(ROTATIONS))
        occlusion = occlusion or rng.choice(OCCLUSIONS)
        product = cutout(packshot)
        if frame == "screenshot":
            inner = rng.choice(("landscape", "square", "portrait"))
            photo, box, params = self.photo(product, inner, FRAMES[inner], rng, scale, rotation, occlusion)
            image, box = _screenshot(photo, box, rng)
        else:
            image, box, params = self.photo(product, frame, FRAMES[frame], rng, scale, rotation, occlusion)
        image = _camera(image, rng, screenshot=frame == "screenshot")
        W, H = image.size
        extent = max((box[2] - box[0]) / W, (box[3] - box[1]) / H)
        params["frame_extent"] = extent
        tags = {"frame": frame, "scale": scale_bucket(extent), "occlusion": occlusion,
                "rotation": rotation_bucket(params["angle"])}
        quality = rng.randint(55, 92)
        return ShopperPhoto(image, tags, params, quality)


def _screenshot(photo: Image.Image, box: tuple[int, int, int, int], rng: random.Random
                ) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """The photo shown in a chat app on a phone screen; returns the screenshot and the product's box in it."""
    W, H = FRAMES["screenshot"]
    dark = rng.random() < 0.3
    page = (18, 18, 20) if dark else (rng.randint(236, 255),) * 3
    bubble = (44, 44, 48) if dark else (229, 229, 234)
    ink = (220, 220, 220) if dark else (40, 40, 40)
    screen = Image.new("RGB", (W, H), page)
    draw = ImageDraw.Draw(screen)
    draw.rectangle((0, 0, W, 90), fill=page)
    draw.text((50, 30), f"{rng.randint(7, 23)}:{rng.randint(0, 59):02d}", fill=ink)
    header = (rng.randint(0, 80), rng.randint(90, 140), rng.randint(120, 220))
    draw.rectangle((0, 90, W, 230), fill=header)
    draw.ellipse((40, 120, 120, 200), fill=(200, 200, 200))
    draw.rectangle((150, 140, 150 + rng.randint(180, 420), 175), fill=(240, 240, 240))
    width = int(W * rng.uniform(0.6, 0.85))
    height = int(photo.height * width / photo.width)
    height = min(height, int(H * 0.55))
    width = int(photo.width * height / photo.height)
    left = 40 if rng.random() < 0.5 else W - 40 - width
    top = rng.randint(260, max(261, H - 330 - height))
    y = 260
    while y < H - 250:  # chat bubbles with lines of "text" around the photo
        if y + 140 > top and y < top + height + 30:
            y = top + height + 40
            continue
        lines = rng.randint(1, 3)
        bw = rng.randint(300, 900)
        bx = 40 if rng.random() < 0.5 else W - 40 - bw
        draw.rounded_rectangle((bx, y, bx + bw, y + 30 + 45 * lines), radius=28, fill=bubble)
        for line in range(lines):
            draw.rectangle((bx + 30, y + 28 + 45 * line, bx + 30 + rng.randint(bw // 3, bw - 60), y + 50 + 45 * line), fill=ink)
        y += 60 + 45 * lines
    draw.rounded_rectangle((left - 8, top - 8, left + width + 8, top + height + 8), radius=24, fill=bubble)
    shown = photo.resize((width, height), Image.Resampling.BILINEAR)
    screen.paste(shown, (left, top))
    draw.rectangle((0, H - 200, W, H), fill=page)
    draw.rounded_rectangle((40, H - 170, W - 160, H - 80), radius=45, fill=bubble)
    draw.ellipse((W - 140, H - 170, W - 50, H - 80), fill=header)
    factor = width / photo.width
    product_box = (int(left + box[0] * factor), int(top + box[1] * factor),
                   int(left + box[2] * factor), int(top + box[3] * factor))
    return screen, product_box


def _camera(image: Image.Image, rng: random.Random, *, screenshot: bool) -> Image.Image:
    """Light, white balance, vignetting, focus and sensor noise of a phone camera (a screenshot gets
    only a re-compression: it is pixels, not a photo)."""
    if screenshot:
        return image
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.75, 1.15))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.8, 1.1))
    array = np.asarray(image, dtype=np.float32)
    warmth = rng.uniform(-0.08, 0.08)
    array = array * np.asarray([1 + warmth, 1.0, 1 - warmth], dtype=np.float32)
    h, w = array.shape[:2]
    vignette = rng.uniform(0.0, 0.35)
    if vignette > 0.02:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        r = ((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2
        array *= (1 - vignette * np.clip(r / 2, 0, 1))[..., None]
    image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0)))
    sigma = rng.uniform(0.0, 8.0)
    if sigma > 0.5:
        noise = np.random.default_rng(rng.randint(0, 2**31)).normal(0, sigma, (h, w, 1)).astype(np.float32)
        array = np.asarray(image, dtype=np.float32) + noise
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
    return image
