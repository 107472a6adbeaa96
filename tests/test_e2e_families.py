"""Every step kind end to end on `tiny-xl` (SDXL-shaped) and `tiny-v` (SD 2.x-shaped, v-prediction), through
the CLI, with nothing in the spec changing but `model`; and an SDXL asset refused by an SD 1.x compose."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from caspec.cli import main

pytestmark = pytest.mark.slow

SPEC = """
version: 1
name: fam
model: {model}
defaults: {{seed: 3, steps: 6}}
roots:
  robot: {{prompt: "a photo of a dancing robot", candidates: 1}}
edits:
  robots: {{from: robot, prompts: ["a dancing silver robot", "a dancing gold robot"], candidates: 1}}
select:
  picks: {{from: robots, by: clip, clip: {{min_direction: null, min_relative_direction: null}}}}
concepts:
  dancer:
    from: picks
    words:
      - {{token: "<dance1>", init: dance, vectors: 2}}
      - {{token: "<robot{{k}}>", init: robot}}
    train: {{phase1_steps: 2, phase2_steps: 2, checkpoint_every: 0}}
compose:
  story: {{assets: [dancer], prompts: ["a <dance1> <robot2> on mars"], images: 1}}
export:
  d: {{asset: dancer, format: diffusers}}
  a: {{asset: dancer, format: a1111}}
  b: {{asset: dancer, format: bundle}}
eval:
  quality: {{from: story, describe: {{"<dance1>": dancing, "<robot{{k}}>": robot}}}}
"""


def cli(*args: str):
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


@pytest.mark.parametrize("model,family,widths", [("tiny-xl", "sdxl", {"clip_l": 32, "clip_g": 48}),
                                                 ("tiny-v", "sd2", {"emb_params": 48})])
def test_every_step_kind_on_other_families(tmp_path, model, family, widths):
    from safetensors import safe_open

    spec = tmp_path / "fam.yaml"
    spec.write_text(SPEC.format(model=model))
    code, _, err = cli("run", str(spec))
    assert code == 0, err
    out = tmp_path / "out" / "fam"
    card = yaml.safe_load((out / "dancer" / "card.yaml").read_text())
    assert card["base_model"]["family"] == family and card["pseudo_words"][0]["vectors"] == 2
    with safe_open(str(out / "a" / "dance1.safetensors"), "pt") as fh:
        assert {k: fh.get_tensor(k).shape for k in fh.keys()} == {k: (2, d) for k, d in widths.items()}
    with safe_open(str(out / "a" / "dancer.safetensors"), "pt") as fh:
        keys = list(fh.keys())
        assert fh.metadata()["ss_base_model_version"] == {"sdxl": "sdxl_base_v1-0", "sd2": "sd_v2"}[family]
    prefixes = {k.split("_text_model")[0] for k in keys if "_text_model" in k}
    assert prefixes == ({"lora_te1", "lora_te2"} if family == "sdxl" else {"lora_te"})
    assert json.loads((out / "quality" / "eval.json").read_text())
    # every export reads back into the same family
    for fmt_dir in ("d", "a", "b"):
        code, _, err = cli("import", str(out / fmt_dir), str(tmp_path / f"back-{fmt_dir}"))
        assert code == 0, err
        back = yaml.safe_load((tmp_path / f"back-{fmt_dir}" / "card.yaml").read_text())
        assert back["base_model"]["family"] == family
    # cached: nothing runs again
    code, plan, _ = cli("plan", str(spec), "--json")
    assert {s["status"] for s in json.loads(plan)} == {"cached"}
    if family == "sdxl":  # an SDXL asset in an SD 1.x compose: a clear error naming both families
        other = tmp_path / "sd1.yaml"
        other.write_text(f"version: 1\nmodel: tiny\ndefaults: {{steps: 2}}\ncompose:\n  c:\n"
                         f"    assets: [{tmp_path / 'back-d'}]\n    prompts: [\"a <dance1>\"]\n")
        code, _, err = cli("run", str(other))
        assert code == 1 and "SDXL model" in err and "SD 1.x" in err, err
