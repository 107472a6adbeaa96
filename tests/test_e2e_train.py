"""Root -> edits -> pre-filled review -> concept training on `tiny`, through the CLI; a training killed
with kill -9 resumes from its checkpoint on the next run and gives the same asset as an uninterrupted one."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from caspec.cli import main
from caspec.store.local import LocalStore

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str):
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def copy_demo(folder: Path, **train: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "specs" / "train-demo", folder / "train-demo")
    text = (ROOT / "specs" / "train-demo.yaml").read_text()
    for name, value in train.items():
        text = text.replace(f"      {name}: ", f"      {name}: {value}  # was ")
    spec = folder / "train-demo.yaml"
    spec.write_text(text)
    return spec


def test_train_demo_end_to_end(tmp_path):
    spec = copy_demo(tmp_path)
    start = time.monotonic()
    code, _, err = cli("run", str(spec))
    assert code == 0, err
    assert time.monotonic() - start < 180
    asset = tmp_path / "out" / "train-demo" / "dancing-robot"
    assert {p.name for p in asset.iterdir()} >= {"embeddings.safetensors", "lora.safetensors", "card.yaml",
                                                  "loss.jsonl", "previews"}
    card = yaml.safe_load((asset / "card.yaml").read_text())
    assert [w["token"] for w in card["pseudo_words"]] == ["<dance1>", "<robot1>", "<robot2>", "<robot3>"]
    assert [w["role"] for w in card["pseudo_words"]] == ["constant", "varied", "varied", "varied"]
    assert card["captions"][2] == "a photo of <dance1> <robot3>"
    assert card["base_model"]["base"] == "tiny" and card["base_model"]["identity"]["kind"] == "tiny"
    assert card["training"]["phase1_steps"] == 40 and card["training"]["phase2_steps"] == 40
    assert card["run"] == {"checkpoint_every": 20, "preview_every": 0}  # not in the key, recorded here
    assert "checkpoint_every" not in card["training"]
    assert len(card["training_images"]["images"]) == 3
    assert all(len(img["digest"]) == 64 for img in card["training_images"]["images"])
    assert set(card["libraries"]) >= {"torch", "diffusers", "transformers", "peft"}
    assert isinstance(card["result"]["final_loss"], float)
    losses = [json.loads(line) for line in (asset / "loss.jsonl").read_text().splitlines()]
    assert len(losses) == 80 and {r["phase"] for r in losses} == {1, 2}
    assert list((asset / "previews").glob("*.png"))
    # the pre-filled manifest now carries digests and the keys have settled: a re-run is fully cached
    review = yaml.safe_load((tmp_path / "train-demo" / "picks.yaml").read_text())
    assert all(len(c["digest"]) == 64 for c in review["candidates"])
    code, out, _ = cli("plan", str(spec), "--json")
    assert {s["status"] for s in json.loads(out)} == {"cached"}
    code, out, err = cli("assets", "list", str(spec))
    assert code == 0 and out.startswith("dancing-robot\t<dance1> <robot1> <robot2> <robot3>\ttiny"), err
    code, out, err = cli("assets", "show", "dancing-robot", "--spec", str(spec))
    assert code == 0 and "<robot3>         varied" in out and "previews:" in out, err
    code, out, _ = cli("assets", "show", str(asset))
    assert code == 0 and "asset: dancing-robot" in out


def test_unknown_lora_target_fails_naming_the_field(tmp_path):
    spec = copy_demo(tmp_path)
    spec.write_text(spec.read_text().replace("      lora_rank: 4", "      lora_rank: 4\n      unet_targets: [to_q, to_kk]"))
    code, _, err = cli("run", str(spec))
    assert code == 1
    line = spec.read_text().splitlines().index("      unet_targets: [to_q, to_kk]") + 1
    assert f"failed: {spec}:{line}:28: concepts" in err and "concepts.dancing-robot.train.unet_targets[1]" in err and "'to_kk'" in err
    assert "Traceback" not in err


def _files(folder: Path, extra: tuple[str, ...] = ()) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in ("embeddings.safetensors", "lora.safetensors", *extra)}


def test_killed_training_resumes_and_matches_uninterrupted(tmp_path):
    steps = {"phase1_steps": 60, "phase2_steps": 60, "checkpoint_every": 10}
    straight = copy_demo(tmp_path / "straight", **steps)
    code, _, err = cli("run", str(straight))
    assert code == 0, err

    spec = copy_demo(tmp_path / "killed", **steps)
    proc = subprocess.Popen([sys.executable, "-m", "caspec", "run", str(spec)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    ckpts = spec.parent / ".caspec" / "checkpoints"
    deadline = time.monotonic() + 240
    while not any(ckpts.glob("*/checkpoint.pt")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (spec.parent / "out" / "train-demo" / "dancing-robot").exists()
    code, _, err = cli("run", str(spec))
    assert code == 0, err
    asset = spec.parent / "out" / "train-demo" / "dancing-robot"
    [record] = [r for r in LocalStore(spec.parent / ".caspec").records() if r.kind == "train"]
    assert record.meta["run"]["resumed_from"], "the second run should resume from the checkpoint"
    # the whole asset, card and loss log included, is the same bytes: how the run went (time, resumption)
    # is in the record's meta, so a resumed training also keeps downstream steps cached (early cutoff)
    names = ("card.yaml", "loss.jsonl")
    assert _files(asset, names) == _files(straight.parent / "out" / "train-demo" / "dancing-robot", names)
    assert not any(ckpts.iterdir())  # checkpoints are dropped once the asset is committed


def test_forced_retraining_with_the_same_weights_keeps_compose_cached(tmp_path):
    """Early cutoff through training: the asset's files hold nothing about how the run went (time,
    resumption), so a forced retrain that makes the same weights (CPU, same threads) leaves compose cached."""
    spec = copy_demo(tmp_path, phase1_steps=4, phase2_steps=4)
    spec.write_text(spec.read_text() + "\ncompose:\n  story:\n    assets: [dancing-robot]\n"
                    "    prompts: [\"a photo of <dance1> <robot1>\"]\n    images: 1\n    steps: 2\n")
    code, _, err = cli("run", str(spec))
    assert code == 0, err
    code, _, err = cli("run", str(spec), "--force", "dancing-robot")
    assert code == 0, err
    assert "1 ran, 4 cached" in err, err  # the training ran again; compose (and the rest) stayed cached
    [train] = [r for r in LocalStore(spec.parent / ".caspec").records() if r.kind == "train"]
    assert train.meta["run"]["steps_run"] == 8
