"""`lookalike query --html`: one self-contained page with thumbnails of each query and its results."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Sequence

from PIL import Image

from lookalike.serving.images import over_background
from lookalike.serving.index_files import Product


def thumbnail_uri(source: str | Path | bytes | None, size: int = 160) -> str | None:
    """A JPEG data URI of an image file or encoded bytes (first frame, transparency over white), or
    None when it cannot be read: a thumbnail never fails a page."""
    if not source:
        return None
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image.seek(0)
            canvas = over_background(image)
            canvas.thumbnail((size, size))
            buffer = io.BytesIO()
            canvas.save(buffer, format="JPEG", quality=85)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def figure(uri: str | None, caption: str, cls: str = "") -> str:
    img = f'<img src="{uri}" alt="">' if uri else '<div class="missing">no image</div>'
    attribute = f' class="{cls}"' if cls else ""
    return f"<figure{attribute}>{img}<figcaption>{caption}</figcaption></figure>"


def render(queries: Sequence[tuple[str, Sequence[tuple[int, str, float]] | str]], products: dict[str, Product]) -> str:
    """queries: (query image path, [(rank, product id, score)] or an error message)."""
    sections = []
    for query, results in queries:
        head = figure(thumbnail_uri(query), f"<b>query</b><br>{html.escape(Path(query).name)}")
        if isinstance(results, str):
            body = f'<p class="error">{html.escape(results)}</p>'
        else:
            cells = []
            for rank, product_id, score in results:
                product = products.get(product_id)
                caption = f"#{rank} {html.escape(product_id)}<br>{score:.3f}"
                if product and product.category:
                    caption += f" · {html.escape(product.category)}"
                cells.append(figure(thumbnail_uri(product.image if product else None), caption))
            body = "".join(cells) or "<p>no results (empty catalog?)</p>"
        sections.append(f'<section><div class="query">{head}</div><div class="results">{body}</div></section>')
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>lookalike results</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; }}
section {{ display: flex; gap: 1.5em; border-bottom: 1px solid #ddd; padding: 1em 0; }}
.results {{ display: flex; flex-wrap: wrap; gap: .6em; }}
figure {{ margin: 0; width: 160px; font-size: 12px; text-align: center; overflow-wrap: anywhere; }}
img {{ max-width: 160px; max-height: 160px; border: 1px solid #eee; }}
.query img {{ border: 2px solid #36c; }}
.error {{ color: #b00; }}
</style></head><body><h1>lookalike: similar products</h1>
{''.join(sections)}
</body></html>
"""
