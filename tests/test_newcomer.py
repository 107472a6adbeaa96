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


ROOT_SPEC = 'version: 1\nroots: {robot: {prompt: "x", candidates: 1}}\n'


def test_a_store_path_that_is_a_file_is_a_usage_error_before_anything_runs(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(ROOT_SPEC)
    not_a_folder = tmp_path / "store.txt"
    not_a_folder.write_text("")
    for args in (("run", str(spec), "--store", str(not_a_folder)),
                 ("run", str(spec), "--store", str(not_a_folder / "inside"))):
        code, _, err = cli(*args)
        assert code == 2, err
        assert f"store: {not_a_folder}" in err and "not a folder (--store)" in err and "hint:" in err
    (tmp_path / ".caspec").write_text("")  # the default store beside the spec is a file
    code, _, err = cli("run", str(spec))
    assert code == 2 and "not a folder (the store beside the spec)" in err, err


def test_status_without_a_spec_finds_the_demo_store_or_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CASPEC_STORE", raising=False)
    code, _, err = cli("status")
    assert code == 2 and "no store found: looked in ./.caspec and ./specs/.caspec" in err, err
    assert not (tmp_path / ".caspec").exists()  # looking creates nothing
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "s.yaml").write_text(ROOT_SPEC)
    (tmp_path / "specs" / ".caspec").mkdir()  # where `make demo`'s store lives
    code, out, err = cli("status")
    assert code == 0, err
    assert "store: specs/.caspec" in err and "entries: 0 steps" in out
    (tmp_path / ".caspec").mkdir()  # ./.caspec comes first
    code, _, err = cli("status")
    assert code == 0 and "store: .caspec" in err, err
    # a command that needs no store does not look for one
    (tmp_path / ".caspec").rmdir()
    (tmp_path / "specs" / ".caspec").rmdir()
    code, _, err = cli("assets", "show", "no-such-folder")
    assert code == 2 and "no asset folder `no-such-folder`" in err, err


