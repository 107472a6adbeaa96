"""Step kind `select` with `by: manual`: a person keeps some candidates of a root or edit step.

First run: write the review manifest (every candidate `keep: false`) and a contact sheet, then stop
this branch (exit code 3). After the person marks candidates and re-runs, the kept images become this
step's output. The manifest's decision (kept digests) is part of the cache key; a manifest naming
candidates that no longer exist upstream is an error listing them, never a silent reselection.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ReviewError, ReviewPending
from ..review.manifest import read_manifest
from .base import GateState, Op, RunContext
from .selection import copy_kept, count_problem, manifest_path, show_path, sync_manifest


class SelectManualOp(Op):
    KIND = "select"
    VERSION = 1
    USES_MODEL = False
    TORCH_COMPUTE = False
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
        problem = count_problem(len(m.kept()), step.count)
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
                                f"candidates listed in `{show_path(path)}`", hint=_hint(ctx, path))
        problem = count_problem(len(m.kept()), ctx.params["count"])
        if problem:
            raise ReviewPending(ctx.step_id, f"step `{ctx.step_id}` waits for review: {problem} in `{show_path(path)}`",
                                hint=_hint(ctx, path))
        if ctx.extra.get("decision") is not None and m.decision() != ctx.extra["decision"]:
            raise ReviewPending(ctx.step_id, f"`{show_path(path)}` changed while the run was starting",
                                hint="re-run `caspec run` to pick up the new decision")
        kept = copy_kept(ctx, source, source.result["images"], m)
        return {"images": kept, "decision": m.decision()}


def _hint(ctx: RunContext, path: Path) -> str:
    spec = ctx.extra.get("spec_path", "SPEC")
    return (f"mark `keep: true` on the candidates to keep in `{show_path(path)}` (contact sheet: "
            f"`{show_path(path.with_suffix('.html'))}`), or run `caspec review {spec} --step {ctx.step_id} --keep ID...`; "
            f"then re-run `caspec run {spec}`")


__all__ = ["SelectManualOp", "manifest_path", "sync_manifest"]
