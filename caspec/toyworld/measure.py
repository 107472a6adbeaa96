"""Measuring the toy model with the exact attribute reader (issue 6's targets), through caspec's samplers.

* :func:`base_accuracy`: txt2img from "a <colour> <shape>" prompts; how often the reader agrees with the
  prompt on colour and on shape.
* :func:`sdedit_fidelity`: SDEdit (strength 0.86) of rendered scenes, changing one named attribute
  (colour, or shape); how often the edit shows, and how often the other attributes are kept (shape or
  colour, and the position within ``POSITION_TOL`` of the image width).

Both use the same sampling code as caspec's generate and edit steps (:mod:`caspec.models.sampling`).
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .data import TOY_SIZE, caption_parts, sample_toy_scene
from .reader import read
from .render import COLOR_NAMES, SHAPES, Obj, Scene, color_name, render

POSITION_TOL = 0.1
COLORS = tuple(name for name, _, _ in COLOR_NAMES)
# hue at the middle of each colour word's bin
HUE_OF = {name: (((lo + hi) / 2) if lo < hi else ((lo + hi + 1) / 2) % 1.0) for name, lo, hi in COLOR_NAMES}


def toy_pipe(weights: Path | None = None):
    """The toy pipeline: the shipped one, or one assembled from a weights folder (a training run's)."""
    from ..models.load import load_pipeline
    from ..spec.models import ModelSpec

    if weights is None:
        return load_pipeline(ModelSpec(base="toy", device="cpu"), Path.cwd())
    from ..models.toy import build_toy_folder

    folder = Path(tempfile.mkdtemp(prefix="caspec-toy-"))
    build_toy_folder(folder / "m", Path(weights))
    return load_pipeline(ModelSpec(base=str(folder / "m"), device="cpu"), folder, fresh=True)


def _safe_read(image):
    try:
        return read(image)
    except ValueError:
        return None


def base_accuracy(pipe, *, seeds: int = 4, steps: int = 50, guidance_scale: float = 7.5, seed: int = 0) -> dict[str, Any]:
    """Generate every colour x shape prompt with ``seeds`` seeds; rates of reader agreement."""
    from ..models.sampling import txt2img

    prompts, want = [], []
    for c in COLORS:
        for s in SHAPES:
            for k in range(seeds):
                prompts.append(f"a {c} {s}")
                want.append((c, s))
    seeds_list = [seed * 100_003 + i for i in range(len(prompts))]
    images = txt2img(pipe, prompts, seeds_list, steps=steps, guidance_scale=guidance_scale)
    rows = []
    for (c, s), img, p in zip(want, images, prompts):
        r = _safe_read(img)
        rows.append({"prompt": p, "color": r.color_name if r else None, "shape": r.shape if r else None,
                     "color_ok": bool(r and r.color_name == c), "shape_ok": bool(r and r.shape == s)})
    n = len(rows)
    return {
        "n": n, "steps": steps, "guidance_scale": guidance_scale,
        "color_accuracy": sum(r["color_ok"] for r in rows) / n,
        "shape_accuracy": sum(r["shape_ok"] for r in rows) / n,
        "shape_accuracy_by_shape": {s: float(np.mean([r["shape_ok"] for r, w in zip(rows, want) if w[1] == s]))
                                    for s in SHAPES},
        "color_accuracy_by_color": {c: float(np.mean([r["color_ok"] for r, w in zip(rows, want) if w[0] == c]))
                                    for c in COLORS},
        "rows": rows, "images": images,
    }


def _edit_target(scene: Scene, attribute: str, rng: np.random.Generator) -> tuple[str, str]:
    """(edit prompt, new value): a different colour word, or a different shape."""
    o = scene.objects[0]
    parts = caption_parts(scene)
    if attribute == "color":
        new = str(rng.choice([c for c in COLORS if c != parts["color"]]))
        return f"a {new} {o.shape}", new
    new = str(rng.choice([s for s in SHAPES if s != o.shape]))
    return f"a {parts['color']} {new}", new


def sdedit_fidelity(pipe, *, attribute: str = "color", n: int = 40, candidates: int = 2, seed: int = 1,
                    strength: float = 0.86, steps: int = 50, guidance_scale: float = 7.5) -> dict[str, Any]:
    """SDEdit ``n`` rendered scenes (``candidates`` seeds each) to a new colour or shape; reader rates."""
    from ..models.sampling import sdedit

    rng = np.random.default_rng(10_000 + seed)
    sources, prompts, news, scenes = [], [], [], []
    for _ in range(n):
        scene = sample_toy_scene(rng)
        prompt, new = _edit_target(scene, attribute, rng)
        for _c in range(candidates):
            scenes.append(scene)
            sources.append(render(scene))
            prompts.append(prompt)
            news.append(new)
    seeds_list = [seed * 100_003 + i for i in range(len(prompts))]
    images = sdedit(pipe, sources, prompts, seeds_list, strength=strength, steps=steps, guidance_scale=guidance_scale)
    rows = []
    for scene, img, prompt, new in zip(scenes, images, prompts, news):
        o = scene.objects[0]
        r = _safe_read(img)
        if r is None:
            rows.append({"prompt": prompt, "edit_ok": False, "kept": False, "position_error": None})
            continue
        err = math.hypot(r.x - o.x, r.y - o.y)
        if attribute == "color":
            edit_ok = r.color_name == new
            other_ok = r.shape == o.shape
        else:
            edit_ok = r.shape == new
            other_ok = r.color_name == color_name(o.hue, o.sat, o.val)
        rows.append({"prompt": prompt, "edit_ok": bool(edit_ok), "other_ok": bool(other_ok),
                     "position_ok": err <= POSITION_TOL, "kept": bool(other_ok and err <= POSITION_TOL),
                     "position_error": err})
    m = len(rows)
    errs = [r["position_error"] for r in rows if r["position_error"] is not None]
    return {
        "attribute": attribute, "n": m, "strength": strength, "steps": steps, "guidance_scale": guidance_scale,
        "edit_shown": sum(r["edit_ok"] for r in rows) / m,
        "others_kept": sum(r["kept"] for r in rows) / m,
        "position_kept": sum(bool(r.get("position_ok")) for r in rows) / m,
        "other_attribute_kept": sum(bool(r.get("other_ok")) for r in rows) / m,
        "both": sum(bool(r["edit_ok"] and r["kept"]) for r in rows) / m,
        "median_position_error": float(np.median(errs)) if errs else None,
        "rows": rows, "images": images, "sources": sources,
    }


def contact_sheet(images, columns: int = 10, scale: int = 2):
    """A grid of images (PIL), for looking at results."""
    from PIL import Image

    images = list(images)
    rows = max(1, math.ceil(len(images) / columns))
    w = TOY_SIZE * scale
    sheet = Image.new("RGB", (columns * w, rows * w), (255, 255, 255))
    for i, im in enumerate(images):
        sheet.paste(im.resize((w, w), Image.NEAREST), ((i % columns) * w, (i // columns) * w))
    return sheet


__all__ = ["toy_pipe", "base_accuracy", "sdedit_fidelity", "contact_sheet", "POSITION_TOL", "HUE_OF", "Obj"]
