"""The compose step: one pipeline, per-prompt LoRA scales by the paper's rule, assets a prompt does not
use contribute nothing, spec errors for unknown or ambiguous pseudo-words, base-model mismatch refused."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from caspec.errors import SpecError
from caspec.exec.runner import run
from caspec.models.load import load_pipeline
from caspec.models.sampling import txt2img
from caspec.ops import compose as C
from caspec.plan.graph import make_plan
from caspec.spec.load import load_spec
from caspec.spec.models import ModelSpec
from caspec.store import LocalStore
from caspec.train import PseudoWord, TrainConfig, train_concept


def test_prompt_scales_follow_the_paper_rule():
    tokens = [["<dance1>", "<robot1>"], ["<style1>"], ["<cat1>"]]
    none = [None, None, None]
    assert C.prompt_scales("<style1> of a <dance1> <robot1>", tokens, 0.8, 0.5, none) == [0.5, 0.8, 0.0]
    assert C.prompt_scales("a <robot1> <dance1> in <style1>", tokens, 0.8, 0.5, none) == [0.8, 0.5, 0.0]
    assert C.prompt_scales("a plain photo", tokens, 0.8, 0.5, none) == [0.0, 0.0, 0.0]
    assert C.prompt_scales("<cat1> and <style1>", tokens, 0.8, 0.5, [None, 0.3, None]) == [0.0, 0.3, 0.8]


def make_asset(folder: Path, words: list[tuple[str, str]], color: tuple[int, int, int]) -> None:
    pipe = load_pipeline(ModelSpec(), folder.parent, fresh=True)
    img = Image.new("RGB", (64, 64), color)
    caption = " ".join(w for w, _ in words)
    cfg = TrainConfig(phase1_steps=2, phase2_steps=2, lr_lora_unet=0.05, lr_lora_text=0.05, checkpoint_every=0)
    train_concept(pipe, [PseudoWord(w, init, "constant") for w, init in words], [(img, caption)], cfg, folder,
                  checkpoint_dir=folder.parent / f"ckpt-{folder.name}", preview_prompts=[])
    from caspec.assets.format import write_card
    from caspec.models.load import model_identity

    write_card(folder, {"pseudo_words": [{"token": w, "init": i, "role": "constant"} for w, i in words],
                        "base_model": {"base": "tiny", "identity": model_identity(ModelSpec(), folder.parent)}})


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("library")
    make_asset(root / "robot", [("<robot1>", "robot")], (200, 30, 30))
    make_asset(root / "style", [("<style1>", "style")], (30, 30, 200))
    return root


SPEC = """
version: 1
name: comp
defaults: {{seed: 5, steps: 6}}
compose:
  story:
    assets: [{a}, {b}]
    prompts: ["a <robot1> in <style1>", "<style1> of a <robot1>", "a photo of a cat"]
    images: 1
