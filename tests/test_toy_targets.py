"""Issue 6's targets on the shipped `toy` model and CLIP, measured with the exact attribute reader.

Smaller samples than `caspec toyworld measure` (whose numbers are in BENCHMARKS.md), with thresholds
that these very samples reach (deterministic on a given machine and stack), never looser than measured.
"""
from __future__ import annotations

import numpy as np
import pytest

from caspec.toyworld.measure import COLORS, base_accuracy, sdedit_fidelity, toy_pipe

pytestmark = pytest.mark.slow

# Issue 6's targets (base: colour 90%, shape 80%; SDEdit: edit shown 80%, the other attributes kept 80%).
BASE_COLOR, BASE_SHAPE = 0.9, 0.8          # measured here: 1.0 and 1.0
EDIT_SHOWN, EDIT_KEPT = 0.8, 0.8           # measured here: colour edits 1.0 / 1.0, shape edits 0.8 / 1.0
CLIP_COLOR, CLIP_SHAPE = 0.95, 0.95        # measured here: 0.9625 and 1.0


@pytest.fixture(scope="module")
def pipe():
    return toy_pipe()


def test_base_model_draws_the_named_colour_and_shape(pipe):
    r = base_accuracy(pipe, seeds=1, steps=30)
    assert r["n"] == 40
    assert r["color_accuracy"] >= BASE_COLOR, r["color_accuracy"]
    assert r["shape_accuracy"] >= BASE_SHAPE, r["shape_accuracy"]


@pytest.mark.parametrize("attribute", ["color", "shape"])
def test_sdedit_changes_one_attribute_and_keeps_the_others_and_the_place(pipe, attribute):
    # 50 DDIM steps as in the paper (at 30, shape edits showed in only 65% of this sample: too few steps
    # after strength 0.86 to redraw a shape)
    r = sdedit_fidelity(pipe, attribute=attribute, n=20, candidates=1, steps=50)
    assert r["edit_shown"] >= EDIT_SHOWN, r["edit_shown"]
    assert r["others_kept"] >= EDIT_KEPT, r["others_kept"]  # the other attribute, and the place within 0.1


def test_toy_clip_names_colours_and_shapes_of_renders():
    """Zero-shot: the toy CLIP picks the right colour word (of 8) and shape word (of 5) for fresh renders."""
    from caspec.metrics.clip import ClipSpec, load_clip
    from caspec.toyworld.data import caption_parts, sample_toy_scene
    from caspec.toyworld.render import SHAPES, render

    clip = load_clip(ClipSpec(model="caspec-toy-clip"))
    rng = np.random.default_rng(4242)
    scenes = [sample_toy_scene(rng) for _ in range(80)]
    img = clip.embed_images([render(s) for s in scenes])
    colors = clip.embed_texts([f"a {c} shape" for c in COLORS])
    shapes = clip.embed_texts([f"a {s}" for s in SHAPES])
    want_c = [COLORS.index(caption_parts(s)["color"]) for s in scenes]
    want_s = [SHAPES.index(s.objects[0].shape) for s in scenes]
    acc_c = float(np.mean((img @ colors.T).argmax(1).numpy() == np.array(want_c)))
    acc_s = float(np.mean((img @ shapes.T).argmax(1).numpy() == np.array(want_s)))
    assert acc_c >= CLIP_COLOR, acc_c
    assert acc_s >= CLIP_SHAPE, acc_s
