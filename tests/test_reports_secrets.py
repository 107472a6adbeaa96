"""Reports and secrets (issue 25, items 14-15): JUnit XML stays parseable and markdown cells stay text whatever a
failure message holds; store URLs never show their credentials; an unreachable store is a clear error."""
from __future__ import annotations

import os
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from caspec.cli import main

from fakeops import fake_ops  # tests/ is on sys.path
from s3server import free_port, running_s3

SECRET = "sEcReT-" + uuid.uuid4().hex[:8]
KEY_ID = "AKIA" + uuid.uuid4().hex[:8].upper()

FAILING = """
version: 1
name: rep
roots:
  bad: {prompt: "crash", candidates: 1}
  good: {prompt: "fine", candidates: 1}
"""


def cli(*args: str):
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return res.exit_code, res.stdout, res.stderr


def test_junit_and_markdown_hold_any_failure_message(tmp_path):
    from types import SimpleNamespace

    from caspec import report

    nasty = "boom \x07\x1b[31m <img src=x onerror=alert(1)> `rm -rf` | \ud800 end"
    node = SimpleNamespace(id="bad", kind="root", key="0" * 64, params={})
    outcome = SimpleNamespace(status="failed", message=nasty, hint="a `hint`\x00", seconds=0.5)
    plan = SimpleNamespace(order=lambda: [node], loaded=SimpleNamespace(name="rep", path=Path("rep.yaml")))
    summary = SimpleNamespace(plan=plan, outcomes={"bad": outcome}, exit_code=1)
    xml = report.junit(summary, store=None)
    root = ET.fromstring(xml.encode("utf-8"))  # parses: no raw control characters
    failure = root.find("./testsuite/testcase/failure")
    assert failure is not None and "\\x07" in failure.get("message") and "\\x1b" in failure.get("message")
    md = report.markdown(summary, None, tmp_path / "r.md")
    row = next(line for line in md.splitlines() if line.startswith("| `bad`"))
    assert "<img" not in row and "&lt;img" in row and "`rm" not in row and "\\|" in row and "\x07" not in row


@pytest.fixture
def s3(monkeypatch, tmp_path):
    yield from running_s3(monkeypatch, key_id=KEY_ID, secret=SECRET, object_cache=tmp_path / "object-cache")


def _everything(folder: Path) -> str:
    """Every file's text under ``folder`` (binary files included as latin-1)."""
    return "\n".join(p.read_bytes().decode("latin-1") for p in folder.rglob("*") if p.is_file())


def test_store_credentials_are_never_shown(tmp_path, s3):
    spec = tmp_path / "rep.yaml"
    spec.write_text(FAILING)
    shown = []
    with fake_ops():
        # credentials in the URL (a bucket name that cannot be reached that way), and in the environment
        for url in (f"s3://{KEY_ID}:{SECRET}@{s3.bucket}/store", f"s3://{s3.bucket}/store"):
            code, out, err = cli("run", str(spec), "--store", url, "--report", str(tmp_path / "r.md"),
                                 "--junit", str(tmp_path / "j.xml"))
            shown.append(out + err)
            assert code in (1, 2) and "Traceback" not in err, err
        code, out, err = cli("lock", str(spec), "--store", f"s3://{s3.bucket}/store")
        shown.append(out + err)
    texts = "\n".join(shown) + _everything(tmp_path)
    for key in s3.client().list_objects_v2(Bucket=s3.bucket).get("Contents", []):
        texts += s3.client().get_object(Bucket=s3.bucket, Key=key["Key"])["Body"].read().decode("latin-1")
    assert SECRET not in texts and KEY_ID not in texts
    assert f"s3://***@{s3.bucket}/store" in shown[0] or "***" in shown[0]


def test_an_unreachable_store_is_a_store_error(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(FAILING)
    code, _, err = cli("plan", str(spec), "--store", f"ftp://user:{SECRET}@127.0.0.1:{free_port()}/store")
    assert code != 0 and "error: store ftp://***@127.0.0.1" in err and "cannot open it" in err
    assert "Traceback" not in err and SECRET not in err
