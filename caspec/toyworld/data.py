"""The toy model's training distribution: which scenes the toy models see, and how they are captioned.

One solid object with a dark outline (``OUTLINE_PX`` wide, just outside its edges) on a plain grey
background at 32x32: five shapes, any hue, vivid saturation and value, sizes from a third to three fifths
of the image, anywhere inside it, upright (``upright=False``: any rotation; the toy VAE is trained on that
wider set, the UNet, text encoder and CLIP on upright shapes: a model this small averages a square over its
rotations into a blob, measured 6% squares recognised).  Captions use the coarse words of
:func:`caspec.toyworld.render.describe`; during training parts of a caption are dropped at random
(:func:`training_caption`) so that short prompts ("a red circle") work as well as full ones, and an empty
caption is the unconditional prompt for classifier-free guidance.

Why the outline: in a world of flat colour on grey, the only trace of *where* an object is, is its colour.
SDEdit to a far hue (red -> cyan) then sees the old object as evidence *against* the new one at that place,
and the denoiser moves it: with flat shapes the toy kept the position in 100% of colour edits between hues
less than 0.15 apart but in 27% beyond 0.3.  Real images keep their layout in edges and shading that do
not change with colour; the outline is that colour-independent trace here.  Measured on the VAE latents
(whether keeping the place is the nearer explanation of a noisy recoloured object): 61% without outline,
96% with 1.5 px.

numpy + PIL only, deterministic from a seed.
"""
from __future__ import annotations

import functools

import numpy as np

from .render import SHAPES, Obj, Scene, color_name, position_word, render, size_word

TOY_SIZE = 32
SIZE_RANGE = (0.35, 0.6)
SAT_RANGE = (0.65, 1.0)
VAL_RANGE = (0.7, 1.0)
BG_VAL_RANGE = (0.35, 0.6)
OUTLINE_PX = 1.5  # every object has a dark stroke this wide around its edges (see the module docstring)
MARGIN_PX = 1.0 + OUTLINE_PX

# probability of dropping each caption part during training
DROP = {"size": 0.5, "position": 0.5, "background": 0.5, "color": 0.1, "shape": 0.1, "all": 0.1}


def sample_toy_scene(rng: np.random.Generator, upright: bool = True) -> Scene:
    """A random scene from the toy models' training distribution."""
    sz = float(rng.uniform(*SIZE_RANGE))
    r = sz / 2
    margin = MARGIN_PX / TOY_SIZE
    lo, hi = r + margin, 1 - r - margin
    obj = Obj(
        shape=str(SHAPES[int(rng.integers(len(SHAPES)))]),
        hue=float(rng.uniform(0, 1)),
        sat=float(rng.uniform(*SAT_RANGE)),
        val=float(rng.uniform(*VAL_RANGE)),
        size=sz,
        x=float(rng.uniform(lo, hi)),
        y=float(rng.uniform(lo, hi)),
        rotation=0.0 if upright else float(rng.uniform(0, 360)),
        outline=OUTLINE_PX,
    )
    return Scene(objects=(obj,), background=(0.0, 0.0, float(rng.uniform(*BG_VAL_RANGE))), size=TOY_SIZE)


def caption_parts(scene: Scene) -> dict[str, str]:
    o = scene.objects[0]
    return {
        "size": size_word(o.size),
        "color": color_name(o.hue, o.sat, o.val),
        "shape": o.shape,
        "position": position_word(o.x, o.y),
        "background": f"on a {color_name(*scene.background)} background",
    }


def join_caption(parts: dict[str, str]) -> str:
    """``a [size] [color] shape|object [position] [background]`` from whichever parts are present."""
    words = ["a"]
    for key in ("size", "color"):
        if key in parts:
            words.append(parts[key])
    words.append(parts.get("shape", "shape"))
    for key in ("position", "background"):
        if key in parts:
            words.append(parts[key])
    return " ".join(words)


#: how many scenes of the training distribution :func:`vocabulary` reads (every word shows up well before)
VOCABULARY_SCENES = 4000


@functools.lru_cache(maxsize=1)
def vocabulary() -> frozenset[str]:
    """Every word of the toy models' training captions: the only words ``model: toy`` was trained on (any
    other word, ``teal`` say, has an untrained embedding and an arbitrary effect). Read off the captions of a
    fixed sample of the training distribution (scenes only, nothing drawn), plus ``shape`` (a caption whose
    shape was dropped says "shape")."""
    rng = np.random.default_rng(0)
    words = {"shape"}
    for _ in range(VOCABULARY_SCENES):
        words.update(full_caption(sample_toy_scene(rng)).split())
    return frozenset(words)


def full_caption(scene: Scene) -> str:
    return join_caption(caption_parts(scene))


def training_caption(scene: Scene, rng: np.random.Generator) -> str:
    """The scene's caption with parts dropped at random (``DROP``); sometimes empty."""
    if rng.random() < DROP["all"]:
        return ""
    parts = {k: v for k, v in caption_parts(scene).items() if rng.random() >= DROP[k]}
    return join_caption(parts)


def render_dataset(n: int, seed: int, upright: bool = True) -> tuple[list[Scene], np.ndarray]:
    """``n`` scenes from ``seed`` and their renders as a uint8 array (n, 32, 32, 3)."""
    rng = np.random.default_rng(seed)
    scenes = [sample_toy_scene(rng, upright) for _ in range(n)]
    images = np.stack([np.asarray(render(s)) for s in scenes])
    return scenes, images


__all__ = ["TOY_SIZE", "sample_toy_scene", "caption_parts", "join_caption", "full_caption", "training_caption",
           "render_dataset"]
