"""The `toy` model and CLIP trained on the shapes world: the training scripts run and are deterministic,
`model: toy` loads the shipped weights, and the trained models reach the measured targets (issue 6)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from caspec.cli import main
from caspec.models.toy import WEIGHTS_DIR, toy_identity, weights_present
from caspec.spec.load import load_spec_text

ROOT = Path(__file__).resolve().parent.parent


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def test_training_scripts_run_and_are_deterministic(tmp_path):
    """`caspec toyworld train --quick`: a few steps of every phase; the same seed gives the same bytes."""
    outs = []
    for name in ("a", "b"):
        r = CliRunner().invoke(main, ["toyworld", "train", "--quick", "--out", str(tmp_path / name)],
                               catch_exceptions=False)
        assert r.exit_code == 0, r.stderr
        outs.append(tmp_path / name)
    a, b = (_digests(o) for o in outs)
    assert set(a) == {"unet.safetensors", "vae.safetensors", "text_encoder.safetensors", "clip.safetensors"}
    assert a == b
    log = [json.loads(line) for line in (outs[0] / "train-log.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in log} >= {"vae", "unet"}
    assert all(np.isfinite(r.get("loss", 0.0)) for r in log)
    # a different seed trains different weights
    r = CliRunner().invoke(main, ["toyworld", "train", "--quick", "--what", "diffusion", "--seed", "5",
                                  "--out", str(tmp_path / "c")], catch_exceptions=False)
    assert r.exit_code == 0
    assert _digests(tmp_path / "c")["unet.safetensors"] != a["unet.safetensors"]


def test_quick_weights_load_as_a_pipeline_and_sample(tmp_path):
    from caspec.toyworld.measure import toy_pipe
    from caspec.models.sampling import txt2img

    r = CliRunner().invoke(main, ["toyworld", "train", "--quick", "--what", "diffusion", "--out", str(tmp_path / "w")],
                           catch_exceptions=False)
    assert r.exit_code == 0
    pipe = toy_pipe(tmp_path / "w")
    assert pipe.resolution == 32 and pipe.vae_scale_factor == 4
    (img,) = txt2img(pipe, ["a red circle"], [1], steps=2)
    assert img.size == (32, 32)


def test_bad_training_setting_is_a_usage_error(tmp_path):
    r = CliRunner().invoke(main, ["toyworld", "train", "--quick", "--set", "unet_stepz=3", "--out", str(tmp_path)])
    assert r.exit_code == 2
    assert "unknown setting `unet_stepz`" in r.stderr and "unet_steps" in r.stderr


def test_shipped_weights_and_identity():
    assert weights_present()
    ident = toy_identity()
    assert set(ident["weights"]) == {"unet", "vae", "text_encoder"}
    assert (WEIGHTS_DIR / "clip.safetensors").is_file()
    total = sum(p.stat().st_size for p in WEIGHTS_DIR.glob("*.safetensors"))
    assert total < 40e6  # small enough to ship in the package


def test_toy_spec_defaults_to_the_toy_clip(tmp_path):
    text = """
version: 1
model: toy
roots: {r: {prompt: "a red circle", candidates: 2}}
select:
  auto: {from: r, by: clip}
  custom: {from: r, by: clip, clip: {model: caspec-tiny-clip}}
"""
    spec = load_spec_text(text, tmp_path / "s.yaml").spec
    assert spec.select["auto"].clip.model == "caspec-toy-clip"
    assert spec.select["custom"].clip.model == "caspec-tiny-clip"
    other = load_spec_text(text.replace("model: toy", "model: tiny"), tmp_path / "s.yaml").spec
    assert other.select["auto"].clip.model == "caspec-tiny-clip"  # `tiny`: its own (random-weight) CLIP


def test_toy_model_identity_enters_plan_without_torch(tmp_path):
    import subprocess
    import sys

    spec = tmp_path / "s.yaml"
    spec.write_text('version: 1\nmodel: toy\nroots: {r: {prompt: "a red circle", candidates: 1}}\n')
    code = ("import sys, json; from caspec.spec.load import load_spec; from caspec.plan.graph import make_plan;"
            "from caspec.store import open_store; import pathlib;"
            f"p = make_plan(load_spec({str(spec)!r}), open_store(pathlib.Path({str(tmp_path / 'st')!r})));"
            "print('torch' in sys.modules, p.nodes['r'].status)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "run"]
