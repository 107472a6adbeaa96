"""Running one step, wherever it runs: in the driver (local executor) or in a Ray worker.

A :class:`StepJob` holds everything a step needs (its planned node with its exact key, the spec, the keys
of the upstream records it reads, the model identity and compute its key promises) and pickles, so
:func:`execute_job` can run it in another process or on another machine against the same store.

Per job: take the key's lock (a lease on a remote store), re-check the store (another run may have
finished it), check that this machine resolves the spec's model to the identity the key promises, set
the thread count the key promises, run the op into a staging dir, commit (objects first, action record
last; the first record committed for a key wins), then drop the step's checkpoints. Errors become a
:class:`JobResult`; nothing is raised but ``KeyboardInterrupt``.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import __version__
from ..errors import CaspecError, ReviewPending
from ..ops.base import RunContext, UpstreamView
from . import compute as compute_mod
from .cpu_slots import cpu_slots

OK, PENDING_REVIEW, ERROR = "ok", "awaiting-review", "error"


@dataclass
class StepJob:
    node: Any  # plan.graph.Node, re-keyed: its key is exact
    loaded: Any  # spec.load.LoadedSpec
    upstream_keys: dict[str, str]  # role -> key of the upstream record the step reads
    model_identity: dict[str, Any] | None
    compute: dict[str, Any] | None  # what the key promises (exec.compute)
    forced: bool = False
    check_identity: bool = False  # resolve the model here and compare (a worker, not the driver)
    source_out_dir: Path | None = None  # a gate's upstream outputs, laid out by the driver
    # role -> content digest of the upstream record the key was made from (plan.keys.content_digest): the
    # job checks that what it reads is that content (a concurrent --force may have replaced the record)
    upstream_contents: dict[str, str] | None = None


@dataclass
class JobResult:
    step_id: str
    key: str
    status: str  # OK, PENDING_REVIEW or ERROR
    ran: bool = False  # the op ran here (False: the record was already in the store)
    message: str = ""
    hint: str | None = None
    warnings: list[str] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0
    record: Any = None  # the committed record (in-process only; a worker leaves it to the driver to read)


def checkpoint_dir(store: Any, key: str) -> Path:
    """Where a long step (training) keeps resumable checkpoints: survives a crash, removed after commit."""
    return store.root / "checkpoints" / key


def out_dir_for(loaded: Any, step_id: str, root: Path | None = None) -> Path:
    """Where a step's outputs are laid out: ``out/<spec>/<step>/`` beside the spec (or under ``root``)."""
    return (root if root is not None else loaded.dir / "out") / loaded.name / step_id


def execute_job(job: StepJob, store: Any, *, progress: Callable[..., None] | None = None,
                notify: Callable[[str], None] | None = None) -> JobResult:
    """Run ``job`` against ``store`` (see the module docstring). ``notify`` shows a line at once (waiting
    for CPU slots); other warnings come back in the result."""
    node = job.node
    result = JobResult(node.id, node.key, OK, started=time.time())
    warn = result.warnings.append
    try:
        record, ran = _cached_or_run(job, store, warn, progress, notify or warn)
        result.ran, result.record = ran, record
    except ReviewPending as exc:
        result.status, result.message, result.hint = PENDING_REVIEW, exc.message, exc.hint
    except CaspecError as exc:
        result.status, result.message, result.hint = ERROR, exc.message, exc.hint
    except Exception as exc:  # an op crashed: keep the traceback in a log, report one line
        log = write_log(store, node, traceback.format_exc())
        result.status, result.message = ERROR, f"{type(exc).__name__}: {exc}"
        result.hint = f"full traceback in `{log}`" + (f" on {socket.gethostname()}" if job.check_identity else "")
    result.finished = time.time()
    return result


def usable_record(store: Any, key: str, step_id: str, warn: Callable[[str], None] | None) -> Any:
    """The store's record of ``key`` if it is intact; a corrupt one is dropped (and said, unless quiet)."""
    record = store.get(key)
    if record is None:
        return None
    bad = store.verify(record)
    if not bad:
        return record
    if warn is not None:
        warn(f"store entry of `{step_id}` ({key[:12]}) is corrupted "
             f"({', '.join(bad[:3])}{'…' if len(bad) > 3 else ''}); running it again")
    store.drop(key)
    return None


def _cached_or_run(job: StepJob, store: Any, warn: Callable[[str], None], progress: Any,
                   notify: Callable[[str], None]) -> tuple[Any, bool]:
    node = job.node  # the driver found no usable record before submitting the job
    with store.lock(node.key):
        if not job.forced:  # someone may have finished it while we waited for the lock
            record = usable_record(store, node.key, node.id, None)
            if record is not None:
                return record, False
        return _run_op(job, store, warn, progress, notify), True


