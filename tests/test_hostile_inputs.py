"""Recipes and specs from other people (issue 25, items 1-6): contained paths, bounded templates, recipes verified
before anything is written, streamed member limits, pseudo-words that cannot carry code into snippets, and a
missing model reported at its line."""
from __future__ import annotations

import ast
import gzip
import hashlib
import io
import json
import tarfile
import textwrap
import tracemalloc
from pathlib import Path

import pytest
from click.testing import CliRunner

from caspec import recipe
from caspec.cli import main
from caspec.errors import RecipeError, SpecError
from caspec.spec.load import load_spec_text


def cli(*args: str):
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return res.exit_code, res.stdout, res.stderr


def make_recipe(path: Path, files: dict[str, bytes], *, spec: str = "s.yaml", lie: set[str] = frozenset()) -> Path:
    """A recipe archive as `caspec pack` lays it out (``lie``: members whose recorded digest is wrong)."""
    listed = {name: {"sha256": hashlib.sha256(b"other" if name in lie else data).hexdigest(), "size": len(data)}
              for name, data in files.items()}
    manifest = json.dumps({"format": recipe.FORMAT, "spec": spec, "files": listed}).encode()
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for name, data in {"recipe.json": manifest, **files}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return path


# ------------------------------------------------------------------ 1. contained paths


PLANTED = """
version: 1
name: p
roots:
  r: {{prompt: "a robot", candidates: 1}}
select:
  pick: {{from: r, manifest: {manifest}}}
"""


def test_a_recipe_cannot_write_or_read_outside_its_folder(tmp_path):
    planted = tmp_path / "planted.yaml"
    archive = make_recipe(tmp_path / "x.recipe.tar.gz", {"s.yaml": PLANTED.format(manifest=planted).encode()})
    code, _, err = cli("run", str(archive))
    assert code == 2 and "s.yaml:7:" in err and "select.pick.manifest" in err and "outside the spec's folder" in err
    assert not planted.exists() and not planted.with_suffix(".html").exists()
    # `..` climbing out, for a file the recipe would read
    archive = make_recipe(tmp_path / "y.recipe.tar.gz", {"s.yaml": b"version: 1\nroots:\n  r: {image: ../../etc.png}\n"})
    code, _, err = cli("plan", str(archive))
    assert code == 2 and "roots.r.image" in err and "outside the spec's folder" in err


def test_contained_is_asked_for_by_a_spec_and_refuses_every_escaping_path(tmp_path):
    (tmp_path / "spec").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "spec" / "link").symlink_to(tmp_path / "elsewhere")  # a link that climbs out
    text = textwrap.dedent(f"""
        version: 1
        model: {tmp_path / "elsewhere"}
        roots:
          r: {{image: link/x.png}}
        compose:
          c: {{assets: [../assets/robot], prompts: ["a <robot>"]}}
        export:
          e: {{asset: /tmp/some/asset, format: diffusers}}
        eval:
          q: {{from: [c], clip: {{model: ViT-B-32, checkpoint: ../clip.safetensors}}}}
        """)
    spec = tmp_path / "spec" / "s.yaml"
    spec.write_text(text)
    code, _, err = cli("validate", "--contained", str(spec))
    assert code == 2
    for field in ("model.base", "roots.r.image", "compose.c.assets[0]", "export.e.asset", "eval.q.clip.checkpoint"):
        assert field in err, field
    # an ordinary spec may reach outside its folder (documented in the README), and a contained one inside it
    from caspec.spec.contain import escapes
    from caspec.spec.load import load_spec

    outside = tmp_path / "spec" / "out.yaml"
    outside.write_text("version: 1\nroots:\n  r: {image: ../x.png}\n")
    assert cli("validate", str(outside))[0] == 0 and cli("validate", "--contained", str(outside))[0] == 2
    assert [e[0] for e in escapes(load_spec(outside))] == [("roots", "r", "image")]
    inside = tmp_path / "spec" / "in.yaml"
    inside.write_text("version: 1\nroots:\n  r: {image: imgs/x.png}\nselect:\n  s: {from: r, manifest: rev/s.yaml}\n")
    assert escapes(load_spec(inside)) == []


# ------------------------------------------------------------------ 2. bounded templates


@pytest.mark.parametrize("template, message", [
    ("{% for i in range(1000) %}{% for j in range(1000) %}{% for k in range(1000) %}{% endfor %}{% endfor %}"
     "{% endfor %}x", "loop iterations"),
    ("{{ a" + "|replace('x', 'xxxxxxxxxx')" * 9 + " }}", "builds a value longer than"),
    ("{{ a" + ".replace('x', 'xxxxxxxxxx')" * 9 + " }}", "builds a value longer than"),
    ("{% set b = a ~ a %}" + "{% set b = b ~ b %}" * 40 + "{{ b }}", "builds a value longer than"),
    ("{% for c in a * 9000 %}{% for d in a * 9000 %}{% endfor %}{% endfor %}x", "loop iterations"),
], ids=["nested-loops", "replace-filter", "replace-method", "concat", "string-loops"])
def test_templates_are_bounded_while_they_render(template, message):
    text = f'version: 1\nvars: {{a: "xxxxxxxxxx"}}\nroots:\n  r: {{prompt: "{template}"}}\n'
    with pytest.raises(SpecError) as info:
        load_spec_text(text, "s.yaml")
    rendered = info.value.render()
    assert rendered.startswith("s.yaml:4:") and "roots.r.prompt" in rendered and message in rendered


