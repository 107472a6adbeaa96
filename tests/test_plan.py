"""Planning is pure and keys follow the recipe: only what changed, and what is downstream of it, gets a new key."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from caspec.errors import PlanError
from caspec.plan.graph import AWAITING, BLOCKED, RUN, make_plan
from caspec.spec.load import load_spec
from caspec.store import LocalStore

TWO_BRANCHES = """
version: 1
name: two
defaults: {{seed: 3, steps: 10}}
roots:
  robot: {{prompt: "a dancing robot", candidates: 2}}
edits:
  colors:
    from: robot
    prompts: ["a silver robot", "{colors_p2}"]
    strength: {strength}
  hats:
    from: robot
    prompts: ["a robot with a hat"]
select:
  pick-colors: {{from: colors, count: 1}}
  pick-hats: {{from: hats, count: 1}}
"""


def write(tmp: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp / name
    path.write_text(textwrap.dedent(text))
    return path


def plan_of(tmp: Path, text: str, name: str = "spec.yaml", **kw):
    loaded = load_spec(write(tmp, text, name))
    return make_plan(loaded, LocalStore(tmp / ".caspec"), model_identity={"kind": "test"}, **kw)


def keys(plan) -> dict[str, str]:
    return {n.id: n.key for n in plan.order()}


def two(tmp, prompt="a purple robot", strength=0.86):
    return plan_of(tmp, TWO_BRANCHES.format(colors_p2=prompt, strength=strength))


def test_plan_writes_nothing(tmp_path):
    two(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]  # only the spec file we wrote
    assert not (tmp_path / ".caspec").exists()


def test_keys_are_deterministic_and_topological(tmp_path):
    a, b = two(tmp_path), two(tmp_path)
    assert keys(a) == keys(b)
    order = [n.id for n in a.order()]
    assert order.index("robot") < order.index("colors") < order.index("pick-colors")
    assert all(len(k) == 64 for k in keys(a).values())


def test_changing_one_edit_prompt_changes_only_its_branch(tmp_path):
    before = keys(two(tmp_path))
    after = keys(two(tmp_path, prompt="a gold robot"))
    changed = {sid for sid in before if before[sid] != after[sid]}
    assert changed == {"colors", "pick-colors"}


def test_param_change_and_rename(tmp_path):
    base = keys(two(tmp_path))
    assert keys(two(tmp_path, strength=0.8))["colors"] != base["colors"]
    renamed = plan_of(tmp_path, TWO_BRANCHES.format(colors_p2="a purple robot", strength=0.86)
                      .replace("hats:", "headwear:").replace("from: hats", "from: headwear"))
    assert keys(renamed)["headwear"] == base["hats"]  # ids are not in the key


def test_model_identity_enters_key(tmp_path):
    loaded = load_spec(write(tmp_path, TWO_BRANCHES.format(colors_p2="x", strength=0.5)))
    store = LocalStore(tmp_path / ".caspec")
    k1 = keys(make_plan(loaded, store, model_identity={"kind": "a"}))
    k2 = keys(make_plan(loaded, store, model_identity={"kind": "b"}))
    assert all(k1[s] != k2[s] for s in ("robot", "colors", "hats"))


def test_review_gate_statuses(tmp_path):
    plan = two(tmp_path)
    status = {n.id: n.status for n in plan.order()}
    assert status == {"robot": RUN, "colors": RUN, "hats": RUN, "pick-colors": AWAITING, "pick-hats": AWAITING}
    assert "not written yet" in plan.nodes["pick-colors"].reasons[0]


def test_blocked_downstream_of_review(tmp_path):
    plan = plan_of(tmp_path, """
        version: 1
        roots: {r: {prompt: "a robot", candidates: 2}}
        select: {pick: {from: r, count: 1}}
        edits: {e: {from: pick, prompts: ["a red robot"]}}
    """)
    assert plan.nodes["e"].status == BLOCKED
    assert plan.nodes["e"].reasons == ["waits for `pick` (awaiting-review)"]


def test_manifest_decision_enters_select_key(tmp_path):
    spec = """
        version: 1
        name: gate
        roots: {r: {prompt: "a robot", candidates: 2}}
        select: {pick: {from: r, count: 1}}
        edits: {e: {from: pick, prompts: ["a red robot"]}}
    """
    manifest = tmp_path / "reviews" / "gate" / "pick.yaml"
    manifest.parent.mkdir(parents=True)

    def with_keep(digest: str):
        manifest.write_text(json.dumps({"candidates": [
            {"id": "c000", "digest": "a" * 64, "keep": digest == "a"},
            {"id": "c001", "digest": "b" * 64, "keep": digest == "b"}]}))
        return plan_of(tmp_path, spec)

    pa, pb = with_keep("a"), with_keep("b")
    assert pa.nodes["pick"].status == RUN and pa.nodes["e"].status == RUN
    assert pa.nodes["r"].key == pb.nodes["r"].key
    assert pa.nodes["pick"].key != pb.nodes["pick"].key
    assert pa.nodes["e"].key != pb.nodes["e"].key
    manifest.write_text(manifest.read_text() + "\n# a comment changes nothing\n")
    assert plan_of(tmp_path, spec).nodes["pick"].key == pb.nodes["pick"].key


def test_cycle_is_a_plan_error(tmp_path):
    with pytest.raises(PlanError) as err:
        plan_of(tmp_path, """
            version: 1
            select: {a: {from: b}}
            edits: {b: {from: a, prompts: ["x"]}}
        """)
    assert "cycle" in err.value.message and "`a`" in err.value.message and "`b`" in err.value.message


def test_reasons_name_the_changed_param(tmp_path):
    from caspec.exec.runner import run
    from caspec.ops.base import Op

    class Fake(Op):
        KIND, VERSION = "root", 1

        def params(self, step, spec):
            return {"prompt": step.prompt}

        def run(self, ctx):
            (ctx.out_dir / "x.txt").write_text(ctx.params["prompt"])
            return {}

    import caspec.ops as ops
    saved = dict(ops._cache)
    ops._cache["root"] = Fake()
    try:
        store = LocalStore(tmp_path / ".caspec")
        spec = 'version: 1\nroots: {r: {prompt: "%s"}}\n'
        loaded = load_spec(write(tmp_path, spec % "old"))
        summary = run(loaded, store, plan=make_plan(loaded, store, model_identity={"k": 1}))
        assert summary.exit_code == 0
        loaded = load_spec(write(tmp_path, spec % "new"))
        node = make_plan(loaded, store, model_identity={"k": 1}).nodes["r"]
        assert node.status == RUN
        assert node.reasons == ["params.prompt 'old' -> 'new'"]
    finally:
        ops._cache.clear()
        ops._cache.update(saved)


def test_plan_json_cli_and_no_torch_import(tmp_path):
    spec = write(tmp_path, TWO_BRANCHES.format(colors_p2="a purple robot", strength=0.86))
    code = ("import sys, json; from click.testing import CliRunner; from caspec.cli import main; "
            f"r = CliRunner().invoke(main, ['plan', {str(spec)!r}, '--json']); "
            "print(json.dumps({'out': r.output, 'code': r.exit_code, 'torch': 'torch' in sys.modules}))")
    env = {**os.environ, "CASPEC_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["code"] == 0, res
    assert res["torch"] is False  # planning never loads (or even imports) the model stack
    steps = json.loads(res["out"])
    assert [s["id"] for s in steps][0] == "robot"
    assert {"id", "kind", "key", "provisional", "status", "reasons", "notes"} <= set(steps[0])
    by_id = {s["id"]: s for s in steps}
    assert by_id["robot"]["provisional"] is False  # no upstream: its key is exact
    assert by_id["colors"]["provisional"] is True and len(by_id["colors"]["key"]) == 64  # robot runs first
    assert by_id["colors"]["reasons"] == ["never run", "after `robot` runs"]
    assert not (tmp_path / ".caspec").exists()


def test_500_step_plan(tmp_path):
    roots = "\n".join(f"  r{i}: {{prompt: \"robot {i}\"}}" for i in range(250))
    edits = "\n".join(f"  e{i}: {{from: r{i}, prompts: [\"a red robot {i}\"]}}" for i in range(250))
    plan = plan_of(tmp_path, f"version: 1\nroots:\n{roots}\nedits:\n{edits}\n")
    assert len(plan.nodes) == 500 and len(set(keys(plan).values())) == 500