def test_validate_names_an_unknown_model_at_its_line_and_lists_the_embedded_ones(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text('version: 1\nmodel: tinny\nroots: {robot: {prompt: "x", candidates: 1}}\n')
    code, out, err = cli("validate", str(spec))
    assert code == 2 and "ok" not in out, err
    assert f"{spec}:2:8: error" in err and "model `tinny`" in err
    assert all(f"`{name}`" in err for name in ("tiny", "tiny-xl", "tiny-v", "toy", "tiny-flux"))
    code, _, err = cli("plan", str(spec))  # plan names the same line
    assert code == 2 and f"{spec}:2:8: error" in err, err


def test_validate_refuses_a_prompt_too_long_for_the_text_encoder_at_its_line(tmp_path):
    from caspec.models.toy import ensure_toy

    ensure_toy()  # its tokenizer files on disk, as after the first run (otherwise validate notes it skipped)
    long_prompt = "a large orange star at the left " * 13  # 91 words: more than CLIP's 75 text tokens
    spec = tmp_path / "s.yaml"
    spec.write_text(textwrap.dedent(f"""\
        version: 1
        model: toy
        roots:
          star: {{prompt: "a large orange star at the left", candidates: 1}}
        edits:
          colors:
            from: star
            prompts:
              - "a large blue star at the left"
              - "{long_prompt}"
        """))
    code, out, err = cli("validate", str(spec))
    assert code == 2 and "ok" not in out, err
    assert f"{spec}:10:" in err  # the long prompt's own line
    assert "the prompt does not fit the text encoder: it is" in err and "hint: shorten it" in err
    spec.write_text(spec.read_text().replace(long_prompt, "a large teal star at the left"))
    code, out, err = cli("validate", str(spec))
    assert code == 0 and out.strip() == f"{spec}: ok", err


def test_validate_notes_words_the_toy_model_was_never_trained_on(tmp_path):
    from caspec.toyworld.data import full_caption, sample_toy_scene, vocabulary

    import numpy as np

    rng = np.random.default_rng(7)  # another sample than vocabulary()'s: every caption word is known
    assert all(w in vocabulary() for _ in range(500) for w in full_caption(sample_toy_scene(rng)).split())
    assert "teal" not in vocabulary() and "orange" in vocabulary()
    spec = tmp_path / "s.yaml"
    spec.write_text(textwrap.dedent("""\
        version: 1
        model: toy
        roots:
          star: {prompt: "a large orange star at the left", candidates: 1}
        edits:
          colors: {from: star, prompts: ["a large teal star at the left", "a <A1> blue star"]}
        """))
    code, out, err = cli("validate", str(spec))
    assert code == 0 and out.strip() == f"{spec}: ok", err  # a note, not an error
    # only `teal`: the pseudo-word `<A1>` is the user's own, and the note names the prompt's line
    assert f"{spec}:6:" in err and "`toy` was never trained on `teal`: the word will" in err


def readme_first_spec() -> str:
    import re

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Your first spec on `toy`"):]
    return re.search(r"```yaml\n(.*?)```", section, re.S).group(1)


def test_the_readmes_first_spec_runs_and_its_overview_links_every_step(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CASPEC_STORE", raising=False)
    spec = tmp_path / "first.yaml"
    spec.write_text(readme_first_spec())
    code, out, err = cli("validate", str(spec))
    assert code == 0 and "note:" not in err, err  # only words the toy world knows
    code, _, err = cli("run", str(spec))
    assert code == 0, err
    page = tmp_path / "out" / "first" / "index.html"
    assert "overview: `out/first/index.html`" in err
    text = page.read_text(encoding="utf-8")
    # root -> edits -> selection, in the method's order, each with images that exist
    assert text.index("<code>star</code>") < text.index("<code>colors</code>") < text.index("<code>picks</code>")
    import re

    sources = re.findall(r'<img src="([^"]+)"', text)
    assert len(sources) == 1 + 6 + 4 and all((page.parent / s).is_file() for s in sources)
    assert 'href="../../reviews/first/picks.html"' in text and (tmp_path / "reviews/first/picks.html").is_file()


CHAIN = """\
version: 1
model: tiny
roots:
  robot: {prompt: "a robot", candidates: 2}
  other: {prompt: "a cat"}
edits:
  colors: {from: robot, prompts: ["a red robot"]}
select:
  picks: {from: colors, by: clip}
concepts:
  mine:
    from: picks
    words: [{token: "<r1>", init: robot}]
compose:
  story:
    assets: [mine]
    prompts: ["a <r1> on the moon"]
"""


def test_compose_shows_the_root_its_asset_came_from_and_it_enters_the_key(tmp_path):
    """Issue 28 item 7: compose reaches the root through concepts -> select -> edits (upstream as ``root0``,
    so the sheet can show it and its content is in the key); without `baseline` it does not."""
    from caspec.plan.graph import build_nodes
    from caspec.spec.load import load_spec

    spec = tmp_path / "chain.yaml"
    spec.write_text(CHAIN)
    loaded = load_spec(spec)
    assert [loaded.spec.roots_of(s) for s in ("mine", "picks", "colors", "robot", "other", "nope")] == \
        [["robot"], ["robot"], ["robot"], ["robot"], ["other"], []]
    assert build_nodes(loaded)["story"].upstream == {"asset0": "mine", "root0": "robot"}
    spec.write_text(CHAIN + "    baseline: false\n")
    assert build_nodes(load_spec(spec))["story"].upstream == {"asset0": "mine"}


def test_the_overview_shows_a_compose_steps_root_first(tmp_path):
    from caspec.exec.overview import _images

    for name in ("p0-c0.png", "p0-c0-plain.png", "root-0.png", "plot.png"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in _images(tmp_path)] == ["plot.png", "root-0.png", "p0-c0-plain.png", "p0-c0.png"]
