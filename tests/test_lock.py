"""Lockfiles and frozen runs (issue 15): `caspec lock`, `lock --check`, `run --frozen`."""
from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from caspec.cli import main

from fakeops import NoisyRoot, fake_ops

SPEC = """
version: 1
name: t
roots:
  r: {prompt: "alpha", candidates: 2}
  img: {prompt: "from a file", candidates: 1}
edits:
  e: {from: r, prompts: ["red"], candidates: 1}
"""


def make(tmp: Path, text: str = SPEC) -> Path:
    spec = tmp / "t.yaml"
    spec.write_text(textwrap.dedent(text))
    return spec


def cli(*args: str):
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return res.exit_code, res.stdout, res.stderr


def lock_of(spec: Path) -> dict:
    return json.loads(spec.with_name(spec.name + ".lock").read_text())


def test_lock_is_deterministic_sorted_and_fills_in_outputs(tmp_path):
    spec = make(tmp_path)
    with fake_ops():
        code, _, err = cli("lock", str(spec))
        assert code == 0 and "t.yaml.lock: 3 step(s), 0 with outputs" in err, err
        before = lock_of(spec)
        assert before["steps"]["e"]["provisional"] is True and "outputs" not in before["steps"]["r"]
        assert set(before["environment"]) == {"python", "torch", "diffusers", "transformers", "peft", "open_clip",
                                             "pillow", "safetensors", "device"}
        assert before["model"]["kind"] == "tiny" and before["spec"]["file"] == "t.yaml"
        assert cli("run", str(spec))[0] == 0
        assert cli("lock", str(spec))[0] == 0
        text = spec.with_name("t.yaml.lock").read_text()
        assert cli("lock", str(spec))[0] == 0
        assert spec.with_name("t.yaml.lock").read_text() == text  # the same bytes every time
    after = json.loads(text)
    assert list(after) == sorted(after) and list(after["steps"]) == sorted(after["steps"])
    assert set(after["steps"]["r"]["outputs"]) == {"c000.png", "c001.png"}
    assert "provisional" not in after["steps"]["e"] and after["steps"]["e"]["key"] != before["steps"]["e"]["key"]


def test_lock_check_says_current_or_lists_each_difference(tmp_path):
    spec = make(tmp_path)
    with fake_ops():
        cli("run", str(spec))
        cli("lock", str(spec))
        code, _, err = cli("lock", str(spec), "--check")
        assert code == 0 and "is current" in err
        spec.write_text(spec.read_text().replace('"alpha"', '"beta"'))
        code, _, err = cli("lock", str(spec), "--check")
    assert code == 4, err
    assert "step `r`: key" in err
    # the changed field, where it is, and both values (issue 28)
    assert re.search(r'spec: \S*t\.yaml:\d+:\d+: `roots\.r\.prompt`: "alpha" in the lock, "beta" here', err), err
    assert "hint: if the changes are intended, update the lock with `caspec lock" in err


def test_lock_check_on_a_comment_only_change_says_no_field_changed(tmp_path):
    spec = make(tmp_path)
    with fake_ops():
        cli("lock", str(spec))
        spec.write_text(spec.read_text() + "# a note\n")
        code, _, err = cli("lock", str(spec), "--check")
    assert code == 4 and "no field did (comments or layout only)" in err, err


def test_frozen_run_refuses_every_difference_before_running_anything(tmp_path):
    spec = make(tmp_path)
    with fake_ops():
        cli("run", str(spec))
        cli("lock", str(spec))
        code, _, err = cli("run", str(spec), "--frozen")
        assert code == 0 and "done: 3 cached" in err, err
        lock_file = spec.with_name("t.yaml.lock")
        lock = json.loads(lock_file.read_text())
        lock["environment"]["torch"] = "0.0.1"
        lock["steps"]["e"]["outputs"]["s0-p0-c0.png"] = "0" * 64
        lock_file.write_text(json.dumps(lock))
        spec.write_text(spec.read_text().replace('"red"', '"blue"'))
        code, _, err = cli("run", str(spec), "--frozen")
    assert code == 4, err
    assert "environment: torch 0.0.1 in the lock" in err and "\"red\" in the lock, \"blue\" here" in err
    assert "step `e`: key" in err or "step `e` would run" in err
    assert " ran " not in err and "done:" not in err  # nothing ran


def test_frozen_run_needs_outputs_in_the_lock_for_what_would_run(tmp_path):
    spec = make(tmp_path)
    with fake_ops():
        cli("lock", str(spec))  # locked before anything ran: no outputs
        code, _, err = cli("run", str(spec), "--frozen")
    assert code == 4 and "step `r` would run, and the lock holds no outputs for it" in err, err


def test_a_recipe_rerun_in_a_fresh_store_is_frozen_to_the_same_bytes(tmp_path):
    spec = make(tmp_path)
    with fake_ops():
        cli("run", str(spec))
        cli("lock", str(spec))
        code, _, err = cli("run", str(spec), "--frozen", "--store", str(tmp_path / "fresh"))
        assert code == 0 and "done: 3 ran" in err, err
        code, _, err = cli("lock", str(spec), "--check", "--store", str(tmp_path / "fresh"))
        assert code == 0, err


