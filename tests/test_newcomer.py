"""What a newcomer meets (issue 28): shared files keep the umask's permissions (the gallery's seeds as strings:
tests/test_review_server.py; the early cutoff: tests/test_early_cutoff_png.py)."""
from __future__ import annotations

import json
import os
import stat
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from caspec.cli import main


def cli(*args: str):
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def test_files_meant_to_be_shared_follow_the_umask(tmp_path):
    from caspec.fsutil import atomic_write_text

    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "shared.lock", "{}")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        os.umask(0o027)
        assert stat.S_IMODE(atomic_write_text(tmp_path / "group.lock", "{}").stat().st_mode) == 0o640
    finally:
        os.umask(old)



def test_an_unclosed_quote_is_reported_where_it_starts(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(textwrap.dedent("""\
        version: 1
        roots:
          r: {prompt: "a red robot, candidates: 1}
        edits:
          e:
            from: r
            prompts: ["a blue robot"]
        """))
    code, _, err = cli("validate", str(spec))
    assert code == 2 and f"{spec}:3:15: error: invalid YAML: this quoted string is not closed on its line" in err
    assert "hint: add the closing quote" in err
    ok = tmp_path / "ok.yaml"  # a quoted string may span lines in YAML: that is not an error
    ok.write_text('version: 1\ndescription: "a long\n  description"\nroots:\n  r: {prompt: "x"}\n')
    assert cli("validate", str(ok))[0] == 0
