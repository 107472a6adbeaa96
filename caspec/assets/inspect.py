"""`caspec assets list|show`: find concept assets (finished `train` steps) and describe them."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import UsageError


@dataclass
class AssetInfo:
    name: str
    key: str
    folder: Path          # the readable copy under out/, or the folder given
    card: dict[str, Any]
    size: int

    def tokens(self) -> list[str]:
        return [w["token"] for w in self.card.get("pseudo_words", [])]

    def summary(self) -> str:
        base = self.card.get("base_model", {}).get("base", "?")
        loss = (self.card.get("result") or {}).get("final_loss")
        loss_text = f"{loss:.4f}" if isinstance(loss, (int, float)) else "?"
        return f"{self.name}\t{' '.join(self.tokens())}\t{base}\tloss {loss_text}\t{_rel(self.folder)}"

    def describe(self) -> str:
        card = self.card
        result = card.get("result") or {}
        lines = [f"asset: {self.name}", f"key: {self.key}", f"folder: {_rel(self.folder)}",
                 f"base model: {card.get('base_model', {}).get('base', '?')}", f"size: {self.size} bytes",
                 "pseudo-words:"]
        lines += [f"  {w['token']:<16} {w['role']:<9} init `{w['init']}`" for w in card.get("pseudo_words", [])]
        lines.append(f"captions: {' | '.join(card.get('captions', []))}")
        lines.append(f"loss: {result.get('initial_loss')} -> {result.get('final_loss')} over {result.get('steps')} steps")
        lines.append(f"previews: {_rel(self.folder / 'previews')}")
        return "\n".join(lines)


def _rel(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:  # pragma: no cover
        return str(path)


def _from_folder(folder: Path) -> AssetInfo:
    card_path = folder / "card.yaml"
    if not card_path.is_file():
        raise UsageError(f"`{folder}` is not a concept asset (no card.yaml)")
    card = yaml.safe_load(card_path.read_text()) or {}
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return AssetInfo(folder.name, str(card.get("key", "")), folder, card, size)


def spec_assets(loaded: Any, store: Any) -> list[AssetInfo]:
    """The finished assets of a spec's `concepts` steps (current keys: here, or as its last run keyed them)."""
    from ..exec.runner import out_dir_for
    from ..plan.graph import last_run_plan, make_plan

    out = []
    plan = make_plan(loaded, store)
    last = last_run_plan(loaded, store, plan)
    other = last.nodes if last is not None else {}
    for node in plan.order():
        record = store.get(node.key) if node.kind == "train" else None
        if record is None and node.id in other:  # built by a run with other threads (e.g. Ray's 1 per task)
            node = other[node.id]
            record = store.get(node.key) if node.kind == "train" else None
        if record is None:
            continue
        card = yaml.safe_load(record.file("card.yaml").read_text()) if "card.yaml" in record.outputs else {}
        size = sum(o["size"] for o in record.outputs.values())
        out.append(AssetInfo(node.id, node.key, out_dir_for(loaded, node.id), card, size))
    return out


def find_asset(name: str, loaded: Any | None, store: Any) -> AssetInfo:
    """An asset by folder path, or by step name in a spec."""
    path = Path(name)
    if path.is_dir():
        return _from_folder(path)
    if loaded is None:
        raise UsageError(f"no asset folder `{name}`", hint="give an asset folder, or `--spec SPEC` to look it up by name")
    assets = {a.name: a for a in spec_assets(loaded, store)}
    if name not in assets:
        raise UsageError(f"no finished concept asset `{name}` in {loaded.path.name}",
                         hint=f"assets: {', '.join(assets) or 'none finished yet (run the spec first)'}")
    return assets[name]
