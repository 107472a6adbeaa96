"""Golden tests: each bad spec under tests/golden/errors renders exactly its .expected text.

Regenerate the expectations with ``CASPEC_UPDATE_GOLDEN=1 pytest tests/test_spec_errors.py``,
then read the diff: each must show the right line, column, caret and a useful hint.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

from caspec.errors import EXIT_BAD_SPEC, SpecError, UsageError
from caspec.spec.load import MAX_BYTES, load_spec, load_spec_text

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "errors"
CASES = sorted(p.stem for p in GOLDEN.glob("*.yaml"))
UPDATE = bool(os.environ.get("CASPEC_UPDATE_GOLDEN"))


@pytest.fixture
def at_root(monkeypatch):
    """Run from the repo root so that spec paths (and so messages) are relative, whatever pytest's cwd."""
    monkeypatch.chdir(ROOT)


def _render_error(rel: str) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(rel)
    assert info.value.exit_code == EXIT_BAD_SPEC
    return info.value.render() + "\n"


def test_golden_cases_exist():
    expected = {p.stem for p in GOLDEN.glob("*.expected")}
    assert len(CASES) >= 16
    assert set(CASES) == expected, "every golden .yaml needs a .expected (CASPEC_UPDATE_GOLDEN=1 writes them)"


def _skip_without_libyaml(case: str) -> None:
    if case.startswith("yaml_syntax") and not hasattr(yaml, "CSafeLoader"):
        pytest.skip("YAML syntax messages are libyaml's; the pure-Python parser words them differently")


@pytest.mark.parametrize("case", CASES)
def test_golden(case, at_root):
    _skip_without_libyaml(case)
    got = _render_error(f"tests/golden/errors/{case}.yaml")
    expected_file = GOLDEN / f"{case}.expected"
    if UPDATE:
        expected_file.write_text(got, encoding="utf-8")
    assert got == expected_file.read_text(encoding="utf-8")


@pytest.mark.parametrize("case", CASES)
def test_text_loader_agrees(case, at_root):
    """load_spec_text reports the same problems as load_spec."""
    _skip_without_libyaml(case)
    rel = f"tests/golden/errors/{case}.yaml"
    with pytest.raises(SpecError) as info:
        load_spec_text((ROOT / rel).read_text(encoding="utf-8"), rel)
    assert info.value.render() + "\n" == (GOLDEN / f"{case}.expected").read_text(encoding="utf-8")


def test_too_large_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("big.yaml").write_text("# padding\n" + "x" * (2 * MAX_BYTES) + "\n", encoding="utf-8")
    start = time.perf_counter()
    got = _render_error("big.yaml")
    assert time.perf_counter() - start < 0.5
    assert got == (
        "big.yaml: error: file is too large for a spec (2.0 MiB; the limit is 1 MiB)\n"
        "hint: a spec is a small YAML file of steps; is this the right file?\n"
    )


def test_too_large_text():
    with pytest.raises(SpecError, match="too large"):
        load_spec_text("a: " + "x" * MAX_BYTES, "big.yaml")


def test_missing_file(tmp_path):
    with pytest.raises(UsageError) as info:
        load_spec(tmp_path / "nope.yaml")
    assert "not found" in info.value.message and info.value.hint
    assert info.value.exit_code == EXIT_BAD_SPEC


def test_directory(tmp_path):
    with pytest.raises(UsageError, match="directory"):
        load_spec(tmp_path)


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"version: 1\ndescription: caf\xe9\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    problem = info.value.problems[0]
    assert (problem.line, problem.col) == (2, 17)
    assert "UTF-8" in problem.message


def test_relative_path_in_messages(tmp_path, monkeypatch):
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "demo.yaml").write_text("version: 3\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError) as info:
        load_spec(Path("specs/demo.yaml"))
    assert info.value.render().startswith("specs/demo.yaml:1:10: error: version:")


def test_problems_sorted_and_all_collected(at_root):
    with pytest.raises(SpecError) as info:
        load_spec("tests/golden/errors/multiple.yaml")
    problems = info.value.problems
    assert len(problems) == 4
    assert [p.line for p in problems] == sorted(p.line for p in problems)


def test_later_phases_do_not_run():
    text = (
        "version: 1\n"
        "roots:\n"
        "  robot:\n"
        "    prompt: '{{ nope }}'\n"
        "    candidates: 0\n"
        "    strenght: 1\n"
    )
    with pytest.raises(SpecError) as info:
        load_spec_text(text, "x.yaml")
    assert [p.message for p in info.value.problems] == ["undefined template variable `nope`"]


def test_duplicate_keys_all_reported():
    text = "version: 1\nversion: 1\nroots:\n  r:\n    prompt: a\n    prompt: b\n"
    with pytest.raises(SpecError) as info:
        load_spec_text(text, "x.yaml")
    assert [(p.line, p.col) for p in info.value.problems] == [(2, 1), (6, 5)]
    assert info.value.problems[1].message == "duplicate key `prompt` (first at line 5)"
