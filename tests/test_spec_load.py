"""Loading valid specs: templating and list expansion, positions, merge keys, limits, the schema file."""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
import yaml

from caspec.errors import SpecError
from caspec.spec.load import KEY, LoadedSpec, load_spec, load_spec_text
from caspec.spec.models import ModelSpec
from caspec.spec.schema import SCHEMA_PATH, json_schema, schema_text

DEMO = """\
version: 1
name: demo
model: tiny
defaults: {seed: 7, steps: 50, guidance_scale: 7.5}
vars:
  color: [silver, purple, gold]
roots:
  robot:
    prompt: "a photo of a dancing robot"
    candidates: 2
edits:
  robot-colors:
    from: robot
    pick: 0
    prompts: "a dancing {{ color }} robot"
    strength: 0.86
    candidates: 2
select:
  picks:
    from: robot-colors
    by: manual
    count: 2
"""

ROOT_ONLY = "version: 1\nroots:\n  robot:\n    prompt: a robot\n"


def _load(text: str, name: str = "spec.yaml") -> LoadedSpec:
    return load_spec_text(text, name)


def _edit_spec(prompts: str, vars_: str) -> str:
    return f"version: 1\nvars:\n{vars_}\n{ROOT_ONLY[11:]}edits:\n  e:\n    from: robot\n    prompts: {prompts}\n"


# --------------------------------------------------------------------------- basics


def test_demo_spec(tmp_path):
    path = tmp_path / "demo.yaml"
    path.write_text(DEMO, encoding="utf-8")
    loaded = load_spec(path)
    assert loaded.spec.edits["robot-colors"].prompts == [
        "a dancing silver robot", "a dancing purple robot", "a dancing gold robot"]
    assert loaded.spec.edits["robot-colors"].pick == [0]
    assert loaded.name == "demo"
    assert loaded.path == path.absolute() and loaded.path.is_absolute()
    assert loaded.dir == tmp_path.absolute()
    assert loaded.text == DEMO
    assert [s[:2] for s in loaded.spec.steps()] == [("roots", "robot"), ("edits", "robot-colors"), ("select", "picks")]


def test_name_defaults_to_stem(tmp_path):
    path = tmp_path / "my-robots.yaml"
    path.write_text(ROOT_ONLY, encoding="utf-8")
    loaded = load_spec(str(path))
    assert loaded.spec.name is None
    assert loaded.name == "my-robots"


def test_file_stem_that_cannot_name_outputs():
    with pytest.raises(SpecError, match="cannot name the outputs"):
        _load(ROOT_ONLY, "my robots.yaml")
    assert _load("name: ok\n" + ROOT_ONLY, "my robots.yaml").name == "ok"


@pytest.mark.parametrize("model, expected", [
    ("model: tiny\n", ModelSpec(base="tiny")),
    ("model: stable-diffusion-v1-5/stable-diffusion-v1-5\n", ModelSpec(base="stable-diffusion-v1-5/stable-diffusion-v1-5")),
    ("model:\n  base: ./weights/sd15\n  dtype: fp16\n  device: cpu\n", ModelSpec(base="./weights/sd15", dtype="fp16", device="cpu")),
    ("", ModelSpec()),
])
def test_model_string_or_mapping(model, expected):
    assert _load(model + ROOT_ONLY).spec.model == expected


def test_crlf_and_bom():
    text = "\ufeff" + DEMO.replace("\n", "\r\n")
    loaded = _load(text)
    assert loaded.positions[("edits", "robot-colors", "strength")] == (16, 15)
    assert loaded.text == text


def test_timestamps_stay_strings():
    assert _load("description: 2024-01-01\n" + ROOT_ONLY).spec.description == "2024-01-01"


# --------------------------------------------------------------------------- templating


def test_list_var_expands_in_list_field():
    loaded = _load(DEMO)
    assert len(loaded.spec.edits["robot-colors"].prompts) == 3


def test_product_of_two_lists_in_var_order():
    text = _edit_spec('"{{ size }} {{ color }} robot"', "  color: [silver, gold]\n  size: [small, big, huge]")
    prompts = _load(text).spec.edits["e"].prompts
    # order: vars in order of appearance in `vars` (color, then size), row-major
    assert prompts == ["small silver robot", "big silver robot", "huge silver robot",
                       "small gold robot", "big gold robot", "huge gold robot"]


