"""A miniature, procedurally drawn "shapes world": scenes, a deterministic renderer, captions.

Geometry convention: every shape is described by its *circumradius* ``r = size * W / 2`` (``size`` is a
fraction of the image width), centred at ``(x * W, y * H)``.  So an object lies fully inside the image
whenever ``r <= x*W <= W - r`` (same for y), whatever its shape or rotation.  Every shape's area
centroid is its centre, which makes the centroid of a rendered mask an unbiased position estimate.

Only numpy and PIL are used; rendering is deterministic (same scene -> identical bytes).
"""
from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring")
TEXTURES: tuple[str, ...] = ("solid", "striped", "dotted")

# Hue bins (start, end) in [0, 1); "red" wraps around 0.
COLOR_NAMES: tuple[tuple[str, float, float], ...] = (
    ("red", 0.955, 0.040),
    ("orange", 0.040, 0.110),
    ("yellow", 0.110, 0.190),
    ("green", 0.190, 0.450),
    ("cyan", 0.450, 0.530),
    ("blue", 0.530, 0.720),
    ("purple", 0.720, 0.830),
    ("pink", 0.830, 0.955),
)
ACHROMATIC_NAMES: tuple[str, ...] = ("grey", "white", "black")
LOW_SAT = 0.25       # sat below this -> achromatic word
BLACK_VAL = 0.2      # val below this -> "black"
WHITE_VAL = 0.8      # achromatic with val above this -> "white"

OUTLINE_RGB = (0.05, 0.05, 0.05)  # colour of an object's outline stroke (``Obj.outline``)

SIZE_WORDS: tuple[tuple[str, float], ...] = (("small", 0.3), ("medium", 0.4), ("large", math.inf))

RING_INNER = 0.55    # inner radius of a ring, as a fraction of its outer radius
STAR_INNER = 0.45    # inner radius of a 5-point star, as a fraction of its outer radius

# Area of each shape divided by r**2 (r = circumradius).
AREA_FACTOR: dict[str, float] = {
    "circle": math.pi,
    "square": 2.0,
    "triangle": 3 * math.sqrt(3) / 4,
    "star": 10 * 0.5 * STAR_INNER * math.sin(math.pi / 5),  # 10 triangles of sides r, ri at 36 degrees
    "ring": math.pi * (1 - RING_INNER ** 2),
}

# Rotational symmetry period in degrees (0 = fully symmetric).
SYMMETRY: dict[str, float] = {"circle": 0.0, "square": 90.0, "triangle": 120.0, "star": 72.0, "ring": 0.0}


@dataclass(frozen=True)
class Obj:
    shape: str
    hue: float
    sat: float
    val: float
    size: float
    x: float
    y: float
    rotation: float = 0.0
    texture: str = "solid"
    outline: float = 0.0  # width in output pixels of a dark stroke drawn just outside the shape's edges

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.texture not in TEXTURES:
            raise ValueError(f"unknown texture {self.texture!r}; expected one of {TEXTURES}")


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: tuple[float, float, float]  # HSV
    size: int = 64


# ----------------------------------------------------------------------------------------------- geometry
def _polygon(n: int, cx: float, cy: float, r: float, rotation: float, inner: float | None = None):
    """Regular n-gon (or n-point star when ``inner`` is given), first vertex pointing up at rotation 0."""
    pts = []
    k = 2 * n if inner is not None else n
    for i in range(k):
        a = math.radians(rotation + i * 360.0 / k - 90.0)
        rr = r * (inner if (inner is not None and i % 2) else 1.0)
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def shape_mask(shape: str, cx: float, cy: float, r: float, rotation: float, width: int, height: int | None = None,
               supersample: int = 4, stroke: float = 0.0) -> np.ndarray:
    """Antialiased coverage mask in [0, 1], shape (height, width); cx, cy, r in output pixels.

    With ``stroke > 0``: instead of the shape, the coverage of a band of that width (output pixels) just
    outside its edges (for a ring, outside both of its edges: around it and inside its hole).
    """
    height = width if height is None else height
    s = supersample
    img = Image.new("L", (width * s, height * s), 0)
    d = ImageDraw.Draw(img)
    # pixel centres: output pixel i covers [i, i+1); hi-res pixel j covers [j/s, (j+1)/s)
    # PIL puts integer coordinates at pixel centres; shift so that continuous coordinate c maps to c*s.
    X, Y, R = cx * s - 0.5, cy * s - 0.5, r * s
    if shape in ("circle", "ring"):
        d.ellipse([X - R, Y - R, X + R, Y + R], fill=255)
        if shape == "ring":
            ri = R * RING_INNER
            d.ellipse([X - ri, Y - ri, X + ri, Y + ri], fill=0)
    else:
        pts = _shape_polygon(shape, X, Y, R, rotation)
        d.polygon(pts, fill=255)
    if stroke > 0:
        w = max(1, int(round(stroke * s)))
        band = Image.new("L", img.size, 0)
        b = ImageDraw.Draw(band)
        if shape in ("circle", "ring"):
            Ro = R + w  # PIL strokes inside the box: the band from R to R + w
            b.ellipse([X - Ro, Y - Ro, X + Ro, Y + Ro], outline=255, width=w)
            if shape == "ring":  # and from ri - w to ri, inside the hole
                ri = R * RING_INNER
                b.ellipse([X - ri, Y - ri, X + ri, Y + ri], outline=255, width=w)
        else:  # a line of twice the width centred on the edges, less the shape: the outer half
            b.line(pts + [pts[0], pts[1]], fill=255, width=2 * w, joint="curve")
        img = Image.fromarray(np.minimum(np.asarray(band), 255 - np.asarray(img)), "L")
    if s > 1:
        img = img.resize((width, height), Image.BOX)
    return np.asarray(img, dtype=np.float32) / 255.0


