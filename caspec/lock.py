"""Lockfiles: what a spec resolved to, so that a run can be frozen to it (``uv lock`` / ``uv sync --locked``).

``caspec lock SPEC`` writes ``SPEC.lock`` beside the spec (``demo.yaml`` -> ``demo.yaml.lock``): sorted JSON,
one entry per step, holding the caspec version, the environment (Python and the libraries that decide the
bytes, the device), the model identity (digests of its files), what torch steps compute on, and per step its
kind, its key, the digests of its input files and review decision and, once it has run, of its outputs.
A lock is *current* when ``caspec lock`` would write the same file (``caspec lock --check``).

``caspec run --frozen`` refuses, before running anything, a spec, model, input, review decision or
environment that differs from the lock, and a step that would run while the lock holds no outputs for it;
while it runs, a step whose exact key or whose outputs differ from the lock fails. Both exit
:data:`~caspec.errors.EXIT_FROZEN` and list every difference.
"""
from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from . import __version__
from .errors import LockError, LockMismatch

LOCK_VERSION = 1
#: the libraries whose versions a lock pins (caspec's own version is recorded apart)
LOCKED_LIBRARIES = ("torch", "diffusers", "transformers", "peft", "open_clip", "pillow", "safetensors")


def lock_path(loaded: Any) -> Path:
    return loaded.path.with_name(loaded.path.name + ".lock")


def environment_now(plan: Any) -> dict[str, Any]:
    from .environment import library_versions

    versions = library_versions()
    env: dict[str, Any] = {"python": platform.python_version()}
    env.update({name: versions.get(name) for name in LOCKED_LIBRARIES})
    env["device"] = plan.compute.device if plan.compute is not None else None
    return env


def build_lock(plan: Any, store: Any) -> dict[str, Any]:
    """The lock of ``plan`` against ``store`` (read-only): see the module docstring."""
    from .store.hashing import sha256_bytes

    loaded = plan.loaded
    steps: dict[str, Any] = {}
    for node in plan.order():
        entry: dict[str, Any] = {"kind": node.kind, "key": node.key}
        if node.provisional:
            entry["provisional"] = True
        if node.input_digests:
            entry["inputs"] = dict(sorted(node.input_digests.items()))
        if node.gate is not None:
            entry["review"] = node.gate.material
        record = None if node.provisional else store.get(node.key)
        if record is not None:
            entry["outputs"] = {rel: o["digest"] for rel, o in sorted(record.outputs.items())}
        steps[node.id] = entry
    return {"lock_version": LOCK_VERSION, "caspec": __version__,
            "spec": {"file": loaded.path.name, "digest": sha256_bytes(loaded.text.encode("utf-8")),
                     "fields": loaded.spec.model_dump(mode="json", exclude_unset=True)},
            "environment": environment_now(plan), "model": plan.model_identity, "steps": steps}