def test_splicing_into_list_in_place():
    text = _edit_spec('["first", "a {{ color }} robot", "last {{ n }}"]', "  color: [silver, gold]\n  n: 3")
    loaded = _load(text)
    assert loaded.spec.edits["e"].prompts == ["first", "a silver robot", "a gold robot", "last 3"]
    # expanded items keep the position of their template string; later items shift
    line = text.splitlines().index('    prompts: ["first", "a {{ color }} robot", "last {{ n }}"]') + 1
    pos = loaded.positions
    assert pos[("edits", "e", "prompts", 0)] == (line, 15)
    assert pos[("edits", "e", "prompts", 1)] == pos[("edits", "e", "prompts", 2)] == (line, 24)
    assert pos[("edits", "e", "prompts", 3)] == (line, 47)


def test_whole_list_uses_do_not_expand():
    text = ("version: 1\nvars:\n  color: [silver, gold]\nroots:\n  robot:\n"
            "    prompt: \"{{ color[0] }} {{ color | join('+') }} {{ color | length }}"
            "{% for c in color %} {{ c }}{% endfor %}{% if 'gold' in color %} !{% endif %}\"\n")
    assert _load(text).spec.roots["robot"].prompt == "silver silver+gold 2 silver gold !"


def test_element_filters_expand():
    text = _edit_spec('"{{ color | upper }}"', "  color: [silver, gold]")
    assert _load(text).spec.edits["e"].prompts == ["SILVER", "GOLD"]


def test_scalar_vars_and_numbers():
    text = "version: 1\nvars:\n  s: 41\n  who: robot\nroots:\n  robot:\n    prompt: 'a {{ who }}'\n    seed: '{{ s + 1 }}'\n"
    root = _load(text).spec.roots["robot"]
    assert (root.prompt, root.seed) == ("a robot", 42)


def test_vars_keys_and_plain_strings_are_not_templated():
    text = ("version: 1\nvars:\n  a: '{{ b }}'\n  b: x\n"
            "description: 'no template here: { braces }'\nroots:\n  robot:\n    prompt: '{{ a }}'\n")
    loaded = _load(text)
    assert loaded.spec.vars["a"] == "{{ b }}"
    assert loaded.spec.roots["robot"].prompt == "{{ b }}"  # rendered once, not recursively
    assert loaded.spec.description == "no template here: { braces }"


def test_sandbox_escapes_never_execute(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a) or 0)
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: calls.append(a))
    attempts = [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.system('touch pwned') }}",
        "{{ range.__self__ }}",
        "{{ dict.__base__.__subclasses__() }}",
        "{{ self._TemplateReference__context }}",
        "{{ color.__class__.__init__.__globals__ }}",
        "{{ color.append('x') }}",
        "{{ 'a' * 10**9 }}",
        "{{ '{0.__class__}'.format(color) }}",
        "{{ lipsum(10**6) }}",
    ]
    monkeypatch.chdir(tmp_path)
    for attempt in attempts:
        text = f"version: 1\nvars:\n  color: [silver]\nroots:\n  robot:\n    prompt: {json.dumps(attempt)}\n"
        with pytest.raises(SpecError) as info:
            _load(text)
        problem = info.value.problems[0]
        assert (problem.line, problem.col, problem.path) == (6, 13, "roots.robot.prompt"), attempt
    assert calls == [] and not (tmp_path / "pwned").exists()


# --------------------------------------------------------------------------- positions


def test_positions():
    loaded = _load(DEMO)
    pos = loaded.positions
    assert pos[("edits", "robot-colors", "strength")] == (16, 15)
    assert pos[("edits", "robot-colors", "strength", KEY)] == (16, 5)
    assert pos[("edits", "robot-colors", KEY)] == (12, 3)
    assert pos[("roots", "robot", "prompt")] == (9, 13)
    assert pos[("defaults", "steps")] == (4, 28)
    assert pos[("vars", "color", 2)] == (6, 27)
    for i in range(3):
        assert pos[("edits", "robot-colors", "prompts", i)] == (15, 14)


