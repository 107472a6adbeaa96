"""`caspec review SPEC --step STEP --keep ID...`: a person's (or a script's) decision, written to the manifest."""
from __future__ import annotations

import difflib
import os
from typing import Any

import click

from ..errors import UsageError
from ..exec.runner import UpstreamView, out_dir_for
from ..ops.selection import count_problem, sync_manifest
from ..plan.graph import make_plan
from .manifest import match_ids, sheet_path, write_contact_sheet, write_manifest


def _gate_node(plan: Any, step_id: str) -> Any:
    node = plan.nodes.get(step_id)
    gates = [n.id for n in plan.order() if n.gate is not None]
    if node is None or node.gate is None:
        close = difflib.get_close_matches(step_id, gates, n=1)
        hint = f"did you mean `{close[0]}`?" if close else f"review steps in this spec: {', '.join(gates) or 'none'}"
        raise UsageError(f"--step {step_id}: not a manual select step of {plan.loaded.path.name}", hint=hint)
    return node


def review_step(loaded: Any, store: Any, step_id: str, *, keep: list[str], reject: list[str], reset: bool,
                spec_arg: str) -> int:
    plan = make_plan(loaded, store)
    node = _gate_node(plan, step_id)
    source_id = node.upstream["source"]
    record = store.get(plan.nodes[source_id].key)
    if record is None:
        raise UsageError(f"step `{source_id}` has no candidates yet, so `{step_id}` has nothing to review",
                         hint=f"run `caspec run {spec_arg}` first")
    path = node.gate.manifest
    if reset and path.exists():
        path.unlink()
    m, _ = sync_manifest(path, spec_name=loaded.name, step_id=step_id, source_id=source_id,
                         source=UpstreamView(record), count=node.step.count,
                         source_out_dir=out_dir_for(loaded, source_id))
    for wanted, value in ((keep, True), (reject, False)):
        found, unknown = match_ids(m, wanted)
        if unknown:
            raise UsageError(f"unknown candidate id(s) for `{step_id}`: {', '.join(unknown)}",
                             hint=f"ids: {', '.join(c.id for c in m.candidates)} (or a digest prefix, or `all`)")
        for c in found:
            c.keep = value
    write_manifest(m)
    write_contact_sheet(m)
    kept = m.kept()
    click.echo(f"{step_id}: {len(kept)} of {len(m.candidates)} kept: {', '.join(c.id for c in kept) or '-'}")
    problem = count_problem(len(kept), node.step.count)
    rel = os.path.relpath(path)
    if problem:
        click.echo(f"review: {problem} in `{rel}` (contact sheet: `{os.path.relpath(sheet_path(path))}`)", err=True)
        return 3
    click.echo(f"hint: re-run `caspec run {spec_arg}` to go on", err=True)
    return 0
