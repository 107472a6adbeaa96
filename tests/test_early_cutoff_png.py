"""Issue 28, item 1: an output's bytes hold nothing that changes when its pixels do not (no step key, no caspec
version in PNGs or cards), so changing one edit prompt re-runs only what that change reaches (early cutoff)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from caspec.cli import main

pytestmark = pytest.mark.slow

SPEC = """
version: 1
name: cut
model: tiny
defaults: {{seed: 4, steps: 4}}
roots:
  robot: {{prompt: "a photo of a robot", candidates: 1}}
edits:
  colors: {{from: robot, prompts: ["a green robot", "{second}"], candidates: 1}}
select:
  keep-green: {{from: colors, manifest: reviews/keep-green.yaml}}
concepts:
  bot:
    from: keep-green
    words: [{{token: "<bot>", init: robot}}]
    train: {{phase1_steps: 2, phase2_steps: 2, checkpoint_every: 0}}
compose:
  use: {{assets: [bot], prompts: ["a <bot> on mars"], images: 1}}
"""
MANIFEST = "spec: cut\nstep: keep-green\nsource: colors\ncandidates:\n  - {id: s0-p0-c0, keep: true}\n  - {id: s0-p1-c0, keep: false}\n"


def _run(spec):
    r = CliRunner().invoke(main, ["run", str(spec)], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    r = CliRunner().invoke(main, ["plan", str(spec), "--json"], catch_exceptions=False)
    return {s["id"]: s for s in json.loads(r.stdout)}


def test_changing_one_edit_prompt_reruns_only_that_branch(tmp_path, caspec_cache):
    spec = tmp_path / "cut.yaml"
    (tmp_path / "reviews").mkdir()
    (tmp_path / "reviews" / "keep-green.yaml").write_text(MANIFEST)
    spec.write_text(SPEC.format(second="a blue robot"))
    before = _run(spec)
    spec.write_text(SPEC.format(second="a teal robot"))  # the kept (green) image's pixels do not change
    (tmp_path / "reviews" / "keep-green.yaml").write_text(MANIFEST)  # the decision by id (the run filled digests)
    after_plan = CliRunner().invoke(main, ["plan", str(spec), "--json"], catch_exceptions=False)
    plan = {s["id"]: s for s in json.loads(after_plan.stdout)}
    assert plan["colors"]["status"] == "run"  # its params changed
    r = CliRunner().invoke(main, ["run", str(spec)], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    ran = {line.split()[1] for line in r.stderr.splitlines() if line.startswith("✓")}
    cached = {line.split()[1] for line in r.stderr.splitlines() if line.startswith("·")}
    assert "colors" in ran and "keep-green" in ran  # the edit and the selection over it re-ran...
    assert {"bot", "use"} <= cached, r.stderr  # ...and gave the same bytes: training and compose stay cached
    after = _run(spec)
    assert after["bot"]["key"] == before["bot"]["key"] and after["use"]["key"] == before["use"]["key"]