def test_problem_and_where_walk_up():
    loaded = _load(DEMO, "specs/demo.yaml")
    assert loaded.where(("edits", "robot-colors", "strength")) == "specs/demo.yaml:16:15"
    assert loaded.where(("select", "picks", "manifest")) == "specs/demo.yaml:20:5"  # not written: its step
    problem = loaded.problem(("edits", "robot-colors", "prompts", 1), "no such image", "check it")
    assert problem.render() == (
        "specs/demo.yaml:15:14: error: edits.robot-colors.prompts[1]: no such image\n"
        "  15 |     prompts: \"a dancing {{ color }} robot\"\n"
        "                    ^\n"
        "hint: check it"
    )


def test_merge_keys():
    text = (
        "version: 1\n"
        "roots:\n"
        "  base: &base\n"
        "    prompt: a robot\n"
        "    candidates: 3\n"
        "    seed: 1\n"
        "  other:\n"
        "    <<: *base\n"
        "    seed: 2\n"
        "  third:\n"
        "    <<: [{steps: 5, seed: 9}, *base]\n"
    )
    loaded = _load(text)
    other, third = loaded.spec.roots["other"], loaded.spec.roots["third"]
    assert (other.prompt, other.candidates, other.seed) == ("a robot", 3, 2)
    assert (third.prompt, third.steps, third.seed) == ("a robot", 5, 9)  # earlier merge sources win
    pos = loaded.positions
    assert pos[("roots", "other", "seed")] == (9, 11)
    assert pos[("roots", "other", "prompt")] == (4, 13)  # where the merged value is written
    assert pos[("roots", "third", "seed")] == (11, 27)


def test_anchors_and_aliases():
    text = "version: 1\nroots:\n  a:\n    prompt: &p a robot\n  b:\n    prompt: *p\n"
    assert _load(text).spec.roots["b"].prompt == "a robot"


# --------------------------------------------------------------------------- limits


def _bomb(levels: int = 9, width: int = 10) -> str:
    lines = ["version: 1", "a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + f"\nroots:\n  robot:\n    prompt: *a{levels - 1}\n"


def test_alias_bomb_refused_quickly():
    start = time.perf_counter()
    with pytest.raises(SpecError, match="more than 100000 nodes"):
        _load(_bomb())
    assert time.perf_counter() - start < 1.0


def test_merge_key_bomb_refused_quickly():
    lines = ["version: 1", "m0: &m0 {" + ", ".join(f"k{j}: v" for j in range(10)) + "}"]
    for i in range(1, 9):
        lines.append(f"m{i}: &m{i} {{<<: [" + ", ".join([f"*m{i - 1}"] * 10) + "]}")
    start = time.perf_counter()
    with pytest.raises(SpecError, match="more than 100000 nodes"):
        _load("\n".join(lines) + "\n")
    assert time.perf_counter() - start < 1.0


def test_deep_nesting_refused():
    with pytest.raises(SpecError, match="nests deeper than 64"):
        _load("description: " + "[" * 100 + "]" * 100 + "\n")
    with pytest.raises(SpecError, match="invalid YAML"):
        _load("description: " + "[" * 5000 + "]" * 5000 + "\n")


def test_large_list_expansion_refused():
    text = _edit_spec('"{{ a }} {{ b }}"', "  a: [" + ", ".join(["x"] * 100) + "]\n  b: [" + ", ".join(["y"] * 100) + "]")
    with pytest.raises(SpecError, match="expands to 10000 values"):
        _load(text)


# --------------------------------------------------------------------------- schema


def test_committed_schema_is_current():
    committed = SCHEMA_PATH.read_text(encoding="utf-8")
    assert committed == schema_text(), (
        f"{SCHEMA_PATH} is stale: regenerate it with `python -m caspec.spec.schema` "
        "(or `caspec schema > caspec/spec/spec.schema.json`)")
    assert json.loads(committed) == json_schema()
    assert json_schema()["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_schema_accepts_valid_specs():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    data = yaml.safe_load(DEMO)
    assert list(validator.iter_errors(data)) == []
    data["model"] = {"base": "tiny", "dtype": "fp16"}
    data["edits"]["robot-colors"]["prompts"] = ["a", "b"]
    assert list(validator.iter_errors(data)) == []
    data["edits"]["robot-colors"]["strenght"] = 0.5
    assert list(validator.iter_errors(data)) != []
