"""EXECUTE: walk a plan in dependency order and run what is not cached. The only phase that writes.

Per step, once its upstream steps have finished: re-key it from the content of the upstream records
actually used (early cutoff: identical upstream bytes keep it cached); if the store holds no record of
that key, hand a :class:`~caspec.exec.step.StepJob` to the executor, which runs it
(:func:`caspec.exec.step.execute_job`: lock, re-check, op, commit; the first record committed for a key
wins) in this process (``exec.local``) or on a Ray cluster (``exec.ray_backend``); then lay the outputs
out readably under ``out/<spec-name>/<step-id>/``. A branch that waits for review stops; independent
branches go on. Every record's ``meta`` names the environment that made it (``caspec.environment``).

An executor implements ``compute(loaded)`` (the device and threads its keys promise: ``exec.compute``),
``start(store)``, ``submit(job, store, reporter)``, ``poll()`` (results finished so far),
``wait()`` (block until at least one more finishes) and ``stop()`` (cancel what still runs).
"""
from __future__ import annotations

import difflib
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from ..errors import EXIT_FROZEN, UsageError
from ..ops.base import UpstreamView
from ..plan.graph import AWAITING, CACHED, Node, Plan, make_plan, rekey
from ..plan.keys import content_digest
from .progress import NullReporter
from .step import OK, PENDING_REVIEW, JobResult, StepJob, checkpoint_dir, out_dir_for, usable_record

__all__ = ["run", "RunSummary", "StepOutcome", "select_steps", "check_step_ids", "checkpoint_dir", "out_dir_for",
           "UpstreamView"]

RAN, FAILED, WOULD_RUN, DIFFERS = "ran", "failed", "would-run", "differs-from-lock"
STOPPED = (FAILED, DIFFERS, AWAITING, "blocked")


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
        if DIFFERS in states:
            return EXIT_FROZEN
        if AWAITING in states:
            return 3
        return 0

    def by_status(self, status: str) -> list[StepOutcome]:
        return [o for o in self.outcomes.values() if o.status == status]


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
        plan: Plan | None = None, executor: Any = None, frozen: dict[str, Any] | None = None,
        out_root: Any = None) -> RunSummary:
    """Run ``loaded`` against ``store``. Returns a summary; its ``exit_code`` is 0, 1, 3 or 4.

    ``frozen`` (a lock's ``steps``, ``caspec.lock``): a step whose exact key, or whose new outputs, differ
    from the lock's ends ``differs-from-lock`` and stops its branch (exit 4). ``out_root``: lay outputs out
    there instead of ``out/`` beside the spec (``caspec verify``'s scratch runs).

    ``executor`` (``exec.local.LocalExecutor`` by default, or ``exec.ray_backend.RayExecutor``) runs the
    steps that are not cached; this function walks the plan, re-keys each step from the records its
    upstream actually produced, and lays out the outputs."""
    from .local import LocalExecutor

    reporter = reporter or NullReporter()
    executor = executor or LocalExecutor()
    if plan is None:
        plan = make_plan(loaded, store, force=set(force), compute=executor.compute(loaded))
    check_step_ids(plan, force, "--force")
    chosen = select_steps(plan, only, until)
    summary = RunSummary(plan)
    runner = _Runner(plan, store, reporter, summary, dry_run, set(force), executor)
    runner.frozen, runner.out_root = frozen, out_root
    reporter.start(len(chosen))
    try:
        if not dry_run:
            executor.start(store)
        runner.walk([n for n in plan.order() if n.id in chosen])
    finally:
        try:
            executor.stop()  # on Ctrl-C or an error: cancels what still runs
        finally:
            reporter.stop()
            if not dry_run:
                runner.save_state()
                _overview(plan, out_root)
    return summary


def _overview(plan: Plan, out_root: Any) -> None:
    """Rewrite ``out/<spec>/index.html`` (:mod:`caspec.exec.overview`); a view, so a failure only warns."""
    from .overview import write_overview

    try:
        write_overview(plan, out_root)
    except OSError as exc:
        import warnings

        warnings.warn(f"could not write the overview page: {exc}", stacklevel=2)


