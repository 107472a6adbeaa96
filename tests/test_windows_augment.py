"""LoRA time windows at compose (every family's sampler calls the per-step hook) and position augmentation in
training (issue 26)."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from caspec import families  # noqa: E402
from caspec.assets import format as fmt  # noqa: E402
from caspec.errors import SpecError  # noqa: E402
from caspec.models.load import load_pipeline  # noqa: E402
from caspec.ops.compose import window_hook  # noqa: E402
from caspec.spec.load import load_spec_text  # noqa: E402
from caspec.spec.models import ModelSpec  # noqa: E402


def _with_lora(base: str):
    """A fresh pipe whose denoiser has an `asset0` LoRA with random (non-zero) weights."""
    pipe = load_pipeline(ModelSpec(base=base, device="cpu"), Path("."), fresh=True)
    targets = families.get(pipe.family).default_targets["unet"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fmt.inject_lora(pipe.denoiser, fmt.lora_config(4, 4, targets), "asset0", trainable=False)
        with torch.no_grad():
            for name, p in pipe.denoiser.named_parameters():
                if ".asset0." in name:
                    p.copy_(torch.randn_like(p) * 0.5)
    return pipe


def _images(pipe, hook=None, scale=1.0):
    fmt.set_lora_scale(pipe.denoiser, "asset0", scale)
    pipe.step_hook = hook
    try:
        imgs = pipe.kind.txt2img(pipe, ["a red robot"], [7], steps=6, guidance_scale=3.0, negative_prompt="",
                                 resolution=None, batch_size=1)
    finally:
        pipe.step_hook = None
    import numpy as np

    return torch.from_numpy(np.asarray(imgs[0]).astype("int16"))


@pytest.mark.parametrize("base", ["tiny", "tiny-xl", "tiny-v", "tiny-flux"])
def test_a_window_switches_the_denoiser_lora_by_t_over_T(base, caspec_cache):
    pipe = _with_lora(base)
    seen: list[float] = []
    inner = window_hook(pipe, [1.0], [[0.0, 0.5]])

    def spy(t):
        seen.append(t)
        inner(t)

    full = _images(pipe, scale=1.0)
    off = _images(pipe, scale=0.0)
    assert not torch.equal(full, off)  # the LoRA acts
    assert torch.equal(_images(pipe, window_hook(pipe, [1.0], [[0.0, 1.0]])), full)  # always inside: as no window
    assert torch.equal(_images(pipe, window_hook(pipe, [1.0], [[0.0, 0.0]])), off)  # never inside: as off
    half = _images(pipe, spy)
    assert not torch.equal(half, full) and not torch.equal(half, off)
    assert len(seen) == 6 and seen == sorted(seen, reverse=True) and 0 <= seen[-1] < 0.5 < seen[0] <= 1


def test_window_hook_is_none_without_windows(caspec_cache):
    pipe = _with_lora("tiny")
    assert window_hook(pipe, [0.8], None) is None and window_hook(pipe, [0.8], [None]) is None


def test_windows_enter_the_compose_key_only_when_set():
    from caspec.ops.compose import ComposeOp

    base = ('version: 1\nroots:\n  r: {prompt: "a robot"}\nconcepts:\n  x: {from: r, words: [{token: "<x>", '
            'init: robot}]}\ncompose:\n  c: {assets: [x], prompts: ["a <x>"]%s}\n')
    spec = load_spec_text(base % "", "s.yaml").spec
    assert "lora_windows" not in ComposeOp().params(spec.compose["c"], spec)
    spec = load_spec_text(base % ", lora_windows: {x: [0, 0.6]}", "s.yaml").spec
    assert ComposeOp().params(spec.compose["c"], spec)["lora_windows"] == [[0, 0.6]]
    with pytest.raises(SpecError, match="not one of `assets`"):
        load_spec_text(base % ", lora_windows: {y: [0, 0.6]}", "s.yaml")
    with pytest.raises(SpecError, match="start <= end"):
        load_spec_text(base % ", lora_windows: {x: [0.7, 0.6]}", "s.yaml")


def test_shifted_images_fill_the_border_with_the_background():
    from caspec.train.trainer import background, shifted

    img = Image.new("RGB", (16, 16), (10, 20, 30))
    img.paste((200, 0, 0), (6, 6, 10, 10))
    out = shifted(img, 3, -2)
    assert background(img) == (10, 20, 30)
    assert out.getpixel((9, 4)) == (200, 0, 0) and out.getpixel((12, 7)) == (200, 0, 0)  # moved by (+3, -2)
    assert out.getpixel((6, 8)) == (10, 20, 30)  # where it was
    assert out.getpixel((0, 0)) == (10, 20, 30) and out.getpixel((15, 15)) == (10, 20, 30)


def test_position_augmentation_trains_on_shifted_latents_and_is_refused_for_place(tmp_path, caspec_cache):
    from caspec.train import PseudoWord, TrainConfig, train_concept

    items = [(Image.new("RGB", (64, 64), c), "<a1>") for c in [(200, 40, 40), (40, 40, 200)]]
    cfg = TrainConfig(phase1_steps=3, phase2_steps=0, checkpoint_every=0, seed=1, shift_px=4)
    words = [PseudoWord("<a1>", "red", "constant")]
    pipe = load_pipeline(ModelSpec(base="tiny", device="cpu"), Path("."), fresh=True)
    from caspec.train import trainer as T

    seen: list[tuple] = []
    real = T._Trainer._latent

    def spy(self, k, flipped, shift=(0, 0)):
        seen.append(shift)
        return real(self, k, flipped, shift)

    T._Trainer._latent = spy
    try:
        train_concept(pipe, words, items, cfg, tmp_path / "a", checkpoint_dir=tmp_path / "c", preview_prompts=[])
    finally:
        T._Trainer._latent = real
    assert any(s != (0, 0) for s in seen) and all(abs(dx) <= 4 and abs(dy) <= 4 for dx, dy in seen)
    with pytest.raises(ValueError, match="about place"):
        train_concept(load_pipeline(ModelSpec(base="tiny", device="cpu"), Path("."), fresh=True),
                      [PseudoWord("<a1>", "left", "constant")], items, cfg, tmp_path / "b",
                      checkpoint_dir=tmp_path / "d", preview_prompts=[])
    spec = ('version: 1\nroots:\n  r: {prompt: "a robot"}\nconcepts:\n  c:\n    from: r\n'
            '    words: [{token: "<s>", init: square}]\n    caption: "a <s> at the left"\n'
            '    train: {shift_px: 8}\n')
    with pytest.raises(SpecError) as info:
        load_spec_text(spec, "s.yaml")
    assert "s.yaml:" in info.value.render() and "about place" in info.value.render()


def test_lora_window_auto_is_measured_kept_in_the_card_and_exported(tmp_path, caspec_cache):
    """`lora_window: auto`: after training, the layout / appearance profile of the denoiser LoRA over t/T and
    the window it gives, in the summary (the card), and in the exported model card."""
    from caspec.assets.export import export_asset, window_card
    from caspec.train import PseudoWord, TrainConfig, train_concept
    from caspec.train.window import LEVELS

    items = [(Image.new("RGB", (64, 64), c), f"<a1> <b{k}>") for k, c in enumerate([(200, 40, 40), (40, 40, 200)], 1)]
    words = [PseudoWord("<a1>", "red", "constant"), PseudoWord("<b1>", "shape", "varied"),
             PseudoWord("<b2>", "shape", "varied")]
    cfg = TrainConfig(phase1_steps=2, phase2_steps=3, checkpoint_every=0, seed=2, lr_lora_unet=1e-2,
                      lora_window="auto")
    pipe = load_pipeline(ModelSpec(base="tiny", device="cpu"), Path("."), fresh=True)
    summary = train_concept(pipe, words, items, cfg, tmp_path / "a", checkpoint_dir=tmp_path / "c",
                            preview_prompts=[])
    window = summary["lora_window"]
    assert window["how"] == "auto" and [r["t"] for r in window["profile"]] == list(LEVELS)
    assert all(r["layout"] >= 0 and r["appearance"] > 0 for r in window["profile"])  # the LoRA acts at every level
    import statistics

    limit = 2.0 * statistics.median(r["layout"] for r in window["profile"] if r["t"] <= 0.5)
    end = None
    for r in window["profile"]:  # the window's end: the last level whose layout change stays within the limit
        if r["layout"] > limit:
            break
        end = r["t"]
    assert window["window"] == (None if end is None else [0.0, end])
    # kept in the card, stated in the exported model card
    asset = fmt.load_asset(tmp_path / "a")
    asset.card = {"lora_window": {"window": [0.0, 0.6], "how": "auto", "effect": "e", "profile": window["profile"]}}
    files = export_asset(asset, "a1111", tmp_path / "x")
    text = (tmp_path / "x" / "a.md").read_text()
    assert any(f.name == "a.md" for f in files) and "[0, 0.6]" in text and "first 40% of the steps" in text
    asset.card = {}
    assert window_card(asset, "a1111") is None  # no window: no model card, the export's files as before
