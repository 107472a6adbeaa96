"""End to end on the embedded `tiny` model through the CLI: run, pause at review, approve, resume,
fully cached re-run, and a one-prompt change that re-runs only its branch."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from caspec.cli import main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent

# The demo spec plus an independent second branch from the same root, so a change can be confined to one.
EXTRA = """
  robot-hats:
    from: robot
    pick: 1
    prompts: ["a photo of a dancing robot with a hat"]
    candidates: 1
"""


def cli(*args: str):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def plan_json(spec: Path) -> dict[str, dict]:
    code, out, err = cli("plan", str(spec), "--json")
    assert code == 0, err
    return {s["id"]: s for s in json.loads(out)}


@pytest.fixture()
def demo(tmp_path):
    spec = tmp_path / "demo.yaml"
    text = (ROOT / "specs" / "demo.yaml").read_text()
    spec.write_text(text.replace("\nselect:", EXTRA + "\nselect:"))
    return spec


def test_demo_run_review_resume_and_cache(demo, tmp_path):
    out = tmp_path / "out" / "demo"
    manifest = tmp_path / "reviews" / "demo" / "picks.yaml"

    code, _, err = cli("run", str(demo))
    assert code == 3, err
    assert "waits for review" in err and "caspec review" in err
    assert sorted(p.name for p in (out / "robot").glob("*.png")) == ["c000.png", "c001.png"]
    assert len(list((out / "robot-colors").glob("*.png"))) == 6  # 3 colors x 2 candidates
    png = Image.open(out / "robot-colors" / "s0-p1-c0.png")
    assert png.size == (64, 64)
    assert png.text["prompt"] == "a photo of a dancing purple robot"
    assert "key" not in png.text and "caspec_version" not in png.text  # nothing that changes when pixels do not
    assert int(png.text["seed"]) >= 0
    data = yaml.safe_load(manifest.read_text())
    assert len(data["candidates"]) == 6 and not any(c["keep"] for c in data["candidates"])

    code, out_text, err = cli("review", str(demo), "--step", "picks", "--keep", "s0-p0-c0", "s0-p1-c1")
    assert code == 0, err
    assert "2 of 6 kept" in out_text

    code, _, err = cli("run", str(demo))
    assert code == 0, err
    assert sorted(p.name for p in (out / "picks").glob("*.png")) == ["s0-p0-c0.png", "s0-p1-c1.png"]
    assert (out / "picks" / "s0-p1-c1.png").read_bytes() == (out / "robot-colors" / "s0-p1-c1.png").read_bytes()

    # second complete run executes no step
    plan = plan_json(demo)
    assert {s["status"] for s in plan.values()} == {"cached"}
    code, _, err = cli("run", str(demo))
    assert code == 0 and " ran" not in err and "4 cached" in err

    # changing one edit prompt re-runs only that branch
    before = {sid: s["key"] for sid, s in plan.items()}
    demo.write_text(demo.read_text().replace("with a hat", "with a scarf"))
    plan = plan_json(demo)
    changed = {sid for sid, s in plan.items() if s["key"] != before[sid]}
    assert changed == {"robot-hats"}
    assert plan["robot-hats"]["status"] == "run"
    assert "params.prompts" in plan["robot-hats"]["reasons"][0]
    code, _, err = cli("run", str(demo))
    assert code == 0, err
    assert "1 ran, 3 cached" in err

    # adding a color keeps every existing candidate's pixels bit-identical (seeds per prompt and index)
    def pixels(folder):
        return {p.name: Image.open(p).tobytes() for p in folder.glob("*.png")}

    old = pixels(out / "robot-colors")
    demo.write_text(demo.read_text().replace("[silver, purple, gold]", "[silver, purple, gold, red]"))
    code, _, err = cli("run", str(demo))
    assert code == 0, err  # the manifest still names existing candidates; the new ones are appended unreviewed
    new = pixels(out / "robot-colors")
    assert len(new) == 8 and all(new[name] == data for name, data in old.items())
    assert len(yaml.safe_load(manifest.read_text())["candidates"]) == 8


def test_store_option_and_gc(demo, tmp_path):
    store = tmp_path / "elsewhere"
    code, _, err = cli("run", str(demo), "--store", str(store), "--until", "robot")
    assert code == 0, err
    assert (store / "actions").is_dir() and not (tmp_path / ".caspec").exists()
    demo.write_text(demo.read_text().replace("a photo of a dancing robot\"", "a photo of a jumping robot\""))
    code, out, err = cli("gc", str(demo), "--store", str(store), "--dry-run")
    assert code == 0, err
    assert "would remove 1 step(s)" in out
    code, out, err = cli("gc", str(demo), "--store", str(store))
    assert code == 0 and "removed 1 step(s)" in out and "freed" in out
    assert not list((store / "actions").rglob("*.json"))
