"""CLIP metrics on the tiny random-weight CLIP (`caspec-tiny-clip`): embeddings, the two consistency
metrics, pseudo-word replacement, the Fig. 5 plot, thresholds, identity and load errors (all offline)."""
from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import pytest
from PIL import Image

from caspec.errors import ModelError
from caspec.metrics import (
    ClipSpec,
    check_thresholds,
    clear_clip_cache,
    clip_identity,
    evaluate,
    identity_consistency,
    plain_prompt,
    plot,
    prompt_consistency,
    save_result,
)
from caspec.metrics import load_clip

torch = pytest.importorskip("torch")

TINY = ClipSpec(model="caspec-tiny-clip", pretrained="random")


def _images(n: int, seed: int = 0, size: tuple[int, int] = (80, 64)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def clip():
    return load_clip(TINY)


# ---------------------------------------------------------------------------------------------
# embeddings


def test_random_init_is_deterministic_and_leaves_global_rng_alone(clip):
    images = _images(3)
    first = clip.embed_images(images)
    texts = clip.embed_texts(["a photo of a robot", "a dancing cat"])
    clear_clip_cache()
    try:
        torch.manual_seed(5)
        expected = torch.rand(3)
        torch.manual_seed(5)
        again = load_clip(TINY)
        assert torch.equal(torch.rand(3), expected)  # loading used its own seed, not the caller's RNG
        assert again is not clip
        assert torch.equal(again.embed_images(images), first)
        assert torch.equal(again.embed_texts(["a photo of a robot", "a dancing cat"]), texts)
        assert load_clip(TINY) is again  # cached per process
    finally:
        clear_clip_cache()
    assert first.shape == (3, 64) and first.dtype == torch.float32
    assert torch.allclose(first.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(texts.norm(dim=1), torch.ones(2), atol=1e-5)


def test_identical_images_and_self_similarity(clip):
    img = _images(1, seed=3)[0]
    assert identity_consistency(clip, [img, img.copy(), img.copy()]) == pytest.approx(1.0, abs=1e-6)
    emb = clip.embed_images(_images(4, seed=4))
    assert torch.allclose(torch.diag(emb @ emb.T), torch.ones(4), atol=1e-6)
    assert identity_consistency(clip, [img]) is None
    assert identity_consistency(clip, []) is None


def test_prompt_consistency_matches_hand_computation(clip):
    images = _images(3, seed=5)
    prompts = ["a robot", "a red car", "a robot"]
    got = prompt_consistency(clip, images, prompts)
    img, txt = clip.embed_images(images), clip.embed_texts(prompts)
    want = [float(img[i] @ txt[i]) for i in range(3)]
    assert got == pytest.approx(want, abs=1e-6)
    assert prompt_consistency(clip, [], []) == []
    with pytest.raises(ValueError, match="prompts"):
        prompt_consistency(clip, images, prompts[:2])

    # identity consistency is the mean of the pairwise cosines i < j
    sims = img @ img.T
    pairs = [float(sims[i, j]) for i in range(3) for j in range(i + 1, 3)]
    assert identity_consistency(clip, images) == pytest.approx(sum(pairs) / 3, abs=1e-6)


def test_batching_gives_the_same_embeddings(clip):
    images = _images(5, seed=6, size=(50, 90))  # not square: the preprocessing crops
    texts = [f"a photo of thing number {i}" for i in range(5)]
    batched = clip.embed_images(images, batch_size=2)
    one_by_one = torch.cat([clip.embed_images([im], batch_size=1) for im in images])
    assert torch.allclose(batched, one_by_one, atol=1e-5)
    assert torch.allclose(clip.embed_texts(texts, batch_size=3),
                          torch.cat([clip.embed_texts([t]) for t in texts]), atol=1e-5)
    assert clip.embed_images([]).shape == (0, 64)
    assert clip.embed_texts([]).shape == (0, 64)


def test_images_as_paths_and_grey(clip, tmp_path):
    img = _images(1, seed=7)[0]
    path = tmp_path / "a.png"
    img.save(path)
    assert torch.allclose(clip.embed_images([path]), clip.embed_images([img]), atol=1e-6)
    assert clip.embed_images([img.convert("L")]).shape == (1, 64)  # converted to RGB by the preprocessing


# ---------------------------------------------------------------------------------------------
# pseudo-words


def test_plain_prompt_replaces_words_and_templates():
    describe = {"<dance1>": "dancing", "<robot{k}>": "robot", "<robot0>": "the first robot"}
    assert plain_prompt("a photo of <dance1> <robot3>", describe) == "a photo of dancing robot"
    assert plain_prompt("<robot12>, in the rain", describe) == "robot, in the rain"
    assert plain_prompt("<robot0> next to <robot2>", describe) == "the first robot next to robot"  # exact wins
    assert plain_prompt("a <robot1> <robot2>  dancing", describe) == "a robot dancing"  # same word once
    assert plain_prompt("a <robot{k}>", describe) == "a robot"  # the template itself
    assert plain_prompt("no pseudo-words here", {}) == "no pseudo-words here"


def test_plain_prompt_names_unknown_words():
    with pytest.raises(ValueError) as err:
        plain_prompt("a <dance2> <cat> and <cat>", {"<dance{k}>": "dancing"})
    msg = str(err.value)
    assert "`<cat>`" in msg and "<dance2>" not in msg.split("in prompt")[0]
    with pytest.raises(ValueError, match="<robotx>"):
        plain_prompt("a <robotx>", {"<robot{k}>": "robot"})  # {k} stands for digits only


# ---------------------------------------------------------------------------------------------
# evaluate, plot, thresholds


def test_evaluate_plot_and_json(clip, tmp_path):
    same = _images(1, seed=8)[0]
    groups = {
        "ours": [(same, "a photo of <robot1> dancing"), (same.copy(), "a photo of <robot2> dancing")],
        "baseline": [(im, "a photo of a robot") for im in _images(3, seed=9)],
        "single": [(_images(1, seed=10)[0], "<robot1>")],
        "empty": [],
    }
    result = evaluate(clip, groups, {"<robot{k}>": "robot"})
    g = result["groups"]
    assert set(g) == {"ours", "baseline", "single", "empty"}
    assert g["ours"]["identity_consistency"] == pytest.approx(1.0, abs=1e-6)
    assert g["ours"]["n"] == 2 and g["baseline"]["n"] == 3
    want = prompt_consistency(clip, [same], ["a photo of robot dancing"])[0]
    assert g["ours"]["prompt_consistency"] == pytest.approx(want, abs=1e-6)
    assert g["baseline"]["prompt_consistency"] == pytest.approx(
        sum(prompt_consistency(clip, [im for im, _ in groups["baseline"]], ["a photo of a robot"] * 3)) / 3, abs=1e-6)
    assert g["single"]["identity_consistency"] is None and g["single"]["prompt_consistency"] is not None
    assert g["empty"] == {"prompt_consistency": None, "identity_consistency": None, "n": 0}
    assert {k: v for k, v in result["clip"].items() if k != "warning"} == clip_identity(TINY)
    assert result["clip"]["random_weights"] is True and "meaningless" in result["clip"]["warning"]

    out = save_result(result, tmp_path / "metrics.json")
    assert json.loads(out.read_text()) == result

    png = plot(result, tmp_path / "fig" / "fig5.png")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
        im.verify()
    assert not [p for p in png.parent.iterdir() if p.name != "fig5.png"]  # no temp files left

    with pytest.raises(ValueError, match="group `ours`.*<robot1>"):
        evaluate(clip, groups, {})


def test_check_thresholds():
    result = {"groups": {
        "robot": {"prompt_consistency": 0.3, "identity_consistency": 0.41, "n": 4},
        "car": {"prompt_consistency": 0.2, "identity_consistency": 0.9, "n": 4},
        "one": {"prompt_consistency": 0.5, "identity_consistency": None, "n": 1},
    }}
    assert check_thresholds(result, {"identity_consistency": 0.5}) == [
        "robot: identity_consistency 0.41 < 0.5",
        "one: identity_consistency not measured (n=1) < 0.5",
    ]
    assert check_thresholds(result, {"prompt_consistency": 0.25, "car.prompt_consistency": 0.1}) == []
    assert check_thresholds(result, {"car.prompt_consistency": 0.25}) == ["car: prompt_consistency 0.2 < 0.25"]
    assert check_thresholds(result, {}) == []
    with pytest.raises(ValueError, match="not a metric"):
        check_thresholds(result, {"sharpness": 0.5})
    with pytest.raises(ValueError, match="no group `dog`"):
        check_thresholds(result, {"dog.identity_consistency": 0.5})


# ---------------------------------------------------------------------------------------------
# identity and checkpoints


def test_clip_identity_follows_checkpoint_bytes(tmp_path):
    ck = tmp_path / "clip.pt"
    ck.write_bytes(b"weights-A")
    spec = ClipSpec(model="caspec-tiny-clip", checkpoint=str(ck))
    first = clip_identity(spec)
    assert first["checkpoint_sha256"] and first["model"] == "caspec-tiny-clip" and first["open_clip"]
    assert "init_seed" not in first
    ck.write_bytes(b"weights-A")  # same bytes, new mtime
    assert clip_identity(spec) == first
    ck.write_bytes(b"weights-B")  # same size, other bytes, within the same mtime tick maybe
    assert clip_identity(spec) != first
    ck.write_bytes(b"weights-A")
    assert clip_identity(spec) == first

    old = time.time() - 3600  # an old file is hashed once, then found in the digest cache
    os.utime(ck, (old, old))
    assert clip_identity(spec) == first == clip_identity(spec)

    assert clip_identity(TINY)["init_seed"] is not None and clip_identity(TINY)["checkpoint_sha256"] is None
    assert clip_identity(TINY)["random_weights"] is True
    assert clip_identity(TINY) != clip_identity(ClipSpec("ViT-B-32", pretrained="random"))


def test_load_checkpoint_safetensors_and_torch(clip, tmp_path):
    from safetensors.torch import save_file

    state = {k: v.detach().clone() for k, v in clip.model.state_dict().items()}
    state["visual.proj"] = state["visual.proj"] + 0.5 * torch.randn_like(state["visual.proj"])
    images = _images(2, seed=11)
    try:
        save_file(state, str(tmp_path / "clip.safetensors"))
        torch.save(state, tmp_path / "clip.pt")
        a = load_clip(ClipSpec("caspec-tiny-clip", checkpoint=str(tmp_path / "clip.safetensors")))
        b = load_clip(ClipSpec("caspec-tiny-clip", checkpoint=str(tmp_path / "clip.pt")))
        ea, eb = a.embed_images(images), b.embed_images(images)
        assert torch.allclose(ea, eb, atol=1e-6)
        assert not torch.allclose(ea, clip.embed_images(images), atol=1e-3)
        assert torch.allclose(a.embed_texts(["x"]), clip.embed_texts(["x"]), atol=1e-6)  # text tower unchanged
    finally:
        clear_clip_cache()


# ---------------------------------------------------------------------------------------------
# errors


def _model_error(spec: ClipSpec) -> ModelError:
    with pytest.raises(ModelError) as err:
        load_clip(spec)
    assert err.value.hint, "every load error carries a hint"
    assert "Traceback" not in err.value.render()
    return err.value


def test_unknown_model_name():
    err = _model_error(ClipSpec(model="ViT-B-3"))
    assert "unknown CLIP model `ViT-B-3`" in err.message
    assert "ViT-B-32" in err.hint and "checkpoint" in err.hint
    with pytest.raises(ModelError):
        clip_identity(ClipSpec(model="no-such-clip"))


def test_missing_or_bad_checkpoint(tmp_path):
    err = _model_error(ClipSpec(model="caspec-tiny-clip", checkpoint=str(tmp_path / "missing.pt")))
    assert "does not exist" in err.message and "checkpoint" in err.hint
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a state dict")
    err = _model_error(ClipSpec(model="caspec-tiny-clip", checkpoint=str(bad)))
    assert "cannot load CLIP checkpoint" in err.message
    err = _model_error(ClipSpec(model="caspec-tiny-clip", pretrained="openai", checkpoint=str(bad)))
    assert "both" in err.message


def test_pretrained_tag_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    err = _model_error(ClipSpec(model="ViT-B-32", pretrained="openai"))
    assert "`openai` weights" in err.message and "not in the local Hugging Face cache" in err.message
    assert "checkpoint" in err.hint and "HF_HUB_CACHE" in err.hint
    err = _model_error(ClipSpec(model="ViT-B-32", pretrained="no-such-tag"))
    assert "no pretrained tag `no-such-tag`" in err.message and "openai" in err.hint


def test_no_nan_in_results(clip):
    result = evaluate(clip, {"a": [(im, "a robot") for im in _images(2, seed=12)]})
    values = [v for g in result["groups"].values() for v in g.values() if isinstance(v, float)]
    assert values and all(math.isfinite(v) for v in values)


def test_evaluate_scores_a_baseline_against_the_same_plain_text(clip):
    """Issue 28: a concept's plain-prompt twins are scored as a baseline, against the text its images are
    (pseudo-words in plain words), so the two points differ only by the asset."""
    concept = _images(3, seed=21)
    twins = _images(3, seed=22)
    prompts = ["a red <star1>", "a red <star1>", "a cyan <star1>"]
    result = evaluate(clip, {"star": list(zip(concept, prompts))}, {"<star{k}>": "star"},
                      baselines={"star": list(zip(twins, prompts))})
    alone = evaluate(clip, {"star": list(zip(twins, ["a red star", "a red star", "a cyan star"]))})
    assert result["baselines"]["star"] == pytest.approx(alone["groups"]["star"], abs=1e-9)
    assert result["groups"]["star"] == pytest.approx(evaluate(clip, {"star": list(zip(concept, prompts))},
                                                              {"<star{k}>": "star"})["groups"]["star"], abs=1e-9)
    assert "baselines" not in alone


def test_the_plot_draws_the_plain_prompt_beside_the_concept_and_the_strip():
    from caspec.metrics.evaluate import figure

    result = {"groups": {"star": {"prompt_consistency": 0.70, "identity_consistency": 0.62, "n": 12}},
              "baselines": {"star": {"prompt_consistency": 0.77, "identity_consistency": 0.49, "n": 12}},
              "clip": {"model": "m", "random_weights": False}}
    strip = [("root", _images(1, seed=1)[0]), ("plain: a red star", _images(1, seed=2)[0]),
             ("concept: a red <star1>", _images(1, seed=3)[0])]
    fig = figure(result, strip=strip)
    main, *cells = fig.axes
    texts = [t.get_text() for t in main.texts]
    assert "star (n=12)" in texts and "star: plain prompt" in texts
    arrows = [t for t in main.texts if t.arrow_patch is not None]
    assert len(arrows) == 1 and arrows[0].xy == (0.70, 0.62) and arrows[0].xyann == (0.77, 0.49)
    assert [c.get_title() for c in cells] == [label for label, _ in strip]
    assert all(len(c.images) == 1 for c in cells)
    bare = figure({k: v for k, v in result.items() if k != "baselines"})
    assert len(bare.axes) == 1 and [t.get_text() for t in bare.axes[0].texts] == ["star (n=12)"]
