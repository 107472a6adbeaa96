"""Exact attribute reader for rendered one-object toy-world images (pixel level, numpy only).

Steps: background colour = median of the border pixels; soft coverage ``alpha`` = RGB distance from
the background divided by the object's (interior) distance; colour = circular-mean hue / median sat and
val of the confidently-inside pixels; position = alpha-weighted centroid (every shape's centroid is its
centre); shape = best IoU against antialiased templates of each shape at the centroid, over a small
set of rotations, with the template radius derived from the measured area and that shape's area factor.
An object with a dark outline (the toy world's) is read by its fill: ``alpha`` is then the fill's
coverage (:func:`_outlined_fill`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .render import AREA_FACTOR, OUTLINE_RGB, SHAPES, SYMMETRY, color_name, shape_mask

MIN_DIST = 0.08          # RGB distance (0..sqrt(3)) below which a pixel counts as background
N_ROTATIONS = 12         # rotations tried per symmetry period
TEMPLATE_SUPERSAMPLE = 2
OUTLINE_DIST = 0.3          # RGB distance from OUTLINE_RGB below which a pixel is outline
OUTLINE_MIN_FRACTION = 0.05  # objects with at least this share of outline pixels are read as outlined
FILL_DIST = 0.35            # fill pixels are at least this far from the outline colour


@dataclass(frozen=True)
class Reading:
    shape: str
    hue: float
    sat: float
    val: float
    x: float
    y: float
    size: float
    color_name: str
    rotation: float = 0.0
    iou: float = 0.0


def _rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """Vectorised RGB (..., 3) in [0, 1] -> HSV (..., 3) with hue in [0, 1)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx = rgb.max(-1)
    mn = rgb.min(-1)
    d = mx - mn
    safe = np.where(d > 0, d, 1.0)
    h = np.where(mx == r, ((g - b) / safe) % 6.0, np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    h = np.where(d > 0, h / 6.0, 0.0) % 1.0
    s = np.where(mx > 0, d / np.where(mx > 0, mx, 1.0), 0.0)
    return np.stack([h, s, mx], axis=-1)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.maximum(a, b).sum()
    return float(np.minimum(a, b).sum() / union) if union > 0 else 0.0


def _outlined_fill(arr: np.ndarray, bg: np.ndarray, dist: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """Coverage of the fill of an object drawn with a dark outline (``Obj.outline``), or None if it has none.

    Each pixel is a mix of background B, outline O and fill F: ``p - B = a_f (F - B) + a_o (O - B)``,
    solved per pixel by least squares (F = median of the pixels far from both B and O).  The fill's
    coverage ``a_f`` then plays the part of ``alpha`` for an object without an outline.  ``dist``: each
    pixel's RGB distance from B.
    """
    outline = np.asarray(OUTLINE_RGB, dtype=np.float32)
    d_out = np.linalg.norm(arr - outline, axis=-1)
    if (d_out[mask] < OUTLINE_DIST).mean() < OUTLINE_MIN_FRACTION:
        return None
    fill = mask & (d_out > FILL_DIST) & (dist > 2 * MIN_DIST)
    if not fill.any():
        return None
    F = np.median(arr[fill], axis=0)
    basis = np.stack([F - bg, outline - bg], axis=1)  # (3, 2)
    coef, *_ = np.linalg.lstsq(basis, (arr - bg).reshape(-1, 3).T, rcond=None)
    a_f = np.clip(coef[0].reshape(arr.shape[:2]), 0.0, 1.0)
    a_f[~mask] = 0.0
    return a_f


def read(image) -> Reading:
    """Read shape, colour, position and size of the single object in ``image`` (PIL image or HxWx3 array)."""
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    else:
        arr = np.asarray(image, dtype=np.float32)
        if arr.max() > 1.0:
            arr = arr / 255.0
    H, W = arr.shape[:2]
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    bg = np.median(border, axis=0)
    dist = np.linalg.norm(arr - bg, axis=-1)
    mask = dist > MIN_DIST
    if not mask.any():
        raise ValueError("no object found: image is uniform")
    alpha = _outlined_fill(arr, bg, dist, mask)
    if alpha is None:
        # the object's own distance from the background: a high quantile of the distances inside the mask
        full = float(np.quantile(dist[mask], 0.9))
        alpha = np.clip(dist / max(full, 1e-6), 0.0, 1.0)
        alpha[~mask] = 0.0
    inside = alpha > 0.9

    hsv = _rgb_to_hsv(arr[inside] if inside.any() else arr[mask])
    ang = hsv[:, 0] * 2 * math.pi
    w = hsv[:, 1]  # weight hue by saturation: grey pixels carry no hue
    hue = (math.atan2(float((w * np.sin(ang)).sum()), float((w * np.cos(ang)).sum())) / (2 * math.pi)) % 1.0
    sat = float(np.median(hsv[:, 1]))
    val = float(np.median(hsv[:, 2]))

    total = float(alpha.sum())
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    cx = float((alpha * (xx + 0.5)).sum() / total)  # continuous coordinates: pixel i spans [i, i+1)
    cy = float((alpha * (yy + 0.5)).sum() / total)

    best = (-1.0, "circle", 0.0, 0.0)
    for shape in SHAPES:
        r = math.sqrt(total / AREA_FACTOR[shape])
        period = SYMMETRY[shape]
        rots = [0.0] if period == 0 else [period * k / N_ROTATIONS for k in range(N_ROTATIONS)]
        for rot in rots:
            t = shape_mask(shape, cx, cy, r, rot, W, H, supersample=TEMPLATE_SUPERSAMPLE)
            score = _iou(alpha, t)
            if score > best[0]:
                best = (score, shape, rot, r)
    score, shape, rot, r = best
    return Reading(shape=shape, hue=hue, sat=sat, val=val, x=cx / W, y=cy / H, size=2 * r / W,
                   color_name=color_name(hue, sat, val), rotation=rot, iou=score)
