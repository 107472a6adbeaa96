"""EXECUTE: walk a plan in dependency order and run what is not cached. The only phase that writes.

Per step: re-key it from the content of the upstream records actually used (early cutoff: identical
upstream bytes keep it cached), take the key's lock, re-check the store (another run may have finished
it), run the op into a staging dir, commit (objects first, action record last), then lay the outputs out
readably under ``out/<spec-name>/<step-id>/``. A branch that waits for review stops; independent
branches go on. The first record committed for a key wins: if another run got there first (a store
shared without working locks), its record is used and a warning says so; only ``--force`` replaces one.
Every record's ``meta`` names the environment that made it (``caspec.environment``).
"""
from __future__ import annotations

import difflib
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .. import __version__
from ..errors import CaspecError, ReviewPending, UsageError
from ..ops.base import RunContext, UpstreamView
from ..plan.graph import AWAITING, CACHED, Node, Plan, make_plan, rekey
from ..plan.keys import content_digest
from .progress import NullReporter

RAN, FAILED, WOULD_RUN = "ran", "failed", "would-run"
STOPPED = (FAILED, AWAITING, "blocked")


@dataclass
class StepOutcome:
    id: str
    status: str
    message: str = ""
    hint: str | None = None
    seconds: float = 0.0


@dataclass
class RunSummary:
    plan: Plan
    outcomes: dict[str, StepOutcome] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        states = {o.status for o in self.outcomes.values()}
        if FAILED in states:
            return 1
        if AWAITING in states:
            return 3
        return 0

    def by_status(self, status: str) -> list[StepOutcome]:
        return [o for o in self.outcomes.values() if o.status == status]


def checkpoint_dir(store: Any, key: str) -> Path:
    """Where a long step (training) keeps resumable checkpoints: survives a crash, removed after commit."""
    return store.root / "checkpoints" / key


def out_dir_for(loaded: Any, step_id: str) -> Path:
    return loaded.dir / "out" / loaded.name / step_id


def check_step_ids(plan: Plan, names: Iterable[str], option: str) -> None:
    for name in names:
        if name not in plan.nodes:
            close = difflib.get_close_matches(name, list(plan.nodes), n=1)
            hint = f"did you mean `{close[0]}`?" if close else f"steps: {', '.join(plan.nodes)}"
            raise UsageError(f"{option} {name}: no step `{name}` in {plan.loaded.path.name}", hint=hint)


def select_steps(plan: Plan, only: tuple[str, ...], until: tuple[str, ...]) -> set[str]:
    check_step_ids(plan, only, "--only")
    check_step_ids(plan, until, "--until")
    if not only and not until:
        return set(plan.nodes)
    chosen = set(only)
    for sid in until:
        chosen |= {sid} | plan.ancestors(sid)
    for sid in only:
        missing = [a for a in plan.ancestors(sid) if a not in chosen and plan.nodes[a].status != CACHED]
        if missing:
            raise UsageError(f"--only {sid}: upstream step(s) {', '.join(f'`{m}`' for m in sorted(missing))} are not cached",
                             hint=f"use `--until {sid}` to run {sid} together with what it needs")
    return chosen


def run(loaded: Any, store: Any, *, only: tuple[str, ...] = (), until: tuple[str, ...] = (),
        force: tuple[str, ...] = (), dry_run: bool = False, reporter: Any = None,
        plan: Plan | None = None) -> RunSummary:
    """Run ``loaded`` against ``store``. Returns a summary; its ``exit_code`` is 0, 1 or 3."""
    reporter = reporter or NullReporter()
    if plan is None:
        plan = make_plan(loaded, store, force=set(force))
    check_step_ids(plan, force, "--force")
    chosen = select_steps(plan, only, until)
    summary = RunSummary(plan)
    runner = _Runner(plan, store, reporter, summary, dry_run, set(force))
    reporter.start(len(chosen))
    try:
        for node in plan.order():
            if node.id in chosen:
                runner.visit(node)
    finally:
        reporter.stop()
        if not dry_run:
            runner.save_state()
    return summary


