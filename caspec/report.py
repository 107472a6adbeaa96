"""CI reports of a run: a markdown summary (for ``$GITHUB_STEP_SUMMARY``) and JUnit XML.

``caspec run --report report.md`` writes each step's status and time, each eval step's metrics against its
gates, and thumbnails of compose outputs (links into ``out/``, relative to the report). ``--junit
report.xml`` writes one testcase per step (classname ``caspec.<kind>``) and one per eval gate; a failed step
or gate carries its message and hint in ``<failure>``; a step stopped by a review gate or a blocked one is
``<skipped>``. Both are written after the run, whatever its exit code.
"""
from __future__ import annotations

import html
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from .exec.step import out_dir_for

GATES = (("prompt_consistency", "min_prompt_consistency"), ("identity_consistency", "min_identity_consistency"))
_MARK = {"ran": "✅ ran", "cached": "♻️ cached", "failed": "❌ failed", "differs-from-lock": "❌ differs from lock",
         "awaiting-review": "⏸️ awaiting review", "blocked": "⏭️ blocked", "would-run": "→ would run"}


def eval_gates(summary: Any, store: Any) -> list[dict[str, Any]]:
    """One row per eval step, group and gated metric: ``{step, group, metric, value, bar, passed}``
    (``group`` None and ``value`` None when the step did not finish: then it fails with the step)."""
    rows = []
    for node in summary.plan.order():
        if node.kind != "eval" or node.id not in summary.outcomes:
            continue
        bars = {metric: node.params.get(param) for metric, param in GATES if node.params.get(param) is not None}
        record = store.get(node.key) if summary.outcomes[node.id].status in ("ran", "cached") else None
        groups = (record.result.get("metrics") or {}) if record is not None else {}
        for metric, bar in bars.items():
            if not groups:  # the step failed (below a gate, or otherwise): its message says why
                rows.append({"step": node.id, "group": None, "metric": metric, "value": None, "bar": bar,
                             "passed": False, "note": summary.outcomes[node.id].message})
            for group, values in sorted(groups.items()):
                value = values.get(metric) if isinstance(values, dict) else None
                rows.append({"step": node.id, "group": group, "metric": metric, "value": value, "bar": bar,
                             "passed": value is not None and value >= bar})
    return rows


def markdown(summary: Any, store: Any, report_path: Path, *, thumbnails: int = 8) -> str:
    loaded = summary.plan.loaded
    code = summary.exit_code
    lines = [f"# caspec: `{loaded.path.name}` ({'passed' if code == 0 else f'exit {code}'})", "",
             "| step | kind | status | time | key | note |", "|---|---|---|---:|---|---|"]
    for node in summary.plan.order():
        o = summary.outcomes.get(node.id)
        if o is None:
            continue
        note = (o.message + (f" (hint: {o.hint})" if o.hint else "")) if o.status not in ("ran", "cached") else o.message
        lines.append(f"| `{node.id}` | {node.kind} | {_MARK.get(o.status, o.status)} | {o.seconds:.1f} s | "
                     f"`{node.key[:12]}` | {_cell(note)} |")
    gates = eval_gates(summary, store)
    if gates:
        lines += ["", "## Eval gates", "", "| eval | asset | metric | value | gate | |", "|---|---|---|---:|---:|---|"]
        for g in gates:
            value = "n/a" if g["value"] is None else f"{g['value']:.3f}"
            lines.append(f"| `{g['step']}` | {_cell(g['group'] or '-')} | {g['metric']} | {value} | ≥ {g['bar']} | "
                         f"{'✅' if g['passed'] else '❌'} |")
    shots = _compose_images(summary, store, report_path)
    if shots:
        lines += ["", "## Compose outputs", ""]
        for step_id, items in shots.items():
            lines.append(f"**`{step_id}`**<br>")
            lines += [f'<img src="{rel}" width="128" title="{_attr(prompt)}" alt="{_attr(prompt)}">'
                      for rel, prompt in items[:thumbnails]]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _compose_images(summary: Any, store: Any, report_path: Path) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    base = report_path.resolve().parent
    for node in summary.plan.order():
        o = summary.outcomes.get(node.id)
        if node.kind != "compose" or o is None or o.status not in ("ran", "cached"):
            continue
        record = store.get(node.key)
        folder = out_dir_for(summary.plan.loaded, node.id)
        for img in (record.result.get("images") or []) if record else []:
            rel = os.path.relpath(folder / img["file"], base)
            out.setdefault(node.id, []).append((Path(rel).as_posix(), img.get("prompt", "")))
    return out


def _cell(text: str) -> str:
    """``text`` safe in a markdown table cell: no raw HTML, code spans or column breaks; one line."""
    text = html.escape(_printable(text), quote=False).replace("`", "&#96;").replace("|", "\\|")
    return " ".join(text.split())


_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff\ufffe\uffff]")


def _printable(text: Any) -> str:
    """``text`` with characters XML 1.0 cannot hold (control characters, lone surrogates) written as ``\\xNN``."""
    return _NOT_XML.sub(lambda m: f"\\x{ord(m.group(0)):02x}" if ord(m.group(0)) < 256 else f"\\u{ord(m.group(0)):04x}",
                        str(text))


def _attr(text: str) -> str:
    return html.escape(_printable(text), quote=True)


def junit(summary: Any, store: Any) -> str:
    loaded = summary.plan.loaded
    suite = ET.Element("testsuite", name=f"caspec {loaded.name}")
    failures = skipped = tests = 0
    total = 0.0
    for node in summary.plan.order():
        o = summary.outcomes.get(node.id)
        if o is None:
            continue
        case = ET.SubElement(suite, "testcase", classname=f"caspec.{node.kind}", name=node.id, time=f"{o.seconds:.3f}")
        tests += 1
        total += o.seconds
        if o.status in ("failed", "differs-from-lock"):
            failures += 1
            fail = ET.SubElement(case, "failure", message=_printable(o.message), type=o.status)
            fail.text = _printable(o.message + (f"\nhint: {o.hint}" if o.hint else ""))
        elif o.status in ("awaiting-review", "blocked"):
            skipped += 1
            ET.SubElement(case, "skipped", message=_printable(f"{o.status}: {o.message}"))
    for g in eval_gates(summary, store):
        name = f"{g['step']}: {g['group'] or 'all'} {g['metric']} >= {g['bar']}"
        case = ET.SubElement(suite, "testcase", classname="caspec.eval-gate", name=_printable(name), time="0")
        tests += 1
        if not g["passed"]:
            failures += 1
            message = (f"{g['metric']} {g['value']:.3f} < {g['bar']}" if g["value"] is not None
                       else f"step `{g['step']}` failed: {g.get('note', '')}")
            fail = ET.SubElement(case, "failure", message=_printable(message), type="eval-gate")
            fail.text = _printable(message + "\nhint: lower the gate in the spec or improve the asset")
    suite.set("tests", str(tests))
    suite.set("failures", str(failures))
    suite.set("errors", "0")
    suite.set("skipped", str(skipped))
    suite.set("time", f"{total:.3f}")
    suites = ET.Element("testsuites")
    suites.append(suite)
    ET.indent(suites)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"


def write_reports(summary: Any, store: Any, *, report: str | None, junit_path: str | None) -> list[Path]:
    from .fsutil import atomic_write_text

    written = []
    if report:
        path = Path(report)
        atomic_write_text(path, markdown(summary, store, path))
        written.append(path)
    if junit_path:
        path = Path(junit_path)
        atomic_write_text(path, junit(summary, store))
        written.append(path)
    return written


__all__ = ["eval_gates", "markdown", "junit", "write_reports"]