def test_ordinary_templates_still_render():
    text = ('version: 1\nvars: {c: [red, blue], n: 3}\nroots:\n'
            '  r: {prompt: "a {{ c|join(\' and \') }} robot{% for i in range(n) %}!{% endfor %}"}\n')
    assert load_spec_text(text, "s.yaml").spec.roots["r"].prompt == "a red and blue robot!!!"


# ------------------------------------------------------------------ 3-4. recipes verified before writing


def test_a_digest_mismatch_leaves_nothing_behind(tmp_path):
    archive = make_recipe(tmp_path / "x.recipe.tar.gz", {"s.yaml": b"version: 1\n", "img/a.png": b"pixels"},
                          lie={"img/a.png"})
    target = tmp_path / "x"
    with pytest.raises(RecipeError, match="does not match its digest"):
        recipe.unpack(archive, target)
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["x.recipe.tar.gz"]  # no temporary folder either
    target.mkdir()  # an empty target given by the user stays empty
    with pytest.raises(RecipeError):
        recipe.unpack(archive, target)
    assert target.is_dir() and not any(target.iterdir())


def test_member_headers_are_streamed_and_the_count_stops_early(tmp_path, monkeypatch):
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for i in range(40_000):
            tar.addfile(tarfile.TarInfo(f"e{i}"), io.BytesIO(b""))
    archive = tmp_path / "many.recipe.tar.gz"
    archive.write_bytes(buf.getvalue())
    monkeypatch.setattr(recipe, "MAX_MEMBERS", 100)
    tracemalloc.start()
    try:
        with pytest.raises(RecipeError, match="more than 100 members"):
            recipe.unpack(archive, tmp_path / "t")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{peak / 2**20:.1f} MiB"  # the 40,000 headers were never all held
    assert not (tmp_path / "t").exists()


# ------------------------------------------------------------------ 5. pseudo-words carry no code


def test_a_token_with_code_is_refused_at_import_and_in_the_catalog(tmp_path, caspec_cache):
    import torch
    import yaml

    from caspec.assets.catalog import usage
    from caspec.assets.format import safetensors_bytes
    from caspec.assets.importer import import_asset

    evil = '<x>")\nimport os; os.system("touch pwned")\n#'
    header = {"caspec": json.dumps({"format": "caspec-concept-asset-export", "token": evil, "index": 0})}
    src = tmp_path / "emb.safetensors"
    src.write_bytes(safetensors_bytes({"emb_params": torch.zeros(1, 32)}, header))
    with pytest.raises(ValueError, match="does not follow the grammar"):
        import_asset(src, tmp_path / "out")
    code, _, err = cli("import", str(src), str(tmp_path / "out2"))
    assert code != 0 and "does not follow the grammar" in err and "Traceback" not in err
    # a hand-edited card in a catalog: refused, never pasted into code
    good = import_asset(_plain_embedding(tmp_path), tmp_path / "good")
    card = yaml.safe_load((good / "card.yaml").read_text())
    card["pseudo_words"][0]["token"] = evil
    (good / "card.yaml").write_text(yaml.safe_dump(card))
    code, _, err = cli("assets", "catalog", str(good), "-o", str(tmp_path / "cat"))
    assert code == 2 and "does not follow the grammar" in err and not (tmp_path / "pwned").exists()
    # the snippets quote what they embed and run as written: an embedded model is its built folder
    snippet = usage('na"me\nimport os', ["<robot1>"], "toy")["diffusers"]
    tree = ast.parse(snippet)
    imports = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    assert imports == {"Path", "StableDiffusionPipeline"}
    from caspec.models.load import embedded_folder

    assert repr(str(embedded_folder("toy"))) in snippet and 'from_pretrained("toy")' not in snippet


def _plain_embedding(tmp_path: Path) -> Path:
    import torch

    from caspec.assets.format import safetensors_bytes

    path = tmp_path / "robot1.safetensors"
    path.write_bytes(safetensors_bytes({"emb_params": torch.zeros(1, 32)}))
    return path


# ------------------------------------------------------------------ 6. a model that cannot be found


def test_a_missing_model_is_reported_at_its_line(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text('version: 1\nname: m\nmodel: tny\nroots:\n  r: {prompt: "a robot", candidates: 1}\n')
    for command in ("plan", "run"):
        code, _, err = cli(command, str(spec))
        assert code == 2 and f"{spec}:3:8: error: model.base: model `tny`" in err, err
        assert "`tiny-flux`" in err  # the hint lists every embedded model
