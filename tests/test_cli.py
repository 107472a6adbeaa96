"""The CLI's contract: exit codes, data on stdout, errors on stderr without tracebacks."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

from click.testing import CliRunner

from caspec.cli import main
from caspec.spec.schema import SCHEMA_PATH

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, env: dict | None = None):
    r = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def spec(tmp: Path, text: str, name: str = "s.yaml") -> str:
    path = tmp / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def shipped(pattern: str) -> list[Path]:
    """The files matching ``pattern`` under the repository that git tracks: a user's own (maybe broken) specs in
    specs/ are not the project's and must not fail its tests (all of them, outside a git checkout)."""
    import subprocess

    found = sorted(ROOT.glob(pattern))
    try:
        tracked = subprocess.run(["git", "ls-files", "-z", "--", pattern], cwd=ROOT, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return found
    names = {ROOT / n for n in tracked.stdout.decode().split("\0") if n}
    return [p for p in found if p in names] if names else found


def test_validate_all_shipped_specs():
    paths = [str(p) for p in shipped("specs/*.yaml") + shipped("recipes/*.yaml")]
    assert len(paths) >= 3
    code, out, err = cli("validate", *paths)
    assert code == 0, err
    assert out.count(": ok") == len(paths)


def test_bad_spec_exits_2_with_position_and_no_traceback(tmp_path):
    path = spec(tmp_path, """
        version: 1
        roots:
          r: {prompt: "x", candidats: 2}
    """)
    for command in ("validate", "plan", "run"):
        code, out, err = cli(command, path)
        assert code == 2, (command, err)
        assert f"{path}:4:20: error: roots.r.candidats: unknown field" in err
        assert "hint: did you mean `candidates`?" in err
        assert "Traceback" not in err and out == ""


def test_schema_on_stdout_matches_committed_file():
    code, out, _ = cli("schema")
    assert code == 0
    assert json.loads(out) == json.loads(SCHEMA_PATH.read_text())


def test_missing_hub_model_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    path = spec(tmp_path, """
        version: 1
        model: {base: "someorg/not-downloaded", revision: main}
        roots: {r: {prompt: "x"}}
    """)
    code, out, err = cli("plan", path)
    assert code == 2 and out == ""
    assert "someorg/not-downloaded" in err and "hint:" in err and "Traceback" not in err


def test_unknown_step_options_and_review_errors(tmp_path):
    path = spec(tmp_path, """
        version: 1
        roots: {robot: {prompt: "x", candidates: 1}}
        select: {pick: {from: robot}}
    """)
    code, _, err = cli("run", path, "--only", "robto")
    assert code == 2 and "did you mean `robot`?" in err
    code, _, err = cli("review", path, "--step", "robot", "--keep", "c000")
    assert code == 2 and "not a manual select step" in err and "pick" in err
    code, _, err = cli("review", path, "--step", "pick", "c000")
    assert code == 2 and "without --keep or --reject" in err
    code, _, err = cli("review", path, "--step", "pick", "--keep", "c000")
    assert code == 2 and "has no candidates yet" in err and "caspec run" in err


def test_status_and_store_env(tmp_path):
    path = spec(tmp_path, """
        version: 1
        roots: {robot: {prompt: "x", candidates: 1}}
    """)
    store = tmp_path / "shared-store"
    code, out, err = cli("status", path, env={"CASPEC_STORE": str(store)})
    assert code == 0, err
    assert f"store: {store}" in out and "entries: 0 steps" in out
    assert "robot" in out and "run" in out and "never run" in out
    assert not store.exists()  # status is read-only


def test_review_without_step_serves_the_gallery(tmp_path):
    import os
    import re
    import signal
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    path = spec(tmp_path, """
        version: 1
        roots: {robot: {prompt: "x", candidates: 1}}
        select: {pick: {from: robot}}
    """)
    proc = subprocess.Popen([sys.executable, "-m", "caspec", "review", path, "--port", "0"], stderr=subprocess.PIPE,
                            text=True, env=os.environ.copy(),  # Ctrl-C must work even in a background job
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        url = token = None
        for line in proc.stderr:
            found = re.search(r"(http://127\.0\.0\.1:\d+/)\?token=([A-Za-z0-9_-]+)", line)
            if found:
                url, token = found.groups()
                break
        assert url and token, "the gallery did not print its address with its token"
        try:
            urllib.request.urlopen(url + "api/gates", timeout=10)
            raise AssertionError("the gallery answered without its token")
        except urllib.error.HTTPError as exc:
            assert exc.code == 401
        with urllib.request.urlopen(f"{url}api/gates?token={token}", timeout=10) as resp:
            gates = json.loads(resp.read())
        text = json.dumps(gates)
        assert "pick" in text and "caspec run" in text  # the gate is listed; its upstream has not run yet
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)
    assert proc.returncode == 0
    code, _, err = cli("review", path, "--keep", "c000")
    assert code == 2 and "need --step" in err


def test_ci_log_step_lines_do_not_wrap(tmp_path, monkeypatch):
    """stderr not a terminal (CI logs): each step is one line, with its duration, however long the line."""
    import re

    from fakeops import fake_ops

    monkeypatch.delenv("COLUMNS", raising=False)
    long_root, long_edit = "a-root-step-with-a-rather-long-descriptive-name", "an-edit-step-whose-name-is-longer-still-than-that"
    path = spec(tmp_path, f"""
        version: 1
        roots: {{{long_root}: {{prompt: "x", candidates: 1}}}}
        edits: {{{long_edit}: {{from: {long_root}, prompts: ["y"], candidates: 1}}}}
    """)
    with fake_ops():
        code, _, err = cli("run", path)
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("✓")]
    assert len(lines) == 2 and all(len(line) > 80 for line in lines), err
    for line, sid, kind in zip(lines, (long_root, long_edit), ("root", "edit")):
        assert re.fullmatch(rf"✓ {sid} {kind} +ran +[0-9a-f]{{12}}  1 image\(s\) \d+\.\ds", line), line


def test_shipped_review_manifests_name_ids_only():
    """Pre-filled manifests in specs/ keep candidates by id: a filled-in copy (digests, contact sheet) pins
    pixel bytes that differ by a 1/255 step between CPU types, and fails every run on another machine."""
    import yaml

    manifests = [p for p in shipped("specs/*/*.yaml")
                 if isinstance(yaml.safe_load(p.read_text()), dict) and "candidates" in yaml.safe_load(p.read_text())]
    assert manifests
    for path in manifests:
        for cand in yaml.safe_load(path.read_text())["candidates"]:
            assert set(cand) <= {"id", "keep"}, f"{path.relative_to(ROOT)}: {sorted(cand)}"
    assert not shipped("specs/*/*.html")


def test_a_users_own_broken_spec_is_not_a_shipped_one():
    """A user's own YAML under specs/ (untracked, even broken) stays out of the shipped-spec checks."""
    own = ROOT / "specs" / "zz-my-own-broken-spec.yaml"
    own.write_text("version: [\n")
    try:
        assert own not in shipped("specs/*.yaml") and (ROOT / "specs" / "toy-demo.yaml") in shipped("specs/*.yaml")
    finally:
        own.unlink()
