"""Issue 4 end to end on `tiny`: two concepts from two roots, composed in mixed prompts with the paper's
scales, exported in every format, and measured (eval JSON, plot, threshold gate)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from test_review_browser import chromium  # noqa: F401  (the headless Chromium fixture)
from click.testing import CliRunner
from PIL import Image

from caspec.cli import main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str):
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two")
    shutil.copytree(ROOT / "specs" / "two-concepts", tmp / "two-concepts")
    spec = tmp / "two-concepts.yaml"
    shutil.copy(ROOT / "specs" / "two-concepts.yaml", spec)
    code, _, err = cli("run", str(spec))
    assert code == 0, err
    return spec, tmp / "out" / "two-concepts"


def test_compose_scales_and_metadata(built):
    _, out = built
    def used(name):
        return json.loads(Image.open(out / "story" / name).text["assets"])
    assert used("p0-c0.png") == [{"asset": "dancer", "scale": 0.8}, {"asset": "painting", "scale": 0.5}]
    assert used("p1-c1.png") == [{"asset": "dancer", "scale": 0.5}, {"asset": "painting", "scale": 0.8}]
    assert used("p2-c0.png") == [{"asset": "dancer", "scale": 0.8}]
    meta = Image.open(out / "story" / "p1-c0.png").text
    assert meta["prompt"] == "<style1> of a <robot1> on mars" and int(meta["seed"]) >= 0 and "key" not in meta
    assert (out / "story" / "index.html").exists()


def test_exports(built):
    _, out = built
    assert sorted(p.name for p in (out / "dancer-diffusers").iterdir()) == [
        ".caspec-key", "dance1.safetensors", "pytorch_lora_weights.safetensors", "robot1.safetensors",
        "robot2.safetensors"]
    from safetensors import safe_open

    with safe_open(str(out / "dancer-a1111" / "dancer.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in keys)
    assert any(k.startswith("lora_te_") and k.endswith(".alpha") for k in keys)
    with safe_open(str(out / "dancer-a1111" / "dance1.safetensors"), "pt") as f:
        assert list(f.keys()) == ["emb_params"]
    with safe_open(str(out / "painting-bundle" / "painting.safetensors"), "pt") as f:
        assert any(k.startswith("bundle_emb.") for k in f.keys())


def test_catalog_json_and_offline_page_in_headless_chromium(built, tmp_path, chromium):
    """`caspec assets catalog --spec`: both assets, their eval metrics, previews that load from disk
    only, and the diffusers snippet, checked in a real headless Chromium."""
    from playwright.sync_api import sync_playwright

    from test_review_browser import CHROMIUM_ARGS

    spec, _ = built
    out = tmp_path / "catalog"
    code, stdout, err = cli("assets", "catalog", "--spec", str(spec), "-o", str(out))
    assert code == 0, err
    data = json.loads((out / "catalog.json").read_text())
    assets = {a["name"]: a for a in data["assets"]}
    assert set(assets) == {"dancer", "painting"}
    dancer = assets["dancer"]
    assert [w["token"] for w in dancer["pseudo_words"]] == ["<dance1>", "<robot1>", "<robot2>"]
    assert dancer["base_model"] == "tiny" and dancer["previews"] and dancer["provenance"]["key"]
    assert set(dancer["metrics"]) == {"quality.prompt_consistency", "quality.identity_consistency", "quality.n"}
    assert "load_lora_weights" in dancer["usage"]["diffusers"] and "<lora:dancer:0.8>" in dancer["usage"]["a1111"]
    code, _, err = cli("assets", "catalog", str(out.parent / "nothing-here"), "-o", str(out))
    assert code == 2
    code, _, err = cli("assets", "catalog", str(spec.parent / "out" / "two-concepts"), "-o", str(tmp_path / "c2"))
    assert code == 0 and "2 asset(s)" in err, err  # a folder of asset folders

    requests: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("request", lambda r: requests.append(r.url))
            page.goto((out / "index.html").as_uri())
            assert page.get_by_test_id("count").inner_text() == "2 concept asset(s)"
            assert page.locator("article.asset").count() == 2
            page.wait_for_function("Array.from(document.images).every(i => i.complete)")
            widths = page.evaluate("Array.from(document.images).map(i => i.naturalWidth)")
            assert widths and all(w > 0 for w in widths)  # every preview loaded
            assert "load_textual_inversion" in page.get_by_test_id("diffusers-dancer").inner_text()
            assert "quality.identity_consistency" in page.get_by_test_id("asset-painting").inner_text()
        finally:
            browser.close()
    assert requests and all(u.startswith("file://") for u in requests), requests  # offline: nothing else


def test_eval_json_plot_and_gate(built):
    spec, out = built
    result = json.loads((out / "quality" / "eval.json").read_text())
    assert set(result["groups"]) == {"dancer", "painting"}
    assert result["groups"]["dancer"]["n"] == 6 and result["groups"]["painting"]["n"] == 4
    for group in result["groups"].values():
        assert -1 <= group["prompt_consistency"] <= 1 and -1 <= group["identity_consistency"] <= 1
    assert result["clip"]["model"] == "caspec-tiny-clip"
    assert Image.open(out / "quality" / "plot.png").format == "PNG"
    code, stdout, _ = cli("eval", str(spec))
    assert code == 0 and json.loads(stdout)["quality"] == result["groups"]
    spec.write_text(spec.read_text().replace("min_identity_consistency: -1.0", "min_identity_consistency: 0.9999"))
    code, _, err = cli("run", str(spec))
    assert code == 1
    assert "quality below threshold" in err and "identity_consistency" in err and "< 0.9999" in err


def test_reports_show_compose_thumbnails_and_failed_gates(built, tmp_path):
    """Runs after the gate was raised to 0.9999 above: the eval fails, and the reports say so."""
    from junitparser import JUnitXml

    spec, out = built
    md, xml = tmp_path / "report.md", tmp_path / "report.xml"
    code, _, err = cli("run", str(spec), "--report", str(md), "--junit", str(xml))
    assert code == 1, err
    cases = {c.name: c for s in JUnitXml.fromfile(str(xml)) for c in s}
    assert cases["story"].is_passed and not cases["quality"].is_passed
    gate = cases["quality: all identity_consistency >= 0.9999"]
    assert "quality below threshold" in gate.result[0].message
    text = md.read_text()
    shots = [line.split('"')[1] for line in text.splitlines() if line.startswith("<img src=")]
    assert len(shots) == 6 and all((md.parent / s).resolve().is_file() for s in shots)
    assert all((md.parent / s).resolve().parent == (out / "story").resolve() for s in shots)
