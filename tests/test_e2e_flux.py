"""Every step kind end to end on `tiny-flux` (FLUX.1-dev-shaped) through the CLI, with nothing in the spec
changing but `model` (plus a Kontext instruction edit and a noise level); FLUX.1 and SD 1.x assets refused by
each other's compose; a Kontext edit step feeding an SD 1.x training."""
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
  robots: {{from: robot, prompts: ["a dancing silver robot", "a dancing gold robot"], candidates: 1, noise_level: 0.86}}
  purple: {{from: robot, method: instruct, prompts: ["make the robot purple"], shows: ["a purple dancing robot"],
           candidates: 2}}
select:
  picks: {{from: robots, by: clip, clip: {{min_direction: null, min_relative_direction: null}}}}
  kontext: {{from: purple, by: clip, clip: {{min_direction: null, min_relative_direction: null, top_k: 1}}}}
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


SD1_SPEC = """
version: 1
name: s
model: tiny
defaults: {seed: 3, steps: 4}
roots:
  robot: {prompt: "a photo of a dancing robot", candidates: 2}
concepts:
  dancer:
    from: robot
    words: [{token: "<dance1>", init: dance}]
    train: {phase1_steps: 2, phase2_steps: 2, checkpoint_every: 0}
"""


def cli(*args: str):
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def test_every_step_kind_on_flux(tmp_path):
    from safetensors import safe_open

    spec = tmp_path / "fam.yaml"
    spec.write_text(SPEC.format(model="tiny-flux"))
    code, _, err = cli("run", str(spec))
    assert code == 0, err
    out = tmp_path / "out" / "fam"
    card = yaml.safe_load((out / "dancer" / "card.yaml").read_text())
    assert card["base_model"]["family"] == "flux" and card["pseudo_words"][0]["vectors"] == 2
    assert len(list((out / "purple").glob("s0-p0-c*.png"))) == 2  # instruction edits, then CLIP kept the best
    with safe_open(str(out / "a" / "dance1.safetensors"), "pt") as fh:  # ComfyUI's key too, one vector pair
        assert {k: tuple(fh.get_tensor(k).shape) for k in fh.keys()} == {"clip_l": (2, 32), "t5": (2, 32),
                                                                         "t5xxl": (2, 32)}
    with safe_open(str(out / "d" / "dance1.safetensors"), "pt") as fh:  # diffusers' pivotal-tuning layout
        assert set(fh.keys()) == {"clip_l", "t5"}
    with safe_open(str(out / "a" / "dancer.safetensors"), "pt") as fh:
        keys = list(fh.keys())
        assert fh.metadata()["ss_base_model_version"] == "flux1"
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv.") for k in keys)
    assert any(k.startswith("lora_unet_single_blocks_0_linear1.") for k in keys)
    assert any(k.startswith("lora_te1_text_model_") for k in keys)
    with safe_open(str(out / "b" / "dancer.safetensors"), "pt") as fh:
        assert {"bundle_emb.dance1.clip_l", "bundle_emb.dance1.t5"} <= set(fh.keys())
    assert json.loads((out / "quality" / "eval.json").read_text())
    for fmt_dir in ("d", "a", "b"):  # every export reads back as a FLUX.1 asset
        code, _, err = cli("import", str(out / fmt_dir), str(tmp_path / f"back-{fmt_dir}"))
        assert code == 0, err
        back = yaml.safe_load((tmp_path / f"back-{fmt_dir}" / "card.yaml").read_text())
        assert back["base_model"]["family"] == "flux"
    code, plan, _ = cli("plan", str(spec), "--json")  # cached: nothing runs again
    assert {s["status"] for s in json.loads(plan)} == {"cached"}

    # a FLUX.1 asset in an SD 1.x compose, and an SD 1.x asset in a FLUX.1 compose: exit 1 naming both families
    sd1 = tmp_path / "sd1"
    sd1.mkdir()
    (sd1 / "s.yaml").write_text(SD1_SPEC)
    code, _, err = cli("run", str(sd1 / "s.yaml"))
    assert code == 0, err
    for model, asset, ours, theirs in (("tiny", tmp_path / "back-d", "SD 1.x", "FLUX.1"),
                                       ("tiny-flux", sd1 / "out" / "s" / "dancer", "FLUX.1", "SD 1.x")):
        other = tmp_path / f"mix-{model}.yaml"
        other.write_text(f"version: 1\nmodel: {model}\ndefaults: {{steps: 2}}\ncompose:\n  c:\n"
                         f"    assets: [{asset}]\n    prompts: [\"a <dance1>\"]\n")
        code, _, err = cli("run", str(other))
        assert code == 1 and f"trained on an {theirs} model" in err and ours in err, err


def test_kontext_edit_feeds_an_sd1_training(tmp_path):
    """An edits step with its own (Kontext) model: only that step's key follows it; SD 1.x trains on its output."""
    spec = tmp_path / "mix.yaml"
    body = """
version: 1
name: mix
model: tiny
defaults: {seed: 5, steps: 4}
roots:
  robot: {prompt: "a photo of a robot", candidates: 1}
edits:
  purple: {from: robot, model: tiny-flux, method: instruct, prompts: ["make the robot purple", "make it gold"],
           candidates: 1}
concepts:
  bot:
    from: purple
    words: [{token: "<bot>", init: robot}]
    train: {phase1_steps: 2, phase2_steps: 2, checkpoint_every: 0}
"""
    spec.write_text(body)
    code, _, err = cli("run", str(spec))
    assert code == 0, err
    card = yaml.safe_load((tmp_path / "out" / "mix" / "bot" / "card.yaml").read_text())
    assert card["base_model"]["family"] == "sd1"
    code, plan, _ = cli("plan", str(spec), "--json")
    keys = {s["id"]: s["key"] for s in json.loads(plan)}
    # the edit's model enters its key only: the root keeps the key it has without the edits step's model
    spec.write_text(body.replace("model: tiny-flux, ", "model: tiny-flux-schnell, "))
    code, plan2, _ = cli("plan", str(spec), "--json")
    keys2 = {s["id"]: s["key"] for s in json.loads(plan2)}
    assert keys2["robot"] == keys["robot"] and keys2["purple"] != keys["purple"]
