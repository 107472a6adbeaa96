"""Contained runs: every path a spec reads or writes stays inside the spec's folder.

A recipe someone else wrote (``caspec run X.recipe.tar.gz``) is contained by default, and any spec is with
``--contained``. Then each path a spec names is resolved against the spec's folder, following links, and must
land inside it:

* files read: ``roots.*.image``, ``select.*.clip.checkpoint``, ``eval.*.clip.checkpoint``, asset folders in
  ``compose.*.assets`` and ``export.*.asset``, and a model folder in ``model`` / ``edits.*.model``;
* files written: ``select.*.manifest`` (review manifests and their contact sheets).

An escape (an absolute path elsewhere, a ``..`` that climbs out, a link pointing out) is a spec error at its
line. A hub id (``org/name``) and the embedded models are not paths. The store and ``out/`` are caspec's own:
``out/<name>/`` and the default store ``.caspec/`` sit beside the spec, and ``name`` cannot hold a ``/``.

Pure: reads the file system's links, writes nothing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from ..errors import SpecError
from .load import is_asset_path

HINT = ("a contained run (a recipe, or `--contained`) reads and writes only inside the spec's folder: give a path "
        "relative to the spec, without `..` or links that climb out")


def named_paths(loaded: Any) -> Iterator[tuple[tuple, str, str]]:
    """``(spec field path, the path as written, what it is)`` for every file or folder path the spec names."""
    spec = loaded.spec
    for sid, step in spec.roots.items():
        if step.image:
            yield ("roots", sid, "image"), step.image, "a root image"
    for sid, step in spec.select.items():
        if step.manifest:
            yield ("select", sid, "manifest"), step.manifest, "a review manifest (written)"
        if step.clip is not None and step.clip.checkpoint:
            yield ("select", sid, "clip", "checkpoint"), step.clip.checkpoint, "a CLIP checkpoint"
    for sid, step in spec.eval.items():
        if step.clip.checkpoint:
            yield ("eval", sid, "clip", "checkpoint"), step.clip.checkpoint, "a CLIP checkpoint"
    for sid, step in spec.compose.items():
        for i, asset in enumerate(step.assets):
            if is_asset_path(asset):
                yield ("compose", sid, "assets", i), asset, "an asset folder"
    for sid, step in spec.export.items():
        if is_asset_path(step.asset):
            yield ("export", sid, "asset"), step.asset, "an asset folder"
    models = [(("model",), spec.model)] + [(("edits", sid, "model"), s.model) for sid, s in spec.edits.items()
                                           if s.model is not None]
    for where, model in models:
        if _is_model_path(model.base, loaded.dir):
            yield (*where, "base"), model.base, "a model folder"


def _is_model_path(base: str, spec_dir: Path) -> bool:
    """A model that names a folder (not an embedded model, not a hub id resolved from the cache)."""
    from ..models.load import EMBEDDED, is_hub_id

    if base in EMBEDDED:
        return False
    path = Path(base).expanduser()
    return path.is_absolute() or (Path(spec_dir) / path).exists() or not is_hub_id(base) or ".." in path.parts


def escapes(loaded: Any) -> list[tuple[tuple, str, str, Path]]:
    """The named paths that resolve outside the spec's folder: ``(field, as written, what, where it lands)``."""
    root = Path(loaded.dir).resolve()
    out = []
    for field, value, what in named_paths(loaded):
        target = (Path(loaded.dir) / Path(value).expanduser()).resolve()
        if not target.is_relative_to(root):
            out.append((field, value, what, target))
    return out


def check_contained(loaded: Any) -> None:
    """Raise a :class:`SpecError` naming every path of ``loaded`` that leaves the spec's folder."""
    problems = [loaded.problem(field, f"{what} `{value}` resolves to {target}, outside the spec's folder "
                                      f"{Path(loaded.dir).resolve()}", HINT)
                for field, value, what, target in escapes(loaded)]
    if problems:
        raise SpecError(problems)


__all__ = ["named_paths", "escapes", "check_contained", "HINT"]
