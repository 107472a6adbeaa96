"""recipes/ci/github-actions.yml cannot rot: its `run:` commands run in order, in a shell, on the toy model."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "recipes" / "ci" / "github-actions.yml"

SPEC = """
version: 1
name: ci-toy
model: toy
defaults: {seed: 3, steps: 8}
roots:
  star: {prompt: "a red star", candidates: 1}
edits:
  colors: {from: star, prompts: ["a blue star"], candidates: 1}
"""


@pytest.mark.slow
def test_the_workflow_s_run_commands_pass_in_order(tmp_path):
    flow = yaml.safe_load(WORKFLOW.read_text())
    job = flow["jobs"]["build"]
    steps = [s for s in job["steps"] if "run" in s]
    assert [s["name"] for s in steps][:2] == ["Install caspec", "Store cache key from the lock"]
    uses = [s["uses"].split("@")[0] for s in job["steps"] if "uses" in s]
    assert uses == ["actions/checkout", "actions/setup-python", "actions/cache", "actions/upload-artifact"]

    spec = tmp_path / "ci-toy.yaml"
    spec.write_text(SPEC)
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, **{k: str(v) for k, v in job["env"].items()}, "SPEC": str(spec), "CI": "true",
           "CASPEC_STORE": str(tmp_path / "store"), "GITHUB_OUTPUT": str(tmp_path / "gh-output"),
           "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md"), "PATH": bin_dir + os.pathsep + os.environ["PATH"]}
    # what the repository holds before CI runs: the spec, built once, and its lock
    for cmd in (["caspec", "run", str(spec)], ["caspec", "lock", str(spec)]):
        done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    for step in steps:
        done = subprocess.run(["bash", "-e", "-c", step["run"]], env=env, cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, f"{step['name']}: {done.stderr[-2000:]}"
    assert (tmp_path / "gh-output").read_text().startswith("key=caspec-store-")
    assert "# caspec: `ci-toy.yaml` (passed)" in (tmp_path / "summary.md").read_text()
    junit = ROOT / "caspec-junit.xml"
    try:
        from junitparser import JUnitXml

        assert {c.name for s in JUnitXml.fromfile(str(junit)) for c in s} == {"star", "colors"}
    finally:
        junit.unlink(missing_ok=True)
