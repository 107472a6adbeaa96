"""What both kinds of `select` step share: the review manifest of a selection and the kept images.

A selection (``by: manual``, a person; ``by: clip``, CLIP scores) reads the candidates of a root or edit
step and keeps some. Both write the same review manifest (:mod:`caspec.review.manifest`) next to the spec
(:func:`manifest_path`), list every candidate in it (:func:`new_candidate`), keep it in step with the
candidates upstream (:func:`reconcile`, :func:`sync_manifest`: a manifest naming candidates that no longer
exist is an error listing them, never a silent reselection), write it with its contact sheet
(:func:`save_manifest`), and copy the kept images into the step's output (:func:`copy_kept`).

No torch here: planning imports this module.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from ..errors import ReviewError
from ..review.manifest import Candidate, Manifest, read_manifest, write_contact_sheet, write_manifest

CANDIDATE_META = ("prompt", "seed", "source")
"""Image-entry fields copied into a manifest's candidate entries."""


def manifest_path(loaded: Any, step_id: str, step: Any) -> Path:
    """The review manifest of select step ``step_id``: its ``manifest`` setting (relative to the spec),
    else ``reviews/<spec-name>/<step-id>.yaml`` next to the spec."""
    if step.manifest:
        return (loaded.dir / step.manifest).resolve()
    return loaded.dir / "reviews" / loaded.name / f"{step_id}.yaml"


def count_problem(kept: int, count: int | None) -> str:
    """What is wrong with keeping ``kept`` candidates when the step needs exactly ``count`` ('' if nothing)."""
    if kept == 0:
        return "no candidate is marked `keep: true` yet"
    if count is not None and kept != count:
        return f"{kept} kept but the step needs exactly {count}: mark {'more' if kept < count else 'fewer'}"
    return ""


def new_candidate(img: dict[str, Any], rel: dict[str, str]) -> Candidate:
    """A manifest entry (not kept) for image entry ``img``; ``rel`` maps ids to image paths for the sheet."""
    meta = {k: img[k] for k in CANDIDATE_META if img.get(k) is not None}
    return Candidate(id=img["id"], digest=img["digest"], image=rel.get(img["id"], ""), keep=False, meta=meta)


def rel_images(manifest: Path, source_out: Path | None, images: list[dict[str, Any]]) -> dict[str, str]:
    """Candidate id -> its image in the source step's output folder, relative to the manifest's folder."""
    if source_out is None:
        return {}
    return {img["id"]: os.path.relpath(source_out / img["file"], manifest.parent) for img in images}


def reconcile(step_id: str, m: Manifest, images: list[dict[str, Any]], rel: dict[str, str], source_key: str) -> None:
    """Refuse stale candidates; append new ones unreviewed; refresh image paths. Saves if anything changed."""
    current = {img["digest"] for img in images}
    by_id = {img["id"]: img["digest"] for img in images}
    for c in m.candidates:  # pre-filled entries (id only): take the digest of that candidate
        if not c.digest and c.id in by_id:
            c.digest = by_id[c.id]
            m.source_key = None  # forces a save below
    stale = [c for c in m.candidates if c.digest not in current]
    if stale:
        listed = ", ".join(f"{c.id} ({c.digest[:10] or 'no such id'})" for c in stale)
        raise ReviewError(step_id, f"`{show_path(m.path)}` names {len(stale)} candidate(s) that step "
                          f"`{m.source or 'source'}` no longer produces: {listed}",
                          hint=f"upstream changed since the review: delete `{show_path(m.path)}` (or run `caspec "
                               f"review SPEC --step {step_id} --reset`) and review the new candidates")
    known = {c.digest for c in m.candidates}
    added = [new_candidate(img, rel) for img in images if img["digest"] not in known]
    changed = bool(added) or m.source_key != source_key
    m.candidates.extend(added)
    for c in m.candidates:
        new_rel = rel.get(c.id)
        if new_rel and c.image != new_rel:
            c.image, changed = new_rel, True
    m.source_key = source_key
    if changed:
        save_manifest(m)


def sync_manifest(path: Path, *, spec_name: str, step_id: str, source_id: str, source: Any,
                  count: int | None, source_out_dir: Path | None) -> tuple[Manifest, bool]:
    """Create the manifest from the source's candidates, or reconcile an existing one with them.
    Returns (manifest, created). A manifest naming vanished candidates raises ReviewError."""
    images = source.result["images"]
    rel = rel_images(path, source_out_dir, images)
    m = read_manifest(path)
    if m is None:
        m = Manifest(path, spec_name, step_id, source_id, source.key, count,
                     [new_candidate(img, rel) for img in images])
        save_manifest(m)
        return m, True
    reconcile(step_id, m, images, rel, source.key)
    return m, False


def copy_kept(ctx: Any, source: Any, images: list[dict[str, Any]], m: Manifest) -> list[dict[str, Any]]:
    """Copy the images the manifest keeps into ``ctx.out_dir`` (in the source's order); their entries,
    without the fields that name files of the source step."""
    keep = {c.digest for c in m.kept()}
    out = []
    for img in images:
        if img["digest"] in keep:
            shutil.copyfile(source.file(img["file"]), ctx.out_dir / img["file"])
            out.append({k: v for k, v in img.items() if k not in ("file_digest", "source_file")})
    return out


def save_manifest(m: Manifest) -> None:
    """Write the manifest and its contact sheet."""
    write_manifest(m)
    write_contact_sheet(m)


def show_path(path: Path) -> str:
    """``path`` as a person would type it here (relative to the current directory when possible)."""
    try:
        return os.path.relpath(path)
    except ValueError:  # pragma: no cover - other drive on Windows
        return str(path)


__all__ = ["manifest_path", "count_problem", "new_candidate", "rel_images", "reconcile", "sync_manifest",
           "copy_kept", "save_manifest", "show_path", "CANDIDATE_META"]
