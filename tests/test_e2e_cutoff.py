"""Early cutoff with the real ops on `tiny`: a forced root that re-makes the same bytes (CPU, same threads)
gives the same content digest, so the edit made from it stays cached."""
from __future__ import annotations

import textwrap

import pytest
from click.testing import CliRunner

from caspec.cli import main
from caspec.plan.graph import make_plan
from caspec.plan.keys import content_digest
from caspec.spec.load import load_spec
from caspec.store import LocalStore

pytestmark = pytest.mark.slow

SPEC = """
version: 1
name: cutoff
model: tiny
defaults: {seed: 7, steps: 4, resolution: 32}
roots:
  robot: {prompt: "a photo of a robot", candidates: 1}
edits:
  colors: {from: robot, prompts: ["a photo of a red robot"], candidates: 1, strength: 0.5}
"""


def test_forced_root_with_the_same_bytes_keeps_the_edit_cached(tmp_path):
    path = tmp_path / "cutoff.yaml"
    path.write_text(textwrap.dedent(SPEC))
    runner = CliRunner()
    first = runner.invoke(main, ["run", str(path)], catch_exceptions=False)
    assert first.exit_code == 0, first.stderr
    store = LocalStore(tmp_path / ".caspec")
    root_key = make_plan(load_spec(path), store).nodes["robot"].key
    before = content_digest(store.get(root_key))

    forced = runner.invoke(main, ["run", str(path), "--force", "robot"], catch_exceptions=False)
    assert forced.exit_code == 0, forced.stderr
    assert "1 ran, 1 cached" in forced.stderr  # the root ran again, the edit stayed cached
    assert content_digest(store.get(root_key)) == before
    edit = make_plan(load_spec(path), store).nodes["colors"]
    assert edit.status == "cached" and edit.material["upstream"] == {"source": before}  # keyed on content