def dumps(lock: dict[str, Any]) -> str:
    return json.dumps(lock, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_lock(path: Path, lock: dict[str, Any]) -> None:
    from .fsutil import atomic_write_text

    atomic_write_text(path, dumps(lock))


def read_lock(path: Path) -> dict[str, Any]:
    """The lock at ``path``; a missing, corrupt or hand-broken one is a :class:`LockError` naming the spot."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LockError(f"{path}: no lock file", hint=f"write one with `caspec lock {_spec_of(path)}`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LockError(f"{path}: cannot read the lock ({exc})") from None
    try:
        lock = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LockError(f"{path}:{exc.lineno}:{exc.colno}: the lock is not valid JSON ({exc.msg})",
                        hint=f"re-create it with `caspec lock {_spec_of(path)}`") from None
    problems = _shape_problems(lock)
    if problems:
        raise LockError(f"{path}: not a caspec lock: {problems[0]}",
                        hint=f"re-create it with `caspec lock {_spec_of(path)}`")
    return lock


def _spec_of(path: Path) -> str:
    return str(path)[: -len(".lock")] if str(path).endswith(".lock") else "SPEC"


def _shape_problems(lock: Any) -> list[str]:
    if not isinstance(lock, dict):
        return ["the top level is not an object"]
    if lock.get("lock_version") != LOCK_VERSION:
        return [f"lock_version {lock.get('lock_version')!r} (this caspec reads {LOCK_VERSION})"]
    for name, kind in (("spec", dict), ("environment", dict), ("steps", dict)):
        if not isinstance(lock.get(name), kind):
            return [f"`{name}` is missing or not an object"]
    for sid, entry in lock["steps"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str) or not isinstance(entry.get("kind"), str):
            return [f"step `{sid}` has no `kind` and `key`"]
        if "outputs" in entry and not isinstance(entry["outputs"], dict):
            return [f"step `{sid}`: `outputs` is not an object"]
    return []


def differences(old: dict[str, Any], new: dict[str, Any], *, frozen_plan: Any = None,
                where: Any = None) -> list[str]:
    """Every way ``new`` (this spec, here, now) differs from the lock ``old``, in words.

    With ``frozen_plan``: what ``run --frozen`` refuses (keys of steps that will be re-keyed are compared
    while running, outputs the store does not hold yet are fine where the lock has them). ``where``: spec
    field path -> ``FILE:LINE:COL``, to point at each changed field."""
    out: list[str] = []
    if old["spec"].get("digest") != new["spec"]["digest"]:
        out += _spec_differences(old["spec"], new["spec"], where)
    for name in sorted(set(old["environment"]) | set(new["environment"])):
        a, b = old["environment"].get(name), new["environment"].get(name)
        if a != b:
            out.append(f"environment: {name} {a} in the lock, {b} here")
    if old.get("model") != new.get("model"):
        out.append("model: " + _model_difference(old.get("model"), new.get("model")))
    old_steps, new_steps = old["steps"], new["steps"]
    for sid in sorted(set(old_steps) - set(new_steps)):
        out.append(f"step `{sid}`: in the lock, not in the spec")
    for sid in sorted(set(new_steps) - set(old_steps)):
        out.append(f"step `{sid}`: in the spec, not in the lock")
    for sid in (s for s in new_steps if s in old_steps):
        out += _step_differences(sid, old_steps[sid], new_steps[sid], frozen_plan)
    return out


#: at most this many changed spec fields are listed one by one
SHOWN_FIELDS = 12


def _spec_differences(old: dict[str, Any], new: dict[str, Any], where: Any) -> list[str]:
    """The spec's changed fields, each with both values (a lock written before fields were kept: the file)."""
    file = new["file"]
    if not isinstance(old.get("fields"), dict):
        return [f"spec: {file} changed since it was locked (this lock does not keep the spec's fields; "
                "`caspec lock` writes one that does)"]
    changed = list(_field_changes(old["fields"], new["fields"], ()))
    if not changed:
        return [f"spec: {file} changed since it was locked, but no field did (comments or layout only)"]
    out = []
    for path, a, b in changed[:SHOWN_FIELDS]:
        at = f"{where(path)}: " if where is not None else ""
        out.append(f"spec: {at}`{_dotted(path)}`: {_value(a)} in the lock, {_value(b)} here")
    if len(changed) > SHOWN_FIELDS:
        out.append(f"spec: and {len(changed) - SHOWN_FIELDS} more changed fields")
    return out


_ABSENT = object()


def _field_changes(a: Any, b: Any, path: tuple) -> Any:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            yield from _field_changes(a.get(k, _ABSENT), b.get(k, _ABSENT), path + (k,))
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from _field_changes(x, y, path + (i,))
    elif a != b:
        yield path, a, b


def _dotted(path: tuple) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(the whole spec)"


def _value(v: Any) -> str:
    if v is _ABSENT:
        return "not set"
    text = json.dumps(v, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def _model_difference(a: Any, b: Any) -> str:
    from .models.load import identity_differences

    diffs = identity_differences(a, b) if isinstance(a, dict) and isinstance(b, dict) else []
    return "; ".join(diffs) if diffs else f"identity {json.dumps(a, sort_keys=True)[:80]} in the lock, other here"


def _step_differences(sid: str, old: dict[str, Any], new: dict[str, Any], frozen_plan: Any) -> list[str]:
    out = []
    if old.get("kind") != new["kind"]:
        out.append(f"step `{sid}`: kind {old.get('kind')} in the lock, {new['kind']} here")
    for role in sorted(set(old.get("inputs", {})) | set(new.get("inputs", {}))):
        if old.get("inputs", {}).get(role) != new.get("inputs", {}).get(role):
            out.append(f"step `{sid}`: input `{role}` changed")
    if old.get("review") != new.get("review") and not new.get("provisional"):
        out.append(f"step `{sid}`: the review decision changed")
    if frozen_plan is None:
        if old.get("key") != new["key"] or bool(old.get("provisional")) != bool(new.get("provisional")):
            out.append(f"step `{sid}`: key {_short(old)} in the lock, {_short(new)} here")
        elif old.get("outputs") != new.get("outputs"):
            out.append(f"step `{sid}`: " + ("has run since it was locked" if "outputs" not in old
                                            else "its outputs in the store differ from the lock's"))
        return out
    node = frozen_plan.nodes[sid]
    if not new.get("provisional") and old.get("key") != new["key"]:
        out.append(f"step `{sid}`: key {_short(old)} in the lock, {_short(new)} here")
    elif node.status != "cached" and "outputs" not in old:
        out.append(f"step `{sid}` would run, and the lock holds no outputs for it")
    return out


def _short(entry: dict[str, Any]) -> str:
    return ("~" if entry.get("provisional") else "") + str(entry.get("key", ""))[:12]


def check_current(plan: Any, store: Any, path: Path) -> list[str]:
    """Differences between the lock at ``path`` and what ``caspec lock`` would write now (empty: current)."""
    return differences(read_lock(path), build_lock(plan, store), where=plan.loaded.where)


def check_frozen(plan: Any, store: Any, path: Path) -> dict[str, Any]:
    """The lock, if ``plan`` may run frozen to it; else :class:`LockMismatch` listing every difference."""
    lock = read_lock(path)
    diffs = differences(lock, build_lock(plan, store), frozen_plan=plan, where=plan.loaded.where)
    if diffs:
        raise LockMismatch(path, diffs)
    return lock


__all__ = ["LOCK_VERSION", "LOCKED_LIBRARIES", "lock_path", "build_lock", "dumps", "write_lock", "read_lock",
           "differences", "check_current", "check_frozen"]


def verify(loaded: Any, lock: dict[str, Any], *, steps: tuple[str, ...] = (), executor: Any = None,
           reporter: Any = None) -> list[dict[str, Any]]:
    """Re-run ``steps`` (default: every step the lock holds outputs for), with what they need, in a scratch
    store and a scratch ``out/``, and compare each one's output digests with the lock's.

    Returns one row per step: ``{"step", "kind", "result", "detail"}`` with ``result`` ``equal``,
    ``different`` (``detail`` names the files), ``not-run`` (it failed, or waits for a review) or
    ``not-locked`` (the lock holds no outputs for it)."""
    import tempfile

    from .exec.runner import check_step_ids, run
    from .plan.graph import make_plan
    from .store import LocalStore

    locked = lock["steps"]
    with tempfile.TemporaryDirectory(prefix="caspec-verify-") as tmp:
        scratch = LocalStore(Path(tmp) / "store")
        compute = executor.compute(loaded) if executor is not None else None
        plan = make_plan(loaded, scratch, compute=compute)
        check_step_ids(plan, steps, "--step")
        chosen = steps or tuple(sid for sid in plan.nodes if "outputs" in locked.get(sid, {}))
        summary = run(loaded, scratch, until=chosen, plan=plan, executor=executor, reporter=reporter,
                      out_root=Path(tmp) / "out")
        rows = []
        for sid in chosen:
            node = plan.nodes[sid]
            row = {"step": sid, "kind": node.kind}
            want = locked.get(sid, {}).get("outputs")
            record = scratch.get(node.key) if summary.outcomes.get(sid) and summary.outcomes[sid].status in (
                "ran", "cached") else None
            if want is None:
                row.update(result="not-locked", detail="the lock holds no outputs for it")
            elif record is None:
                outcome = summary.outcomes.get(sid)
                row.update(result="not-run", detail=outcome.message if outcome else "")
            else:
                made = {rel: o["digest"] for rel, o in record.outputs.items()}
                differ = sorted(r for r in set(made) | set(want) if made.get(r) != want.get(r))
                row.update(result="equal" if not differ else "different",
                           detail=", ".join(differ[:4]) + ("…" if len(differ) > 4 else ""))
            rows.append(row)
    return rows
