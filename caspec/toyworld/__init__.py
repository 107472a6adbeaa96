"""Toy "shapes world": procedurally drawn scenes with exact ground truth and an exact attribute reader.

``render``/``sample_scene``/``caption`` live in :mod:`caspec.toyworld.render`; ``read`` in
:mod:`caspec.toyworld.reader`.  numpy + PIL only (no torch), so importing this is cheap.

The toy models trained on this world (``model: toy`` and the ``caspec-toy-clip`` CLIP) are trained by
:mod:`~caspec.toyworld.train` and :mod:`~caspec.toyworld.train_clip` on the distribution of
:mod:`~caspec.toyworld.data`; their weights ship in ``weights/``.  :mod:`~caspec.toyworld.measure` and
:mod:`~caspec.toyworld.experiment` measure them (issue 6's targets) with the reader.
"""
from .reader import Reading, read
from .render import (COLOR_NAMES, SHAPES, TEXTURES, Obj, Scene, caption, color_name, position_word, render,
                     sample_scene, size_word)

__all__ = ["COLOR_NAMES", "SHAPES", "TEXTURES", "Obj", "Scene", "Reading", "caption", "color_name",
           "position_word", "read", "render", "sample_scene", "size_word"]
