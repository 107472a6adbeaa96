"""Recipes (issue 15): `caspec pack`, `caspec unpack`, `caspec run NAME.recipe.tar.gz`; unsafe archives."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from caspec.cli import main
from caspec.errors import RecipeError
from caspec.recipe import unpack

from fakeops import fake_ops

GATED = """
version: 1
name: g
roots:
  r: {prompt: "alpha", candidates: 2}
edits:
  e: {from: picks, prompts: ["red"], candidates: 1}
select:
  picks: {from: r, count: 1, manifest: reviews/picks.yaml}
"""


def cli(*args: str):
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return res.exit_code, res.stdout, res.stderr


def built(tmp: Path) -> Path:
    spec = tmp / "src" / "g.yaml"
    spec.parent.mkdir()
    spec.write_text(textwrap.dedent(GATED))
    assert cli("run", str(spec))[0] == 3
    assert cli("review", str(spec), "--step", "picks", "--keep", "c001")[0] == 0
    assert cli("run", str(spec))[0] == 0
    assert cli("lock", str(spec))[0] == 0
    return spec


def digests(store_dir: Path) -> dict[str, dict]:
    from caspec.store import LocalStore

    return {r.meta["step_id"]: {k: o["digest"] for k, o in r.outputs.items()} for r in LocalStore(store_dir).records()}


def test_pack_unpack_run_frozen_round_trip(tmp_path):
    with fake_ops():
        spec = built(tmp_path)
        archive = tmp_path / "g.recipe.tar.gz"
        code, out, err = cli("pack", str(spec), "-o", str(archive))
        assert code == 0, err
        first = archive.read_bytes()
        assert cli("pack", str(spec), "-o", str(archive))[0] == 0 and archive.read_bytes() == first  # reproducible
        with tarfile.open(archive) as tar:
            names = sorted(tar.getnames())
        assert names == ["g.yaml", "g.yaml.lock", "recipe.json", "reviews/picks.yaml"]  # no store, no weights
        fresh = tmp_path / "elsewhere"
        code, out, err = cli("unpack", str(archive), str(fresh))
        assert code == 0 and out.strip().endswith("g.yaml"), err
        code, _, err = cli("run", str(fresh / "g.yaml"), "--frozen")
        assert code == 0 and "done: 3 ran" in err, err
        assert digests(fresh / ".caspec") == digests(spec.parent / ".caspec")
        # `caspec run NAME.recipe.tar.gz`: unpacked beside the archive, then run; again: the same folder
        code, _, err = cli("run", str(archive), "--frozen")
        assert code == 0 and "recipe: " in err and (tmp_path / "g" / "g.yaml").is_file(), err
        code, _, err = cli("run", str(archive), "--frozen")
        assert code == 0 and "done: 3 cached" in err, err


def test_pack_needs_a_current_lock_and_files_inside_the_spec_folder(tmp_path):
    with fake_ops():
        spec = built(tmp_path)
        spec.write_text(spec.read_text().replace('"red"', '"blue"'))
        code, _, err = cli("pack", str(spec), "-o", str(tmp_path / "g.recipe.tar.gz"))
        assert code == 4 and "refresh the lock first" in err, err
        code, _, err = cli("pack", str(spec), "-o", str(tmp_path / "g.tgz"))
        assert code == 2 and "ends with .recipe.tar.gz" in err


def _archive(tmp: Path, add) -> Path:
    path = tmp / "bad.recipe.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        data = json.dumps({"format": 1, "spec": "s.yaml", "files": {}}).encode()
        info = tarfile.TarInfo("recipe.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        add(tar)
    return path


def _file(name: str, data: bytes = b"x"):
    def add(tar):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return add


def _special(name: str, kind: bytes, link: str = ""):
    def add(tar):
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, link
        tar.addfile(info)
    return add


@pytest.mark.parametrize("add, message", [
    (_file("../evil.txt"), "a `..` path would write outside the target"),
    (_file("a/../../evil.txt"), "a `..` path"),
    (_file("/tmp/evil.txt"), "an absolute path"),
    (_special("link", tarfile.SYMTYPE, "/etc/passwd"), "a symbolic link to `/etc/passwd`"),
    (_special("hard", tarfile.LNKTYPE, "../../etc/passwd"), "a hard link"),
    (_special("dev", tarfile.CHRTYPE), "a device or other special file"),
    (_special("fifo", tarfile.FIFOTYPE), "a device or other special file"),
    (_file("big.bin", b"y" * 2000), "over the limit of 1000"),
], ids=["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink", "device", "fifo", "oversized"])
def test_unsafe_members_are_refused_and_nothing_is_written(tmp_path, add, message):
    archive = _archive(tmp_path, add)
    target = tmp_path / "t"
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace("`", "`")):
        unpack(archive, target, max_member_bytes=1000)
    assert not target.exists() and not (tmp_path / "evil.txt").exists()


def test_unsafe_recipes_are_clear_errors_on_the_command_line(tmp_path):
    archive = _archive(tmp_path, _file("../evil.txt"))
    code, _, err = cli("unpack", str(archive), str(tmp_path / "t"))
    assert code == 2 and "member `../evil.txt`" in err and "Traceback" not in err
    code, _, err = cli("run", str(archive))
    assert code == 2 and "member `../evil.txt`" in err
    junk = tmp_path / "junk.recipe.tar.gz"
    junk.write_bytes(b"not a tar at all")
    code, _, err = cli("unpack", str(junk), str(tmp_path / "u"))
    assert code == 2 and "not a recipe" in err
    extra = _archive(tmp_path, _file("unlisted.txt"))
    shutil.move(extra, tmp_path / "extra.recipe.tar.gz")
    code, _, err = cli("unpack", str(tmp_path / "extra.recipe.tar.gz"), str(tmp_path / "v"))
    assert code == 2 and "not listed in recipe.json" in err


def test_input_images_inside_the_folder_are_packed_and_outside_ones_refused(tmp_path):
    from PIL import Image

    from caspec.plan.graph import make_plan
    from caspec.recipe import recipe_files
    from caspec.spec.load import load_spec
    from caspec.store import LocalStore

    (tmp_path / "pics").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "pics" / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path.parent / f"{tmp_path.name}-outside.png")
    spec = tmp_path / "s.yaml"
    spec.write_text("version: 1\nname: s\nmodel: tiny\nroots:\n  mine: {image: pics/a.png}\n")
    lock_file = tmp_path / "s.yaml.lock"
    lock_file.write_text("{}")
    plan = make_plan(load_spec(spec), LocalStore(tmp_path / ".caspec"))
    assert sorted(recipe_files(plan, lock_file)) == ["pics/a.png", "s.yaml", "s.yaml.lock"]
    spec.write_text(f"version: 1\nname: s\nmodel: tiny\nroots:\n  mine: {{image: ../{tmp_path.name}-outside.png}}\n")
    plan = make_plan(load_spec(spec), LocalStore(tmp_path / ".caspec"))
    with pytest.raises(RecipeError, match="outside the spec's folder"):
        recipe_files(plan, lock_file)