"""


def write_spec(tmp: Path, library: Path, a: str = "./lib/robot", b: str = "./lib/style") -> Path:
    (tmp / "lib").symlink_to(library, target_is_directory=True)
    spec = tmp / "comp.yaml"
    spec.write_text(textwrap.dedent(SPEC.format(a=a, b=b)))
    return spec


def test_compose_scales_per_prompt_and_bare_equality(tmp_path, library, monkeypatch):
    spec = write_spec(tmp_path, library)
    seen = []
    real = C.set_scales

    def spy(pipe, scales):
        real(pipe, scales)
        layers = {}
        for comp in ("unet", "text_encoder"):
            for name, layer in getattr(pipe, comp).named_modules():
                if hasattr(layer, "scaling") and layer.scaling:
                    layers[comp] = dict(layer.scaling)
                    break
        seen.append(layers)

    monkeypatch.setattr(C, "set_scales", spy)
    loaded = load_spec(spec)
    store = LocalStore(tmp_path / ".caspec")
    summary = run(loaded, store)
    assert summary.exit_code == 0, summary.outcomes["story"]
    # the scales actually set on the adapters, per prompt (alpha == rank here, so scaling == scale), then
    # every adapter at 0 for the plain-prompt twins (`baseline`)
    assert [s["unet"] for s in seen] == [{"asset0": 0.8, "asset1": 0.5}, {"asset0": 0.5, "asset1": 0.8},
                                        {"asset0": 0.0, "asset1": 0.0}, {"asset0": 0.0, "asset1": 0.0}]
    assert [s["text_encoder"] for s in seen] == [s["unet"] for s in seen]
    out = tmp_path / "out" / "comp" / "story"
    meta = Image.open(out / "p1-c0.png").text
    assert json.loads(meta["assets"]) == [{"asset": "./lib/robot", "scale": 0.5}, {"asset": "./lib/style", "scale": 0.8}]
    assert (out / "index.html").exists()
    # a prompt without pseudo-words: exactly the bare model's image
    cat = Image.open(out / "p2-c0.png")
    bare = load_pipeline(ModelSpec(), tmp_path, fresh=True)
    ref = txt2img(bare, ["a photo of a cat"], [int(cat.text["seed"])], steps=6, guidance_scale=7.5, negative_prompt="")[0]
    assert np.array_equal(np.asarray(cat), np.asarray(ref))
    # and the assets do change images that use them
    robot = txt2img(bare, ["a <robot1> in <style1>"], [int(Image.open(out / "p0-c0.png").text["seed"])], steps=6)[0]
    assert not np.array_equal(np.asarray(Image.open(out / "p0-c0.png")), np.asarray(robot))


def test_baseline_twins_are_the_plain_prompt_on_the_same_seed_without_the_assets(tmp_path, library):
    """`baseline` (default): each image that uses an asset gets a twin drawn from its prompt in plain words
    (the words the pseudo-words were initialised from) on its seed, by the bare model; the sheet shows both."""
    spec = write_spec(tmp_path, library)
    store = LocalStore(tmp_path / ".caspec")
    summary = run(load_spec(spec), store)
    assert summary.exit_code == 0, summary.outcomes["story"]
    out = tmp_path / "out" / "comp" / "story"
    record = store.get(make_plan(load_spec(spec), store).nodes["story"].key)
    images, twins = record.result["images"], {b["id"]: b for b in record.result["baseline"]}
    assert [twins[e["baseline"]]["prompt"] for e in images[:2]] == ["a robot in style", "style of a robot"]
    assert "baseline" not in images[2]  # "a photo of a cat" uses no asset: it is its own plain prompt
    assert len(twins) == 2 and record.result["roots"] == []  # asset folders: no root known
    bare = load_pipeline(ModelSpec(), tmp_path, fresh=True)
    for e in images[:2]:
        twin = twins[e["baseline"]]
        assert twin["seed"] == e["seed"] and twin["plain_of"] == [e["id"]]
        ref = txt2img(bare, [twin["prompt"]], [e["seed"]], steps=6, guidance_scale=7.5, negative_prompt="")[0]
        assert np.array_equal(np.asarray(Image.open(out / twin["file"]).convert("RGB")), np.asarray(ref))
    sheet = (out / "index.html").read_text()
    assert "plain prompt: a robot in style (no asset)" in sheet and 'src="p0-c0-plain.png"' in sheet
    assert sheet.index('src="p0-c0-plain.png"') < sheet.index('src="p0-c0.png"')


def test_baseline_off_draws_no_twins_and_has_its_own_key(tmp_path, library):
    spec = write_spec(tmp_path, library)
    store = LocalStore(tmp_path / ".caspec")
    key_on = make_plan(load_spec(spec), store).nodes["story"].key
    spec.write_text(spec.read_text().replace("images: 1", "images: 1\n    baseline: false"))
    loaded = load_spec(spec)
    assert make_plan(loaded, store).nodes["story"].key != key_on
    summary = run(loaded, store)
    assert summary.exit_code == 0
    result = store.get(make_plan(loaded, store).nodes["story"].key).result
    assert "baseline" not in result and not any("baseline" in e for e in result["images"])
    assert not list((tmp_path / "out" / "comp" / "story").glob("*plain*"))


def test_plain_words_say_a_repeated_word_once_and_drop_words_without_one():
    words = {"<tint1>": "color", "<mystar>": "star", "<x>": ""}
    assert C.plain_words("a red <mystar>", words) == "a red star"
    assert C.plain_words("a <tint1> <mystar>", words) == "a color star"
    assert C.plain_words("a <x> <mystar> at the left", words) == "a star at the left"


def test_asset_files_enter_the_key(tmp_path, library):
    spec = write_spec(tmp_path, library)
    store = LocalStore(tmp_path / ".caspec")
    key = make_plan(load_spec(spec), store).nodes["story"].key
    card = library / "style" / "card.yaml"
    original = card.read_text()
    try:
        card.write_text(original + "\n# touched\n")
        assert make_plan(load_spec(spec), store).nodes["story"].key != key
    finally:
        card.write_text(original)
    assert make_plan(load_spec(spec), store).nodes["story"].key == key


def test_unknown_and_ambiguous_pseudo_words_are_spec_errors(tmp_path, library):
    spec = write_spec(tmp_path, library)
    spec.write_text(spec.read_text().replace("a photo of a cat", "a <dog1> photo"))
    with pytest.raises(SpecError) as err:
        load_spec(spec)
    text = err.value.render()
    assert "comp.yaml:8:" in text and "compose.story.prompts[2]: no asset of this step defines the pseudo-word `<dog1>`" in text
    spec.write_text(textwrap.dedent(SPEC.format(a="./lib/robot", b="./lib/robot")))
    with pytest.raises(SpecError) as err:
        load_spec(spec)
    assert "both define the pseudo-word `<robot1>`" in err.value.render()
    spec.write_text(textwrap.dedent(SPEC.format(a="./lib/robot", b="robto")))
    with pytest.raises(SpecError) as err:
        load_spec(spec)
    assert "`robto` is not a `concepts` step" in err.value.render()


def _copy_with_base(tmp_path, library, base_model) -> None:
    """``./other``: a copy of the robot asset whose card names another base model (``base_model(card)``)."""
    other = tmp_path / "other"
    other.mkdir()
    for f in (library / "robot").iterdir():
        if f.is_file():
            (other / f.name).write_bytes(f.read_bytes())
    card = yaml.safe_load((other / "card.yaml").read_text())
    card["base_model"] = base_model(card["base_model"])
    (other / "card.yaml").write_text(yaml.safe_dump(card))


def test_asset_from_another_base_model_is_refused(tmp_path, library):
    _copy_with_base(tmp_path, library, lambda _: {"base": "runwayml/sd15", "identity": {"kind": "hub", "commit": "abc"}})
    spec = write_spec(tmp_path, library, a="./other")
    summary = run(load_spec(spec), LocalStore(tmp_path / ".caspec"))
    outcome = summary.outcomes["story"]
    assert outcome.status == "failed"
    assert "runwayml/sd15" in outcome.message and "`tiny`" in outcome.message
    assert "kind: hub vs tiny" in outcome.message  # says what differs
    assert "identities differ" not in outcome.message


def test_asset_trained_in_fp32_composes_in_bf16(tmp_path, library):
    """Compatibility is the identity of the weights: the library was trained with dtype fp32 (CPU),
    this step runs the same tiny weights in bf16."""
    card = yaml.safe_load((library / "robot" / "card.yaml").read_text())
    assert card["base_model"]["identity"]["dtype"] == "fp32"
    spec = write_spec(tmp_path, library)
    spec.write_text(spec.read_text().replace("name: comp\n", "name: comp\nmodel: {base: tiny, dtype: bf16}\n"))
    summary = run(load_spec(spec), LocalStore(tmp_path / ".caspec"))
    assert summary.exit_code == 0, summary.outcomes["story"].message
    assert len(list((tmp_path / "out" / "comp" / "story").glob("p*-c?.png"))) == 3


def test_asset_from_other_tiny_weights_is_refused_saying_what_differs(tmp_path, library):
    _copy_with_base(tmp_path, library, lambda base: {**base, "identity": {**base["identity"], "seed": 1, "dtype": "bf16"}})
    spec = write_spec(tmp_path, library, a="./other")
    outcome = run(load_spec(spec), LocalStore(tmp_path / ".caspec")).outcomes["story"]
    assert outcome.status == "failed"
    assert "`./other`" in outcome.message and "seed: 1 vs 20240229" in outcome.message
    assert "dtype" not in outcome.message  # the dtype is no part of the weights


def test_a_prompt_that_would_cut_off_a_pseudo_word_fails_at_its_position(tmp_path, library):
    """Truncated silently, `<style1>` would lose its embedding while its asset still got LoRA 0.5."""
    spec = write_spec(tmp_path, library)
    long = "a <robot1> " + "very " * 73 + "in <style1>"
    spec.write_text(spec.read_text().replace('"a <robot1> in <style1>"', f'"{long}"'))
    outcome = run(load_spec(spec), LocalStore(tmp_path / ".caspec")).outcomes["story"]
    assert outcome.status == "failed"
    assert f"{spec}:8:" in outcome.message and "compose.story.prompts[0]" in outcome.message
    assert "`<style1>` would be cut off" in outcome.message and "`<robot1>`" not in outcome.message
    assert "shorten it" in outcome.hint


def test_same_seeds_mask_the_pseudo_words_and_stay_out_of_default_keys(tmp_path, library):
    """`same_seeds: true`: prompts that differ only in whose pseudo-words they use get the same seeds (methods
    compared on the same noise); the default keeps seeds from the whole prompt and the key it had."""
    assert C.image_seeds(5, "a red <spot-ti>", 3, same_seeds=True) == C.image_seeds(5, "a red <spot-both>", 3,
                                                                                    same_seeds=True)
    assert C.image_seeds(5, "a red <spot-ti>", 3) != C.image_seeds(5, "a red <spot-both>", 3)
    assert C.image_seeds(5, "a red <x>", 2, same_seeds=True) != C.image_seeds(5, "a cyan <x>", 2, same_seeds=True)
    from caspec.ops.seeds import derive_seed

    assert C.image_seeds(5, "a <x>", 2) == [derive_seed(5, "compose", "a <x>", k) for k in range(2)]  # as before
    spec = write_spec(tmp_path, library)
    store = LocalStore(tmp_path / ".caspec")
    node = make_plan(load_spec(spec), store).nodes["story"]
    assert "same_seeds" not in node.params
    spec.write_text(spec.read_text().replace("    images: 1\n", "    images: 1\n    same_seeds: true\n"))
    loaded = load_spec(spec)
    assert make_plan(loaded, store).nodes["story"].key != node.key
    assert run(loaded, store).exit_code == 0
    out = tmp_path / "out" / "comp" / "story"
    seeds = [int(Image.open(out / f"p{j}-c0.png").text["seed"]) for j in range(3)]
    assert seeds == [C.image_seeds(5, p, 1, same_seeds=True)[0]
                     for p in ("a <robot1> in <style1>", "<style1> of a <robot1>", "a photo of a cat")]
