"""Small image helpers shared by the image-producing ops (PIL only; no torch).

``save_png`` writes an RGB PNG whose tEXt chunks carry the image's provenance (prompt, seed,
settings, step id, cache key, caspec version), so a file copied out of caspec still says where
it came from. PNG encoding with the same pixels and metadata gives the same bytes.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from PIL import Image, PngImagePlugin



def fit_square(image: Image.Image, size: int) -> Image.Image:
    """Center-crop ``image`` to a square, then resize it to ``size``² with LANCZOS (RGB)."""
    img = image.convert("RGB") if image.mode != "RGB" else image
    w, h = img.size
    if w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.LANCZOS)
    return img


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def pixel_digest(image: Image.Image) -> str:
    """Content digest of an image's decoded RGB pixels (not its file bytes, which carry metadata such as
    the step key). It identifies candidates in review manifests and seeds the edits made from an image,
    so a step whose key changes but whose pixels do not keeps its reviews and its downstream seeds."""
    img = image.convert("RGB") if image.mode != "RGB" else image
    h = hashlib.sha256(f"RGB:{img.width}x{img.height}:".encode())
    h.update(img.tobytes())
    return h.hexdigest()


def save_png(path: str | Path, image: Image.Image, meta: Mapping[str, Any]) -> Path:
    """Save ``image`` as an RGB PNG at ``path`` with ``meta`` in text chunks: strings as-is, other
    values as JSON, ``None`` values left out; text that Latin-1 cannot hold goes in an iTXt chunk
    (UTF-8). Nothing that changes when the pixels do not (a step key, caspec's version) belongs in ``meta``:
    downstream keys follow these bytes, so such a field would defeat early cutoff."""
    info = PngImagePlugin.PngInfo()
    items = dict(meta)
    for key, value in items.items():
        if value is None:
            continue
        text = _text(value)
        if _latin1(text):
            info.add_text(str(key), text)
        else:
            info.add_itxt(str(key), text)
    path = Path(path)
    img = image.convert("RGB") if image.mode != "RGB" else image
    img.save(path, format="PNG", pnginfo=info)
    return path


def _latin1(text: str) -> bool:
    try:
        text.encode("latin-1")
        return True
    except UnicodeEncodeError:
        return False


def read_png_meta(path: str | Path) -> dict[str, str]:
    """The text chunks of a PNG (as written by :func:`save_png`: values as text)."""
    with Image.open(path) as img:
        img.load()
        return {str(k): str(v) for k, v in (getattr(img, "text", {}) or {}).items()}


__all__ = ["fit_square", "save_png", "read_png_meta"]