def _run_op(job: StepJob, store: Any, warn: Callable[[str], None], progress: Any,
            notify: Callable[[str], None]) -> Any:
    node, loaded = job.node, job.loaded
    if job.check_identity:
        check_here(job)
    upstream = {role: UpstreamView(_upstream_record(store, key, role, (job.upstream_contents or {}).get(role)))
                for role, key in job.upstream_keys.items()}
    threads = (job.compute or {}).get("threads")
    slots = cpu_slots(threads, on_wait=notify) if threads else contextlib.nullcontext()
    with slots, store.staging(node.key) as staged:
        start, started = time.monotonic(), time.time()
        compute_mod.apply(job.compute)
        ctx = _context(job, store, staged, upstream, progress)
        result = node.op.run(ctx)
        from ..environment import environment  # here, not at import: a cached run never needs it

        meta = {"step_id": node.id, "spec": loaded.name, "caspec": __version__,
                "seconds": round(time.monotonic() - start, 3), "started": started, "finished": time.time(),
                "host": socket.gethostname(), "pid": os.getpid(),
                "environment": environment(_device(job))}
        if ctx.meta:
            meta["run"] = ctx.meta
        record = store.commit(node.key, staged, kind=node.kind, material=node.material,
                              result=result, meta=meta, overwrite=job.forced)
    if not record.committed:  # first record wins: another run committed this key while we ran
        warn(f"`{node.id}`: another run committed key {node.key[:12]} first; using its outputs")
    shutil.rmtree(checkpoint_dir(store, node.key), ignore_errors=True)  # only after the commit
    return record


def _upstream_record(store: Any, key: str, role: str, content: str | None = None) -> Any:
    """The upstream record the step reads, and only if it holds the content the step's key was made from."""
    from ..plan.keys import content_digest

    record = store.get(key)
    if record is None:
        raise CaspecError(f"the upstream record `{role}` ({key[:12]}) is not in the store {store!r}",
                          hint="the store this machine sees is not the one the run was planned against")
    if content is not None and content_digest(record) != content:
        raise CaspecError(f"the upstream record `{role}` ({key[:12]}) changed after this step was keyed from it "
                          "(another process replaced it, e.g. with --force): nothing was committed",
                          hint="run again: the step is re-planned from the upstream outputs as they are now")
    return record


_IDENTITIES: dict[tuple[str, str], Any] = {}  # per process: (model spec, spec dir) -> identity


def check_here(job: StepJob) -> None:
    """Refuse to run a step on a machine whose model, or device, is not the one its key promises."""
    loaded, node = job.loaded, job.node
    model = node.model or loaded.spec.model
    if node.op.USES_MODEL and job.model_identity is not None:
        from ..models.load import identity_differences, model_identity

        memo = (model.model_dump_json(), str(loaded.dir))
        if memo not in _IDENTITIES:
            _IDENTITIES[memo] = model_identity(model, loaded.dir)
        here = _IDENTITIES[memo]
        if here != job.model_identity:
            diffs = identity_differences(job.model_identity, here) or [
                f"dtype: {job.model_identity.get('dtype')} vs {here.get('dtype')}"]
            raise CaspecError(f"the model `{model.base}` resolves on "
                              f"{socket.gethostname()} to other weights than on the driver "
                              f"(driver vs worker: {'; '.join(diffs)})",
                              hint="give every worker the same model files (the same hub cache or folder)")
    if job.compute and job.compute.get("device"):
        from ..models.load import resolve_device

        device = resolve_device(model)
        if device != job.compute["device"]:
            raise CaspecError(f"`{node.id}` is keyed for device {job.compute['device']}, but "
                              f"{socket.gethostname()} resolves the model's device to {device}",
                              hint="set `model.device` in the spec, or run where that device is")


def _device(job: StepJob) -> str | None:
    """The device the step computed on: the spec model's, for a step that uses the model or ran with torch
    loaded (CLIP runs where the model does); None for a step that did no torch work."""
    if not job.node.op.USES_MODEL and "torch" not in sys.modules:
        return None
    from ..models.load import resolve_device

    return resolve_device(job.loaded.spec.model)


def _context(job: StepJob, store: Any, staged: Path, upstream: dict[str, Any], progress: Any) -> RunContext:
    node, loaded = job.node, job.loaded
    extra: dict[str, Any] = {"spec_path": rel(loaded.path), "model_identity": job.model_identity,
                             "checkpoint_dir": checkpoint_dir(store, node.key),
                             "where": lambda *path: loaded.where((node.section, node.id, *path)),
                             "step": node.step}
    if node.gate is not None:
        source_id = node.upstream.get("source", "")
        extra.update(manifest=node.gate.manifest, decision=node.gate.material, source_id=source_id,
                     source_out_dir=job.source_out_dir or out_dir_for(loaded, source_id))
    kwargs = {"progress": progress} if progress is not None else {}
    return RunContext(step_id=node.id, spec_name=loaded.name, key=node.key, params=node.params,
                      out_dir=staged, spec_dir=loaded.dir, model=node.model or loaded.spec.model,
                      upstream=upstream, inputs=dict(node.inputs), extra=extra, **kwargs)


def write_log(store: Any, node: Any, text: str) -> str:
    logs = store.root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / f"{node.id}-{node.short_key}.log"
    path.write_text(text)
    return rel(path)


def rel(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:  # pragma: no cover
        return str(path)
