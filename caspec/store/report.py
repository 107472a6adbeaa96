"""Store-level reports for the CLI: `caspec status` (a summary) and `caspec gc` (what no spec needs)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import CaspecError


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _state_names(store: Any) -> list[str]:
    """Specs with saved state: the store's own listing (remote stores), else its local state/ dir."""
    if hasattr(store, "state_names"):
        return store.state_names()
    state_dir = store.root / "state"
    return [p.stem for p in sorted(state_dir.glob("*.json"))] if state_dir.is_dir() else []


def _recorded_specs(store: Any) -> dict[str, dict[str, Any]]:
    return {name: store.read_state(name) for name in _state_names(store)}


def store_summary(store: Any) -> str:
    records = list(store.records())
    digests = {o["digest"]: o["size"] for r in records for o in r.outputs.values()}
    lines = [f"store: {getattr(store, 'url', store.root)}", f"entries: {len(records)} steps, {len(digests)} objects, {_size(sum(digests.values()))}"]
    for name, state in _recorded_specs(store).items():
        steps = state.get("steps", {})
        cached = sum(1 for v in steps.values() if store.has(v.get("key", "")))
        lines.append(f"spec {name}: {cached}/{len(steps)} steps of the last run cached ({state.get('spec', '?')})")
    return "\n".join(lines)


def live_keys(store: Any, loaded_specs: list[Any]) -> set[str]:
    """Keys that some current spec needs: the plans of the given specs and of every recorded spec on disk.
    A recorded spec that no longer loads keeps its last run's keys (never delete on a typo)."""
    from ..spec.load import load_spec

    keep: set[str] = set()
    seen: set[Path] = set()
    for loaded in loaded_specs:
        keep |= _plan_keys(loaded, store)
        seen.add(loaded.path)
    for state in _recorded_specs(store).values():
        path = Path(state.get("spec", ""))
        if path in seen or not path.is_file():
            continue
        try:
            keep |= _plan_keys(load_spec(path), store)
        except CaspecError:
            keep |= {v.get("key", "") for v in state.get("steps", {}).values()}
    return keep


def _plan_keys(loaded: Any, store: Any) -> set[str]:
    """The keys of ``loaded``'s plan here, and under the compute of its last run if that differs (a Ray
    run's CPU steps keyed for 1 thread each)."""
    from ..plan.graph import last_run_plan, make_plan

    plan = make_plan(loaded, store)
    keys = {n.key for n in plan.order()}
    if (last := last_run_plan(loaded, store, plan)) is not None:
        keys |= {n.key for n in last.order()}
    return keys


def _stale_checkpoints(store: Any, keep: set[str]) -> list[Path]:
    """Checkpoint folders of keys no spec needs; none where the store's local root is shared with other
    stores (a remote store's object cache), whose running steps' checkpoints must survive this gc."""
    if getattr(store, "shares_root", False):
        return []
    root = store.root / "checkpoints"
    return [d for d in sorted(root.iterdir()) if d.name not in keep] if root.is_dir() else []


def collect_garbage(store: Any, loaded_specs: list[Any], *, dry_run: bool) -> str:
    import shutil

    keep = live_keys(store, loaded_specs)
    report = store.gc(keep, dry_run=dry_run)
    for folder in _stale_checkpoints(store, keep):  # resumable training state of steps no spec needs
        report.bytes_freed += sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        report.temp_dirs.append(str(folder))
        if not dry_run:
            shutil.rmtree(folder, ignore_errors=True)
    verb = "would remove" if dry_run else "removed"
    lines = [f"{verb} {len(report.records)} step(s), {len(report.objects)} object(s), "
             f"{len(report.temp_dirs)} temp dir(s); {'would free' if dry_run else 'freed'} "
             f"{report.bytes_freed} bytes ({_size(report.bytes_freed)})"]
    if dry_run:
        lines += [f"  step {k[:12]}" for k in report.records]
    return "\n".join(lines)


__all__ = ["store_summary", "collect_garbage", "live_keys"]
