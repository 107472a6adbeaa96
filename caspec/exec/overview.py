"""The run's overview page, ``out/<spec>/index.html``: one section per step in plan order (root, edits,
selection, training previews, compose, plot), each with its images and a link to its own page, so that the
whole method can be followed from one page.

A view over ``out/``, rewritten after every run (also a partly failed or paused one): never an input of a
step, never in a key. Plain HTML with relative links and no script, so the folder can be copied or served
as is.
"""
from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

from .step import out_dir_for

#: images shown per step (the rest are one click away, on the step's own page or in its folder)
SHOWN_IMAGES = 12
#: what each section is called (the spec's sections, in the method's words)
SECTION_TITLES = {"roots": "root", "edits": "edits", "select": "selection", "concepts": "training",
                  "compose": "compose", "eval": "metrics"}


def write_overview(plan: Any, out_root: Path | None = None) -> Path | None:
    """Write ``out/<spec>/index.html`` for ``plan``'s steps that have outputs laid out; return its path
    (None when no step has any yet)."""
    from ..fsutil import atomic_write_text

    loaded = plan.loaded
    spec_out = _spec_out(loaded, out_root)
    sections = [s for s in (_section(loaded, node, spec_out, out_root) for node in plan.order()) if s]
    if not sections:
        return None
    title = html.escape(f"{loaded.name}: overview")
    page = (f"<!doctype html><meta charset=utf-8><title>{title}</title>"
            "<body style='font-family:sans-serif;max-width:1100px;margin:auto'>"
            f"<h1>{title}</h1><p>Each step of <code>{html.escape(loaded.path.name)}</code>, in the order the "
            "method runs them; click a step for all of its outputs.</p>" + "".join(sections) + "</body>")
    return atomic_write_text(spec_out / "index.html", page)


def _spec_out(loaded: Any, out_root: Path | None) -> Path:
    return (out_root if out_root is not None else loaded.dir / "out") / loaded.name


def _section(loaded: Any, node: Any, spec_out: Path, out_root: Path | None) -> str:
    folder = out_dir_for(loaded, node.id, out_root)
    if not folder.is_dir():
        return ""
    links = []
    if (folder / "index.html").is_file():
        links.append(_link(spec_out, folder / "index.html", "its page"))
    sheet = _contact_sheet(loaded, node)
    if sheet is not None:
        links.append(_link(spec_out, sheet, "contact sheet and decisions"))
    links.append(_link(spec_out, folder, "folder"))
    images = _images(folder)
    figures = "".join(f'<a href="{_rel(spec_out, p)}"><img src="{_rel(spec_out, p)}" title="{html.escape(p.name)}" '
                      f"style='{_style(p)}'></a>" for p in images[:SHOWN_IMAGES])
    more = f"<p><small>and {len(images) - SHOWN_IMAGES} more</small></p>" if len(images) > SHOWN_IMAGES else ""
    what = SECTION_TITLES.get(node.section, node.section)
    return (f"<h2>{html.escape(what)}: <code>{html.escape(node.id)}</code> <small>({html.escape(node.kind)}; "
            f"{' · '.join(links)})</small></h2>{_legend(images)}<div>{figures}</div>{more}")


def _style(image: Path) -> str:
    if image.name == "plot.png":  # a figure, read at its own size
        return "width:480px;margin:3px"
    return "width:128px;margin:3px;image-rendering:pixelated"


def _legend(images: list[Path]) -> str:
    """What a compose step's row shows, where it has roots and plain-prompt twins."""
    if not any(p.name.endswith("-plain.png") for p in images):
        return ""
    return ("<p><small>The root first, then per seed the plain prompt (no asset) and the concept: what the asset "
            "adds is what differs. Its page lays them out prompt by prompt.</small></p>")


def _images(folder: Path) -> list[Path]:
    """The step's images: its plot, the roots it shows (compose), its own (a compose step's plain-prompt twin
    just before its concept image), then its final training previews."""
    own = sorted((p for p in folder.glob("*.png") if p.name != "plot.png"),
                 key=lambda p: (not p.name.startswith("root-"), p.name))
    previews = sorted(folder.glob("previews/*.png"))
    numbers = sorted({p.name.split("-")[1] for p in previews if p.name.startswith("step-")})
    if numbers:  # the last step's previews (``step-N-i.png``): the trained asset, not the way there
        previews = [p for p in previews if p.name.startswith(f"step-{numbers[-1]}-")]
    plot = [folder / "plot.png"] if (folder / "plot.png").is_file() else []
    return plot + own + previews


def _contact_sheet(loaded: Any, node: Any) -> Path | None:
    """A select step's contact sheet (its candidates, with what was kept), where one was written."""
    if node.section != "select":
        return None
    from ..ops.selection import manifest_path
    from ..review.manifest import sheet_path

    sheet = sheet_path(manifest_path(loaded, node.id, node.step))
    return sheet if sheet.is_file() else None


def _rel(base: Path, target: Path) -> str:
    return html.escape(Path(os.path.relpath(target, base)).as_posix(), quote=True)


def _link(base: Path, target: Path, text: str) -> str:
    return f'<a href="{_rel(base, target)}">{html.escape(text)}</a>'


__all__ = ["write_overview", "SHOWN_IMAGES"]