class _Runner:
    def __init__(self, plan: Plan, store: Any, reporter: Any, summary: RunSummary, dry_run: bool, force: set[str]):
        self.plan, self.store, self.reporter, self.summary = plan, store, reporter, summary
        self.loaded = plan.loaded
        self.dry_run, self.force = dry_run, force
        self.records: dict[str, Any] = {}
        self.done: dict[str, str] = {}

    # -- walking -------------------------------------------------------------------------------
    def visit(self, node: Node) -> None:
        for sid in node.upstream.values():  # upstream outside the chosen steps (--only): use the store's copy
            if sid in self.summary.outcomes or sid in self.records:
                continue
            if self.dry_run:
                if self.plan.nodes[sid].status == CACHED:
                    self.records[sid] = None
            elif (record := self._usable_record(self.plan.nodes[sid])) is not None:
                self.records[sid] = record
        blocked = [sid for sid in node.upstream.values() if sid not in self.records]
        if blocked:
            self._finish(node, "blocked", "waits for " + ", ".join(f"`{s}`" for s in sorted(set(blocked))))
            return
        self.reporter.step_started(node)
        if self.dry_run:
            status = CACHED if node.status == CACHED else (AWAITING if node.status == AWAITING else WOULD_RUN)
            self._finish(node, status, "; ".join(node.reasons))
            if status == CACHED or (status == WOULD_RUN and node.gate is None):
                self.records[node.id] = None  # lets downstream report would-run too
            return
        self._execute(node)

    def _execute(self, node: Node) -> None:
        start = time.monotonic()
        # key from the content of the upstream records actually used (and, for a gate, its manifest
        # resolved against them): exact from here on
        upstream = {role: UpstreamView(self.records[sid]) for role, sid in node.upstream.items()}
        contents = {role: content_digest(self.records[sid]) for role, sid in node.upstream.items()}
        rekey(node, self.loaded, contents, self.plan.model_identity, upstream if node.op.IS_GATE else None)
        node.pending = []
        try:
            record, ran = self._cached_or_run(node)
        except ReviewPending as exc:
            self._finish(node, AWAITING, exc.message, exc.hint)
            return
        except CaspecError as exc:
            self._finish(node, FAILED, exc.message, exc.hint)
            return
        except Exception as exc:  # an op crashed: keep the traceback in a log, report one line
            log = self._write_log(node, traceback.format_exc())
            self._finish(node, FAILED, f"{type(exc).__name__}: {exc}", f"full traceback in `{log}`")
            return
        self.records[node.id] = record
        self.done[node.id] = node.key
        self._materialize(node, record)
        self._finish(node, RAN if ran else CACHED, _describe(record), seconds=time.monotonic() - start)

    def _cached_or_run(self, node: Node) -> tuple[Any, bool]:
        forced = node.id in self.force
        if not forced:
            record = self._usable_record(node)
            if record is not None:
                return record, False
        with self.store.lock(node.key):
            if not forced:  # someone may have finished it while we waited for the lock
                record = self._usable_record(node, quiet=True)
                if record is not None:
                    return record, False
            return self._run_op(node), True

    def _usable_record(self, node: Node, quiet: bool = False) -> Any:
        record = self.store.get(node.key)
        if record is None:
            return None
        bad = self.store.verify(record)
        if not bad:
            return record
        if not quiet:
            self.reporter.warn(f"store entry of `{node.id}` ({node.short_key}) is corrupted "
                               f"({', '.join(bad[:3])}{'…' if len(bad) > 3 else ''}); running it again")
        self.store.drop(node.key)
        return None

    def _run_op(self, node: Node) -> Any:
        start = time.monotonic()
        forced = node.id in self.force
        with self.store.staging(node.key) as staged:
            ctx = self._context(node, staged)
            result = node.op.run(ctx)
            from ..environment import environment  # here, not at import: a cached run never needs it

            meta = {"step_id": node.id, "spec": self.loaded.name, "caspec": __version__,
                    "seconds": round(time.monotonic() - start, 3), "finished": time.time(),
                    "environment": environment(self._device(node))}
            if ctx.meta:
                meta["run"] = ctx.meta
            record = self.store.commit(node.key, staged, kind=node.kind, material=node.material,
                                       result=result, meta=meta, overwrite=forced)
        if not record.committed:  # first record wins: another run committed this key while we ran
            self.reporter.warn(f"`{node.id}`: another run committed key {node.short_key} first; using its outputs")
        shutil.rmtree(checkpoint_dir(self.store, node.key), ignore_errors=True)  # only after the commit
        return record

    def _device(self, node: Node) -> str | None:
        """The device the step computed on: the spec model's, for a step that uses the model or ran
        with torch loaded (CLIP runs where the model does); None for a step that did no torch work."""
        if not node.op.USES_MODEL and "torch" not in sys.modules:
            return None
        from ..models.load import resolve_device

        return resolve_device(self.loaded.spec.model)

    def _context(self, node: Node, staged: Path) -> RunContext:
        upstream = {role: UpstreamView(self.records[sid]) for role, sid in node.upstream.items()}
        extra: dict[str, Any] = {"spec_path": _rel(self.loaded.path), "model_identity": self.plan.model_identity,
                                 "checkpoint_dir": checkpoint_dir(self.store, node.key),
                                 "where": lambda *path: self.loaded.where((node.section, node.id, *path)),
                                 "step": node.step}
        if node.gate is not None:
            source_id = node.upstream.get("source", "")
            extra.update(manifest=node.gate.manifest, decision=node.gate.material, source_id=source_id,
                         source_out_dir=out_dir_for(self.loaded, source_id))
        return RunContext(step_id=node.id, spec_name=self.loaded.name, key=node.key, params=node.params,
                          out_dir=staged, spec_dir=self.loaded.dir, model=self.loaded.spec.model,
                          upstream=upstream, inputs=dict(node.inputs), progress=self.reporter.progress,
                          extra=extra)

    # -- outputs -------------------------------------------------------------------------------
    def _materialize(self, node: Node, record: Any) -> None:
        """Copy a step's outputs to out/<spec>/<step>/ (the store stays the source of truth)."""
        out = out_dir_for(self.loaded, node.id)
        marker = out / ".caspec-key"
        if marker.exists() and marker.read_text().strip() == record.key and all(
                (out / rel).is_file() for rel in record.outputs):
            return
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        for rel in record.outputs:
            dest = out / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(record.file(rel), dest)
        marker.write_text(record.key + "\n")

    def _write_log(self, node: Node, text: str) -> str:
        logs = self.store.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        path = logs / f"{node.id}-{node.short_key}.log"
        path.write_text(text)
        return _rel(path)

    def _finish(self, node: Node, status: str, message: str = "", hint: str | None = None,
                seconds: float = 0.0) -> None:
        self.summary.outcomes[node.id] = StepOutcome(node.id, status, message, hint, seconds)
        if status == AWAITING:
            detail = "waits for review"
        elif status == FAILED:
            detail = "failed (see below)"
        elif status in STOPPED or status == WOULD_RUN:
            detail = message
        else:
            detail = f"{message} {seconds:.1f}s".strip()
        self.reporter.step_finished(node, status, detail)

    def save_state(self) -> None:
        if not self.done:
            return
        state = self.store.read_state(self.loaded.name)
        steps = state.get("steps", {})
        for sid, key in self.done.items():
            steps[sid] = {"key": key}
        steps = {sid: v for sid, v in steps.items() if sid in self.plan.nodes}
        self.store.write_state(self.loaded.name, {"spec": str(self.loaded.path), "steps": steps,
                                                   "updated": time.time()})


def _describe(record: Any) -> str:
    images = record.result.get("images") if isinstance(record.result, dict) else None
    return f"{len(images)} image(s)" if images is not None else f"{len(record.outputs)} file(s)"


def _rel(path: Path) -> str:
    import os

    try:
        return os.path.relpath(path)
    except ValueError:  # pragma: no cover
        return str(path)