def _shape_polygon(shape: str, X: float, Y: float, R: float, rotation: float):
    if shape == "square":
        return _polygon(4, X, Y, R, rotation + 45.0)
    if shape == "triangle":
        return _polygon(3, X, Y, R, rotation)
    if shape == "star":
        return _polygon(5, X, Y, R, rotation, inner=STAR_INNER)
    raise ValueError(shape)  # pragma: no cover - Obj validates


def hsv_to_rgb(hsv) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(*hsv), dtype=np.float32)


def _texture(obj: Obj, W: int, s: int) -> np.ndarray:
    """Per-pixel value multiplier at hi-res (1 = base colour)."""
    n = W * s
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / s
    if obj.texture == "striped":
        period = W / 10.0
        a = math.radians(obj.rotation + 45.0)
        u = xx * math.cos(a) + yy * math.sin(a)
        return np.where((u % period) < period / 2, 1.0, 0.45).astype(np.float32)
    if obj.texture == "dotted":
        period = W / 8.0
        rad = W / 40.0
        dx = (xx % period) - period / 2
        dy = (yy % period) - period / 2
        return np.where(dx * dx + dy * dy < rad * rad, 0.4, 1.0).astype(np.float32)
    return np.ones((n, n), dtype=np.float32)


def render(scene: Scene, supersample: int = 4) -> Image.Image:
    """Draw the scene (objects in order, later on top) at ``supersample``x and box-downsample to RGB."""
    W = scene.size
    s = max(1, int(supersample))
    n = W * s
    canvas = np.empty((n, n, 3), dtype=np.float32)
    canvas[:] = hsv_to_rgb(scene.background)
    for o in scene.objects:
        alpha = shape_mask(o.shape, o.x * W * s, o.y * W * s, o.size * W * s / 2, o.rotation, n, supersample=1)
        rgb = hsv_to_rgb((o.hue % 1.0, o.sat, o.val))
        colour = rgb[None, None, :] * (_texture(o, W, s)[..., None] if o.texture != "solid" else 1.0)
        a = alpha[..., None]
        canvas = canvas * (1 - a) + colour * a
        if o.outline > 0:
            band = shape_mask(o.shape, o.x * W * s, o.y * W * s, o.size * W * s / 2, o.rotation, n,
                              supersample=1, stroke=o.outline * s)[..., None]
            canvas = canvas * (1 - band) + np.asarray(OUTLINE_RGB, dtype=np.float32) * band
    # box-downsample in float (exact average), then quantise once
    canvas = canvas.reshape(W, s, W, s, 3).mean(axis=(1, 3))
    arr = np.clip(np.rint(canvas * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


# ----------------------------------------------------------------------------------------------- sampling
def sample_scene(rng: np.random.Generator, *, n_objects: int = 1, size: int = 64,
                 textures: tuple[str, ...] = ("solid",), shapes: tuple[str, ...] = SHAPES) -> Scene:
    """A random scene: grey-ish background of random value, saturated objects fully inside the image."""
    bg = (float(rng.uniform(0, 1)), float(rng.uniform(0, 0.12)), float(rng.uniform(0.15, 0.9)))
    objs = []
    for _ in range(n_objects):
        sz = float(rng.uniform(0.2, 0.5))
        r = sz / 2
        margin = 2.0 / size  # two pixels of slack: PIL fills boundary pixels of sharp tips
        lo, hi = r + margin, 1 - r - margin
        objs.append(Obj(
            shape=str(shapes[int(rng.integers(len(shapes)))]),
            hue=float(rng.uniform(0, 1)),
            sat=float(rng.uniform(0.6, 1.0)),
            val=float(rng.uniform(0.6, 1.0)),
            size=sz,
            x=float(rng.uniform(lo, hi)),
            y=float(rng.uniform(lo, hi)),
            rotation=float(rng.uniform(0, 360)),
            texture=str(textures[int(rng.integers(len(textures)))]),
        ))
    return Scene(objects=tuple(objs), background=bg, size=size)


# ----------------------------------------------------------------------------------------------- words
def color_name(hue: float, sat: float, val: float) -> str:
    if val < BLACK_VAL:
        return "black"
    if sat < LOW_SAT:
        return "white" if val > WHITE_VAL else "grey"
    h = hue % 1.0
    for name, lo, hi in COLOR_NAMES:
        if (lo <= h < hi) if lo < hi else (h >= lo or h < hi):
            return name
    raise AssertionError(h)  # pragma: no cover - bins cover [0, 1)


def size_word(size: float) -> str:
    for word, hi in SIZE_WORDS:
        if size < hi:
            return word
    raise AssertionError(size)  # pragma: no cover


def position_word(x: float, y: float) -> str:
    col = "left" if x < 1 / 3 else ("right" if x > 2 / 3 else "center")
    row = "top" if y < 1 / 3 else ("bottom" if y > 2 / 3 else "middle")
    if col == "center" and row == "middle":
        return "in the center"
    if row == "middle":
        return f"at the {col}"
    if col == "center":
        return f"at the {row}"
    return f"at the {row} {col}"


def describe(o: Obj) -> str:
    words = ["a", size_word(o.size)]
    if o.texture != "solid":
        words.append(o.texture)
    words += [color_name(o.hue, o.sat, o.val), o.shape, position_word(o.x, o.y)]
    return " ".join(words)


def caption(scene: Scene) -> str:
    """E.g. ``"a large red circle at the left on a grey background"``; several objects joined by "and"."""
    bg = color_name(*scene.background)
    body = " and ".join(describe(o) for o in scene.objects) if scene.objects else "nothing"
    return f"{body} on a {bg} background"
