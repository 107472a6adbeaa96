"""Step kind `select` with `by: manual`: a person keeps some candidates of a root or edit step.

First run: write the review manifest (every candidate `keep: false`) and a contact sheet, then stop
this branch (exit code 3). After the person marks candidates and re-runs, the kept images become this
step's output. The manifest's decision (kept digests) is part of the cache key; a manifest naming
candidates that no longer exist upstream is an error listing them, never a silent reselection.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from ..errors import ReviewError, ReviewPending
from ..review.manifest import Candidate, Manifest, read_manifest, write_contact_sheet, write_manifest
from .base import GateState, Op, RunContext


def manifest_path(loaded: Any, step_id: str, step: Any) -> Path:
    if step.manifest:
        return (loaded.dir / step.manifest).resolve()
    return loaded.dir / "reviews" / loaded.name / f"{step_id}.yaml"


def _count_problem(kept: int, count: int | None) -> str:
    if kept == 0:
        return "no candidate is marked `keep: true` yet"
    if count is not None and kept != count:
        return f"{kept} kept but the step needs exactly {count}: mark {'more' if kept < count else 'fewer'}"
    return ""


class SelectManualOp(Op):
    KIND = "select"
    VERSION = 1
    USES_MODEL = False
    IS_GATE = True

    def params(self, step: Any, spec: Any) -> dict[str, Any]:
        return {"by": step.by, "count": step.count}

    def upstream(self, step: Any) -> dict[str, str]:
        return {"source": step.from_}

    def gate(self, step: Any, step_id: str, loaded: Any, upstream: dict[str, Any] | None = None) -> GateState:
        path = manifest_path(loaded, step_id, step)
        try:
            m = read_manifest(path)
        except ReviewError as exc:
            return GateState(path, False, {"keep": None}, f"manifest unreadable: {exc.message}")
        if m is None:
            return GateState(path, False, {"keep": None}, "review manifest not written yet")
        problem = _count_problem(len(m.kept()), step.count)
        source = (upstream or {}).get("source")
        by_id = {img["id"]: img["digest"] for img in source.result["images"]} if source is not None else None
        decision = m.decision(by_id)
        if decision is None:  # pre-filled by id; exact once the candidates exist
            ids = sorted(c.id for c in m.kept())
            return GateState(path, not problem, {"keep_ids": ids}, problem, m.source_key, provisional=True)
        return GateState(path, not problem, decision, problem, m.source_key)

    def run(self, ctx: RunContext) -> dict[str, Any]:
        source = ctx.upstream["source"]
        path: Path = ctx.extra["manifest"]
        m, created = sync_manifest(path, spec_name=ctx.spec_name, step_id=ctx.step_id,
                                   source_id=ctx.extra.get("source_id", ""), source=source,
                                   count=ctx.params["count"], source_out_dir=ctx.extra.get("source_out_dir"))
        if created:
            raise ReviewPending(ctx.step_id, f"step `{ctx.step_id}` waits for review: {len(m.candidates)} "
                                f"candidates listed in `{_show(path)}`", hint=_hint(ctx, path))
        problem = _count_problem(len(m.kept()), ctx.params["count"])
        if problem:
            raise ReviewPending(ctx.step_id, f"step `{ctx.step_id}` waits for review: {problem} in `{_show(path)}`",
                                hint=_hint(ctx, path))
        if ctx.extra.get("decision") is not None and m.decision() != ctx.extra["decision"]:
            raise ReviewPending(ctx.step_id, f"`{_show(path)}` changed while the run was starting",
                                hint="re-run `caspec run` to pick up the new decision")
        kept = _copy_kept(ctx, source, source.result["images"], m)
        return {"images": kept, "decision": m.decision()}


def sync_manifest(path: Path, *, spec_name: str, step_id: str, source_id: str, source: Any,
                  count: int | None, source_out_dir: Path | None) -> tuple[Manifest, bool]:
    """Create the manifest from the source's candidates, or reconcile an existing one with them.
    Returns (manifest, created). A manifest naming vanished candidates raises ReviewError."""
    images = source.result["images"]
    rel = _rel_images(path, source_out_dir, images)
    m = read_manifest(path)
    if m is None:
        m = Manifest(path, spec_name, step_id, source_id, source.key, count,
                     [_new_candidate(img, rel) for img in images])
        _save(m)
        return m, True
    _reconcile(step_id, m, images, rel, source.key)
    return m, False


def _new_candidate(img: dict[str, Any], rel: dict[str, str]) -> Candidate:
    meta = {k: img[k] for k in ("prompt", "seed", "source") if img.get(k) is not None}
    return Candidate(id=img["id"], digest=img["digest"], image=rel.get(img["id"], ""), keep=False, meta=meta)


def _reconcile(step_id: str, m: Manifest, images: list[dict[str, Any]], rel: dict[str, str], source_key: str) -> None:
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
        raise ReviewError(step_id, f"`{_show(m.path)}` names {len(stale)} candidate(s) that step "
                          f"`{m.source or 'source'}` no longer produces: {listed}",
                          hint=f"upstream changed since the review: delete `{_show(m.path)}` (or run `caspec review "
                               f"SPEC --step {step_id} --reset`) and review the new candidates")
    known = {c.digest for c in m.candidates}
    added = [_new_candidate(img, rel) for img in images if img["digest"] not in known]
    changed = bool(added) or m.source_key != source_key
    m.candidates.extend(added)
    for c in m.candidates:
        new_rel = rel.get(c.id)
        if new_rel and c.image != new_rel:
            c.image, changed = new_rel, True
    m.source_key = source_key
    if changed:
        _save(m)


def _copy_kept(ctx: RunContext, source: Any, images: list[dict[str, Any]], m: Manifest) -> list[dict[str, Any]]:
    keep = {c.digest for c in m.kept()}
    out = []
    for img in images:
        if img["digest"] in keep:
            shutil.copyfile(source.file(img["file"]), ctx.out_dir / img["file"])
            out.append({k: v for k, v in img.items() if k not in ("file_digest", "source_file")})
    return out


def _rel_images(manifest: Path, source_out: Path | None, images: list[dict[str, Any]]) -> dict[str, str]:
    if source_out is None:
        return {}
    return {img["id"]: os.path.relpath(source_out / img["file"], manifest.parent) for img in images}


def _save(m: Manifest) -> None:
    write_manifest(m)
    write_contact_sheet(m)


def _show(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:  # pragma: no cover - other drive on Windows
        return str(path)


def _hint(ctx: RunContext, path: Path) -> str:
    spec = ctx.extra.get("spec_path", "SPEC")
    return (f"mark `keep: true` on the candidates to keep in `{_show(path)}` (contact sheet: "
            f"`{_show(path.with_suffix('.html'))}`), or run `caspec review {spec} --step {ctx.step_id} --keep ID...`; "
            f"then re-run `caspec run {spec}`")
