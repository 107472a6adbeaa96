"""CI reports: `caspec run --report FILE.md --junit FILE.xml` (issue 15), parsed with a real JUnit parser."""
from __future__ import annotations

import textwrap
from pathlib import Path
from types import SimpleNamespace

from click.testing import CliRunner
from junitparser import Failure, JUnitXml, Skipped

from caspec.cli import main
from caspec.exec.runner import RunSummary, StepOutcome
from caspec.report import junit, markdown

from fakeops import fake_ops

SPEC = """
version: 1
name: rep
roots:
  good: {prompt: "alpha", candidates: 1}
  bad: {prompt: "crash", candidates: 1}
edits:
  after-bad: {from: bad, prompts: ["red"], candidates: 1}
select:
  picks: {from: good, count: 1}
"""


def test_reports_of_a_run_with_a_failure_and_a_pending_review(tmp_path):
    spec = tmp_path / "rep.yaml"
    spec.write_text(textwrap.dedent(SPEC))
    md, xml = tmp_path / "ci" / "report.md", tmp_path / "ci" / "report.xml"
    with fake_ops():
        res = CliRunner().invoke(main, ["run", str(spec), "--report", str(md), "--junit", str(xml)])
    assert res.exit_code == 1, res.stderr
    assert "report: " in res.stderr
    suites = JUnitXml.fromfile(str(xml))
    cases = {case.name: case for suite in suites for case in suite}
    assert set(cases) == {"good", "bad", "after-bad", "picks"}
    assert cases["good"].is_passed and cases["good"].classname == "caspec.root"
    [failure] = cases["bad"].result
    assert isinstance(failure, Failure) and "boom" in failure.message and "hint:" in failure.text
    assert isinstance(cases["after-bad"].result[0], Skipped) and isinstance(cases["picks"].result[0], Skipped)
    suite = next(iter(suites))
    assert (suite.tests, suite.failures, suite.skipped) == (4, 1, 2)
    text = md.read_text()
    assert text.startswith("# caspec: `rep.yaml` (exit 1)")
    assert "| `bad` | root | ❌ failed |" in text and "| `good` | root | ✅ ran |" in text
    assert "⏸️ awaiting review" in text and "boom" in text


def _summary_with_eval(tmp_path: Path, status: str, metrics: dict | None):
    node = SimpleNamespace(id="quality", kind="eval", key="e" * 64,
                           params={"min_prompt_consistency": 0.2, "min_identity_consistency": 0.5})
    loaded = SimpleNamespace(path=tmp_path / "s.yaml", name="s", dir=tmp_path)
    plan = SimpleNamespace(order=lambda: [node], loaded=loaded, nodes={"quality": node})
    summary = RunSummary(plan)
    summary.outcomes["quality"] = StepOutcome("quality", status, "quality below threshold" if metrics is None else "", None, 1.5)
    record = SimpleNamespace(result={"metrics": metrics}) if metrics is not None else None
    return summary, SimpleNamespace(get=lambda key: record)


def test_each_eval_gate_is_a_testcase(tmp_path):
    summary, store = _summary_with_eval(tmp_path, "ran", {"robot": {"prompt_consistency": 0.31,
                                                                    "identity_consistency": 0.42}})
    xml = tmp_path / "r.xml"
    xml.write_text(junit(summary, store))
    cases = {c.name: c for s in JUnitXml.fromfile(str(xml)) for c in s}
    assert cases["quality: robot prompt_consistency >= 0.2"].is_passed
    [fail] = cases["quality: robot identity_consistency >= 0.5"].result
    assert fail.message == "identity_consistency 0.420 < 0.5"
    text = markdown(summary, store, tmp_path / "r.md")
    assert "| `quality` | robot | identity_consistency | 0.420 | ≥ 0.5 | ❌ |" in text

    failed, store = _summary_with_eval(tmp_path, "failed", None)
    xml.write_text(junit(failed, store))
    cases = {c.name: c for s in JUnitXml.fromfile(str(xml)) for c in s}
    gate = cases["quality: all identity_consistency >= 0.5"]
    assert "quality below threshold" in gate.result[0].message