def test_outputs_that_differ_from_the_lock_fail_their_branch(tmp_path):
    spec = make(tmp_path)
    with fake_ops(root=NoisyRoot()):  # new bytes on every run, as CUDA sampling may give
        cli("run", str(spec))
        cli("lock", str(spec))
        code, _, err = cli("run", str(spec), "--frozen", "--store", str(tmp_path / "fresh"))
    assert code == 4, err
    assert "error: step `r` differs from the lock: its outputs differ from the lock's (c000.png, c001.png)" in err
    assert "not bit-reproducible here" in err
    e_line = next(line for line in err.splitlines() if line.split()[1:2] == ["e"])
    assert "blocked" in e_line


def test_bad_locks_are_clear_errors(tmp_path):
    spec = make(tmp_path)
    lock_file = spec.with_name("t.yaml.lock")
    with fake_ops():
        code, _, err = cli("run", str(spec), "--frozen")
        assert code == 2 and "t.yaml.lock: no lock file" in err and "caspec lock" in err
        lock_file.write_text('{"lock_version": 1,\n  "steps": {,}\n}')
        code, _, err = cli("run", str(spec), "--frozen")
        assert code == 2 and "t.yaml.lock:2:13: the lock is not valid JSON" in err, err
        lock_file.write_text(json.dumps({"lock_version": 1, "spec": {}, "environment": {}, "steps": {"r": {}}}))
        code, _, err = cli("lock", str(spec), "--check")
        assert code == 2 and "not a caspec lock: step `r` has no `kind` and `key`" in err, err
        lock_file.write_text(json.dumps({"lock_version": 9}))
        code, _, err = cli("run", str(spec), "--frozen")
        assert code == 2 and "lock_version 9" in err and "Traceback" not in err


GATED = """
version: 1
name: g
roots:
  r: {prompt: "alpha", candidates: 2}
select:
  picks: {from: r, count: 1}
"""


def test_a_changed_review_decision_is_a_difference(tmp_path):
    spec = make(tmp_path, GATED)
    with fake_ops():
        assert cli("run", str(spec))[0] == 3
        assert cli("review", str(spec), "--step", "picks", "--keep", "c000")[0] == 0
        assert cli("run", str(spec))[0] == 0
        assert cli("lock", str(spec))[0] == 0
        assert cli("run", str(spec), "--frozen")[0] == 0
        assert cli("review", str(spec), "--step", "picks", "--reject", "c000")[0] in (0, 3)
        assert cli("review", str(spec), "--step", "picks", "--keep", "c001")[0] in (0, 3)
        code, _, err = cli("run", str(spec), "--frozen")
    assert code == 4 and "step `picks`: the review decision changed" in err, err


TINY = """
version: 1
name: tinylock
model: tiny
defaults: {seed: 3, steps: 4, resolution: 32}
roots:
  robot: {prompt: "a photo of a robot", candidates: 1}
edits:
  colors: {from: robot, prompts: ["a photo of a red robot"], candidates: 1, strength: 0.5}
"""


@pytest.mark.slow
def test_tiny_frozen_rerun_in_a_fresh_store_gives_the_locked_bytes(tmp_path):
    spec = make(tmp_path, TINY)
    assert cli("run", str(spec))[0] == 0
    assert cli("lock", str(spec))[0] == 0
    code, _, err = cli("run", str(spec), "--frozen", "--store", str(tmp_path / "fresh"))
    assert code == 0 and "done: 2 ran" in err, err
    code, _, err = cli("run", str(spec), "--frozen", "--store", str(tmp_path / "other"), "--threads", "7")
    assert code == 4 and "step `robot`: key" in err, err  # another thread count: other keys, refused


def test_in_ci_a_pending_review_names_the_manifest_to_commit(tmp_path, monkeypatch):
    spec = make(tmp_path, GATED)
    monkeypatch.setenv("CI", "true")
    with fake_ops():
        code, _, err = cli("run", str(spec))
    assert code == 3, err
    assert "ci: fill in `" in err and "picks.yaml` (keep: true" in err and "commit it" in err, err
    monkeypatch.setenv("CI", "false")
    with fake_ops():
        code, _, err = cli("run", str(spec))
    assert code == 3 and "ci: fill in" not in err


def test_verify_reruns_in_a_scratch_store_and_prints_equal_or_different(tmp_path):
    spec = make(tmp_path)
    with fake_ops():
        cli("run", str(spec))
        cli("lock", str(spec))
        out_before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "out").rglob("*"))
        store_before = sorted(p.name for p in (tmp_path / ".caspec").rglob("*.json"))
        code, out, err = cli("verify", str(spec))
        assert code == 0, err
        rows = [line.split() for line in out.splitlines()[1:]]
        assert sorted((r[0], r[2]) for r in rows) == [("e", "equal"), ("img", "equal"), ("r", "equal")]
        code, out, _ = cli("verify", str(spec), "--step", "e", "--json")
        assert code == 0 and [r["step"] for r in json.loads(out)] == ["e"]
        assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "out").rglob("*")) == out_before
        assert sorted(p.name for p in (tmp_path / ".caspec").rglob("*.json")) == store_before
        spec.with_name("t.yaml.lock").rename(tmp_path / "moved.lock")
        code, _, err = cli("verify", str(spec))
        assert code == 2 and "no lock file" in err, err
        (tmp_path / "moved.lock").rename(spec.with_name("t.yaml.lock"))
        code, _, err = cli("verify", str(spec), "--step", "nope")
        assert code == 2 and ("did you mean" in err or "steps:" in err), err
    with fake_ops(root=NoisyRoot()):
        code, out, _ = cli("verify", str(spec), "--step", "r")
    assert code == 4 and "different" in out and "c000.png, c001.png" in out, out