class _Runner:
    def __init__(self, plan: Plan, store: Any, reporter: Any, summary: RunSummary, dry_run: bool, force: set[str],
                 executor: Any):
        self.plan, self.store, self.reporter, self.summary = plan, store, reporter, summary
        self.loaded = plan.loaded
        self.dry_run, self.force, self.executor = dry_run, force, executor
        self.records: dict[str, Any] = {}
        self.done: dict[str, str] = {}
        self.running: dict[str, tuple[Node, float]] = {}  # step id -> (node, start) of submitted steps
        self.frozen: dict[str, Any] | None = None
        self.out_root: Any = None

    # -- walking -------------------------------------------------------------------------------
    def walk(self, todo: list[Node]) -> None:
        """Visit each node once its chosen upstream steps have finished, in plan order; submit what must
        run, and take back results as the executor finishes them (the local executor: at once)."""
        ids = {n.id for n in todo}
        while todo or self.running:
            waiting = []
            for node in todo:
                if any(sid in ids and sid not in self.summary.outcomes for sid in node.upstream.values()):
                    waiting.append(node)
                else:
                    self.visit(node)
                    self._take(self.executor.poll())
            todo = waiting
            if self.running:
                self._take(self.executor.wait())

    def visit(self, node: Node) -> None:
        for sid in node.upstream.values():  # upstream outside the chosen steps (--only): use the store's copy
            if sid in self.summary.outcomes or sid in self.records:
                continue
            if self.dry_run:
                if self.plan.nodes[sid].status == CACHED:
                    self.records[sid] = None
            elif (record := usable_record(self.store, self.plan.nodes[sid].key, sid, self.reporter.warn)) is not None:
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
        self._submit(node)

    def _submit(self, node: Node) -> None:
        start = time.monotonic()
        # key from the content of the upstream records actually used (and, for a gate, its manifest
        # resolved against them): exact from here on
        upstream = {role: UpstreamView(self.records[sid]) for role, sid in node.upstream.items()}
        contents = {role: content_digest(self.records[sid]) for role, sid in node.upstream.items()}
        rekey(node, self.loaded, contents, self.plan.model_identity, upstream if node.op.IS_GATE else None,
              self.plan.compute)
        node.pending = []
        locked = (self.frozen or {}).get(node.id)
        if locked is not None and locked["key"] != node.key:
            self._finish(node, DIFFERS, f"its key {node.short_key} is not the lock's {locked['key'][:12]}: "
                         "the outputs it reads differ from the lock's")
            return
        if node.id not in self.force:  # cached: no need to hand it to the executor
            record = usable_record(self.store, node.key, node.id, self.reporter.warn)
            if record is not None:
                self._completed(node, record, False, start)
                return
        job = StepJob(node=node, loaded=self.loaded, model_identity=node.model_identity or self.plan.model_identity,
                      upstream_keys={role: self.records[sid].key for role, sid in node.upstream.items()},
                      upstream_contents=contents,
                      compute=self.plan.compute.for_node(node) if self.plan.compute is not None else None,
                      forced=node.id in self.force,
                      source_out_dir=out_dir_for(self.loaded, node.upstream["source"], self.out_root)
                      if node.gate else None)
        self.running[node.id] = (node, start)
        self.executor.submit(job, self.store, self.reporter)

    def _take(self, results: list[JobResult]) -> None:
        for res in results:
            node, start = self.running.pop(res.step_id)
            for message in res.warnings:
                self.reporter.warn(message)
            if res.status == PENDING_REVIEW:
                self._finish(node, AWAITING, res.message, res.hint)
            elif res.status != OK:
                self._finish(node, FAILED, res.message, res.hint)
            else:
                record = res.record if res.record is not None else self.store.get(res.key)
                if record is None:
                    self._finish(node, FAILED, f"the record of {res.key[:12]} is not in the store after it ran",
                                 "the workers and the driver must use the same store")
                else:
                    self._completed(node, record, res.ran, start)

    def _completed(self, node: Node, record: Any, ran: bool, start: float) -> None:
        locked = (self.frozen or {}).get(node.id)
        if locked is not None and "outputs" in locked:
            made = {rel: o["digest"] for rel, o in record.outputs.items()}
            if made != locked["outputs"]:
                differ = sorted(r for r in set(made) | set(locked["outputs"]) if made.get(r) != locked["outputs"].get(r))
                self._finish(node, DIFFERS, f"its outputs differ from the lock's ({', '.join(differ[:3])}"
                             f"{'…' if len(differ) > 3 else ''}): not bit-reproducible here",
                             "the README's Reproducibility says what decides the bytes (device, thread "
                             "count, library versions, kind of CPU)")
                return
        self.records[node.id] = record
        self.done[node.id] = node.key
        self._materialize(node, record)
        self._finish(node, RAN if ran else CACHED, _describe(record), seconds=time.monotonic() - start)

    # -- outputs -------------------------------------------------------------------------------
    def _materialize(self, node: Node, record: Any) -> None:
        """Copy a step's outputs to out/<spec>/<step>/ (the store stays the source of truth)."""
        out = out_dir_for(self.loaded, node.id, self.out_root)
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

    def _finish(self, node: Node, status: str, message: str = "", hint: str | None = None,
                seconds: float = 0.0) -> None:
        self.summary.outcomes[node.id] = StepOutcome(node.id, status, message, hint, seconds)
        if status == AWAITING:
            detail = "waits for review"
        elif status in (FAILED, DIFFERS):
            detail = "failed (see below)" if status == FAILED else "differs from the lock (see below)"
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
        state = {"spec": str(self.loaded.path), "steps": steps, "updated": time.time()}
        if self.plan.compute is not None:  # what the keys of this run promise (exec.compute.recorded_compute)
            state["compute"] = self.plan.compute.to_json()
        self.store.write_state(self.loaded.name, state)


def _describe(record: Any) -> str:
    images = record.result.get("images") if isinstance(record.result, dict) else None
    return f"{len(images)} image(s)" if images is not None else f"{len(record.outputs)} file(s)"
