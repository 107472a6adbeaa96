"""The concept trainer (caspec.train) and the asset format (caspec.assets.format) on the tiny model."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from PIL import Image  # noqa: E402

from caspec.assets import format as fmt  # noqa: E402
from caspec.models.load import load_pipeline  # noqa: E402
from caspec.spec.models import ModelSpec  # noqa: E402
from caspec.train import PseudoWord, TrainConfig, train_concept  # noqa: E402
from caspec.train.trainer import CHECKPOINT_FILE  # noqa: E402

pytestmark = pytest.mark.slow

WORDS = [PseudoWord("<shape1>", "square", "constant"),
         PseudoWord("<col1>", "red", "varied"),
         PseudoWord("<col2>", "blue", "varied")]
CAPTIONS = ["a photo of <shape1> <col1>", "a photo of <shape1> <col2>"]
ASSET_FILES = ("embeddings.safetensors", "lora.safetensors", "loss.jsonl")
# small, fast runs: 6 + 6 steps, checkpoints every 2 steps
SMALL = dict(phase1_steps=6, phase2_steps=6, checkpoint_every=2, seed=7)


def square(color, bg=(200, 200, 200), size=64) -> Image.Image:
    a = np.full((size, size, 3), bg, np.uint8)
    a[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = color
    return Image.fromarray(a)


def items():
    return [(square((255, 0, 0)), CAPTIONS[0]), (square((0, 0, 255)), CAPTIONS[1])]


def fresh(tmp_path: Path):
    return load_pipeline(ModelSpec(), tmp_path, fresh=True)


def run(tmp_path: Path, name: str, cfg: TrainConfig, **kw):
    pipe = fresh(tmp_path)
    out = tmp_path / name
    summary = train_concept(pipe, WORDS, items(), cfg, out, checkpoint_dir=tmp_path / f"{name}-ckpt",
                            preview_prompts=kw.pop("preview_prompts", []), **kw)
    return pipe, out, summary


def asset_bytes(out: Path) -> dict[str, bytes]:
    return {f: (out / f).read_bytes() for f in ASSET_FILES}


def encode(pipe, text: str) -> torch.Tensor:
    tok = pipe.tokenizer([text], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    with torch.no_grad():
        return pipe.text_encoder(tok.input_ids)[0]


def unet_out(pipe, enc: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    z = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        return pipe.unet(z, torch.tensor([500]), encoder_hidden_states=enc).sample


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One small straight-through run (6 + 6 steps), with previews, plus the pipe state at its end."""
    tmp = tmp_path_factory.mktemp("trained")
    base = fresh(tmp)
    base_table = base.text_encoder.get_input_embeddings().weight.detach().clone()
    base_unet = {k: v.clone() for k, v in base.unet.state_dict().items()}
    pipe, out, summary = run(tmp, "asset", TrainConfig(**SMALL), preview_prompts=None)
    return {"tmp": tmp, "pipe": pipe, "out": out, "summary": summary, "base": base,
            "base_table": base_table, "base_unet": base_unet}


def test_fresh_pipes_are_independent(tmp_path):
    a, b = fresh(tmp_path), fresh(tmp_path)
    assert a is not b and a.text_encoder is not b.text_encoder
    shared = load_pipeline(ModelSpec(), tmp_path)
    assert shared is load_pipeline(ModelSpec(), tmp_path) and shared is not a


def test_asset_folder_and_summary(trained):
    out, summary = trained["out"], trained["summary"]
    for f in ASSET_FILES:
        assert (out / f).is_file()
    records = fmt.read_loss_log(out)
    assert [r["step"] for r in records] == list(range(1, 13))
    assert [r["phase"] for r in records] == [1] * 6 + [2] * 6
    assert all(isinstance(r["loss"], float) and "lr" in r for r in records)
    # default previews: the training captions, rendered at the end
    assert sorted(p.name for p in (out / "previews").iterdir()) == ["step-000012-0.png", "step-000012-1.png"]
    assert summary["steps"] == 12 and summary["steps_run"] == 12 and summary["resumed_from"] is None
    assert summary["initial_loss"] > 0 and summary["final_loss"] > 0
    asset = fmt.load_asset(out)
    assert asset.tokens == [w.token for w in WORDS]
    assert asset.roles == {w.token: w.role for w in WORDS}
    assert all(t.shape == (32,) and t.dtype == torch.float32 for t in asset.embeddings.values())
    assert asset.lora_rank == 4 and asset.lora_alpha == 4.0
    # trainer's write_card helper: YAML, atomic
    fmt.write_card(out, {"format": 1, "pseudo_words": [{"token": "<col1>"}], "t": (1, 2)})
    assert fmt.load_asset(out).card == {"format": 1, "pseudo_words": [{"token": "<col1>"}], "t": [1, 2]}


def test_only_new_rows_change(trained):
    pipe, base_table = trained["pipe"], trained["base_table"]
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    n_old = base_table.shape[0]
    assert table.shape[0] == n_old + len(WORDS)
    assert torch.equal(table[:n_old], base_table)  # every old row bit-identical (weight decay included)
    init_ids = [pipe.tokenizer(w.init_word, add_special_tokens=False).input_ids[0] for w in WORDS]
    new_ids = pipe.tokenizer.convert_tokens_to_ids([w.token for w in WORDS])
    assert new_ids == list(range(n_old, n_old + len(WORDS)))
    for i, j in zip(new_ids, init_ids):
        assert not torch.equal(table[i], base_table[j])  # learned rows moved away from their init


def test_base_weights_frozen_and_lora_trained(trained):
    pipe, base_unet = trained["pipe"], trained["base_unet"]
    state = pipe.unet.state_dict()
    for key, value in base_unet.items():
        lora_key = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(state.get(key, state.get(lora_key)), value), key
    flat = fmt._read_safetensors(trained["out"] / "lora.safetensors")[0]
    assert any(k.startswith("unet.") for k in flat) and any(k.startswith("text_encoder.") for k in flat)
    b_keys = [k for k in flat if "lora_B" in k]
    assert b_keys and all(flat[k].abs().sum() > 0 for k in b_keys)  # B starts at 0 and must have moved
    assert any(".to_q.lora_A.weight" in k for k in flat) and any(".q_proj.lora_A.weight" in k for k in flat)


def test_lora_injection_is_a_noop_at_init(tmp_path):
    pipe = fresh(tmp_path)
    enc = encode(pipe, "a red square")
    before_unet, before_enc = unet_out(pipe, enc), enc
    cfg = TrainConfig()
    fmt.inject_lora(pipe.unet, fmt.lora_config(4, 4.0, cfg.unet_targets), "probe", trainable=True)
    fmt.inject_lora(pipe.text_encoder, fmt.lora_config(4, 4.0, cfg.text_targets), "probe", trainable=True)
    assert fmt.tuner_layers(pipe.unet) and fmt.tuner_layers(pipe.text_encoder)
    assert torch.equal(encode(pipe, "a red square"), before_enc)
    assert torch.equal(unet_out(pipe, enc), before_unet)


def test_apply_asset_reproduces_the_trained_pipe(trained, tmp_path):
    train_pipe = trained["pipe"]
    caption = "a photo of <shape1> <col2>"
    want_enc = encode(train_pipe, caption)
    want_unet = unet_out(train_pipe, want_enc)

    pipe = fresh(tmp_path)
    base_unet = unet_out(pipe, want_enc)
    asset = fmt.load_asset(trained["out"])
    name = fmt.apply_asset(pipe, asset)
    assert name == "asset"
    got_enc = encode(pipe, caption)
    assert torch.allclose(got_enc, want_enc, atol=1e-6, rtol=0)
    assert torch.allclose(unet_out(pipe, want_enc), want_unet, atol=1e-6, rtol=0)
    assert not torch.allclose(want_unet, base_unet, atol=1e-6)  # the LoRA does something
    # the same tokens cannot be added twice
    with pytest.raises(ValueError, match="<shape1>.*already exists"):
        fmt.apply_asset(pipe, asset, adapter_name="again")

    # scale 0 switches the LoRA delta off
    pipe0 = fresh(tmp_path)
    fmt.apply_asset(pipe0, asset, lora_scale=0.0)
    assert torch.allclose(unet_out(pipe0, want_enc), base_unet, atol=1e-6, rtol=0)


def test_same_seed_same_bytes(trained, tmp_path):
    _, out, _ = run(tmp_path, "again", TrainConfig(**SMALL))
    assert asset_bytes(out) == asset_bytes(trained["out"])
    _, other, _ = run(tmp_path, "other-seed", TrainConfig(**{**SMALL, "seed": 8}))
    assert (other / "embeddings.safetensors").read_bytes() != (out / "embeddings.safetensors").read_bytes()


def test_interrupted_then_resumed_equals_straight_run(trained, tmp_path):
    cfg = TrainConfig(**SMALL)
    out, ckpt = tmp_path / "resumed", tmp_path / "resumed-ckpt"

    def go(**kw):
        return train_concept(fresh(tmp_path), WORDS, items(), cfg, out, checkpoint_dir=ckpt, preview_prompts=[], **kw)

    with pytest.raises(KeyboardInterrupt):
        go(stop_after=5)  # killed in phase 1 after step 5: last checkpoint at step 4
    assert not (out / "embeddings.safetensors").exists()
    with pytest.raises(KeyboardInterrupt):
        go(stop_after=5)  # resumes at 4, crosses into phase 2, killed after step 9: checkpoint at 8
    summary = go()
    assert summary["resumed_from"] == 8 and summary["steps_run"] == 4
    assert asset_bytes(out) == asset_bytes(trained["out"])
    assert [p.name for p in ckpt.iterdir()] == [CHECKPOINT_FILE]  # no temporary files left behind


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other-settings"])
def test_bad_checkpoint_is_ignored(trained, tmp_path, damage):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    source = trained["tmp"] / "asset-ckpt" / CHECKPOINT_FILE  # a valid checkpoint (step 12) of the same inputs
    if damage == "garbage":
        (ckpt / CHECKPOINT_FILE).write_bytes(b"\x00not a checkpoint" * 10)
    elif damage == "truncated":
        data = source.read_bytes()
        (ckpt / CHECKPOINT_FILE).write_bytes(data[: len(data) // 2])
    else:
        (ckpt / CHECKPOINT_FILE).write_bytes(source.read_bytes())
    cfg = TrainConfig(**SMALL) if damage != "other-settings" else TrainConfig(**{**SMALL, "lr_embeddings": 1e-3})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = train_concept(fresh(tmp_path), WORDS, items(), cfg, tmp_path / "out", checkpoint_dir=ckpt,
                                preview_prompts=[])
    assert summary["resumed_from"] is None and summary["steps_run"] == 12
    assert any("ignoring" in str(w.message) for w in caught)
    if damage != "other-settings":
        assert asset_bytes(tmp_path / "out") == asset_bytes(trained["out"])


def test_loss_decreases_on_single_image_overfit(tmp_path):
    # The tiny UNet is random (untrained): attention-only LoRA can barely move its loss, so the
    # overfit test also adapts its resnet convolutions (LoRA on Conv2d).
    cfg = TrainConfig(phase1_steps=20, phase2_steps=100, lr_embeddings=5e-2, lr_lora_unet=1e-2, lr_lora_text=1e-3,
                      unet_targets=("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv_in", "conv_out"),
                      checkpoint_every=0, seed=0)
    word = [PseudoWord("<obj1>", "square", "constant")]
    summary = train_concept(fresh(tmp_path), word, [(square((255, 0, 0)), "a photo of <obj1>")], cfg,
                            tmp_path / "overfit", checkpoint_dir=tmp_path / "ck", preview_prompts=[])
    losses = [r["loss"] for r in fmt.read_loss_log(tmp_path / "overfit")]
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    assert summary["initial_loss"] == pytest.approx(first) and summary["final_loss"] == pytest.approx(last)
    assert last < 0.7 * first, (first, last)


def test_bad_settings_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="lora_rank"):
        TrainConfig(lora_rank=0)
    with pytest.raises(ValueError, match="phase1_steps"):
        TrainConfig(phase1_steps=-1)
    with pytest.raises(ValueError, match="at least 1"):
        TrainConfig(phase1_steps=0, phase2_steps=0)
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp8")
    with pytest.raises(ValueError, match="role"):
        PseudoWord("<a>", "cat", "sometimes")
    with pytest.raises(ValueError, match="initializer"):
        PseudoWord("<a>", " ", "constant")

    pipe = fresh(tmp_path)

    def train(cfg=TrainConfig(phase1_steps=1, phase2_steps=1), words=WORDS, its=None, p=pipe):
        return train_concept(p, words, its or items(), cfg, tmp_path / "x", checkpoint_dir=tmp_path / "xc",
                             preview_prompts=[])

    with pytest.raises(ValueError, match="'to_qq'"):
        train(TrainConfig(phase1_steps=1, phase2_steps=1, unet_targets=("to_q", "to_qq")))
    with pytest.raises(ValueError, match="text encoder has no module named 'nope'"):
        train(TrainConfig(phase1_steps=1, phase2_steps=1, text_targets=("nope",)))
    with pytest.raises(ValueError, match="<col3> appears in no caption"):
        train(words=WORDS + [PseudoWord("<col3>", "green", "varied")])
    with pytest.raises(ValueError, match="fp16"):
        train(TrainConfig(phase1_steps=1, phase2_steps=1, mixed_precision="fp16"))
    with pytest.raises(ValueError, match="fresh=True"):
        train(p=load_pipeline(ModelSpec(), tmp_path))
    existing = [PseudoWord("<|startoftext|>", "cat", "constant")]
    with pytest.raises(ValueError, match=r"'<\|startoftext\|>' already exists"):
        train(words=existing, its=[(square((0, 255, 0)), "<|startoftext|> a cat")])
    assert not (tmp_path / "x" / "embeddings.safetensors").exists()
    assert json.dumps(TrainConfig().to_dict())  # JSON-able (goes into cards)


@pytest.mark.parametrize("options", [
    dict(batch_size=2, grad_accum=2, flip=True, cache_latents=False, min_snr_gamma=5.0),
    dict(gradient_checkpointing=True, mixed_precision="bf16", preview_every=2),
    dict(v_prediction=True, min_snr_gamma=5.0, phase1_steps=0),
])
def test_training_options_run(tmp_path, options):
    options = dict(options)
    pipe = fresh(tmp_path)
    if options.pop("v_prediction", False):
        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    cfg = TrainConfig(**{"phase1_steps": 2, "phase2_steps": 2, "checkpoint_every": 0, **options})
    out = tmp_path / "opt"
    summary = train_concept(pipe, WORDS, items(), cfg, out, checkpoint_dir=tmp_path / "ck",
                            preview_prompts=["a photo of <shape1> <col1>"])
    assert np.isfinite(summary["final_loss"]) and summary["steps"] == cfg.total_steps
    previews = sorted(p.name for p in (out / "previews").iterdir())
    want = [f"step-{cfg.total_steps:06d}-0.png"]
    if cfg.preview_every:
        want = [f"step-{s:06d}-0.png" for s in range(cfg.preview_every, cfg.total_steps, cfg.preview_every)] + want
    assert previews == want
    assert not pipe.unet.training and not any(p.requires_grad for p in pipe.unet.parameters())
    fmt.load_asset(out)


def test_lora_only_keeps_embeddings_at_their_init(tmp_path):
    """`phase1_steps: 0` + `phase2_embeddings: false` (the LoRA-only ablation): the new rows stay copies
    of their init words while the LoRA weights train."""
    cfg = TrainConfig(phase1_steps=0, phase2_steps=4, phase2_embeddings=False, checkpoint_every=0, seed=7)
    pipe, out, _ = run(tmp_path, "lora-only", cfg)
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    init_ids = [pipe.tokenizer(w.init_word, add_special_tokens=False).input_ids[0] for w in WORDS]
    new_ids = pipe.tokenizer.convert_tokens_to_ids([w.token for w in WORDS])
    for i, j in zip(new_ids, init_ids):
        assert torch.equal(table[i], table[j])
    flat = fmt._read_safetensors(out / "lora.safetensors")[0]
    assert all(flat[k].abs().sum() > 0 for k in flat if "lora_B" in k)
    # the default trains the embeddings in phase 2 too
    pipe2, _, _ = run(tmp_path, "both", TrainConfig(phase1_steps=0, phase2_steps=4, checkpoint_every=0, seed=7))
    table2 = pipe2.text_encoder.get_input_embeddings().weight.detach()
    assert not torch.equal(table2[new_ids[0]], table2[init_ids[0]])


def test_resume_is_exact_with_a_bf16_base(tmp_path):
    """LoRA parameters are fp32 before a checkpoint is loaded into them: loading fp32 checkpoint weights
    into bf16 adapters (peft makes them in the base dtype) would round them, and the resumed run would
    drift from the straight one."""
    cfg = TrainConfig(**SMALL)

    def bf16_pipe():
        pipe = load_pipeline(ModelSpec(dtype="bf16"), tmp_path, fresh=True)
        assert pipe.dtype == torch.bfloat16
        return pipe

    def go(name: str, **kw):
        return train_concept(bf16_pipe(), WORDS, items(), cfg, tmp_path / name, checkpoint_dir=tmp_path / f"{name}-ck",
                             preview_prompts=[], **kw)

    go("straight")
    with pytest.raises(KeyboardInterrupt):
        go("resumed", stop_after=9)  # checkpoint at step 8, in phase 2: LoRA weights in it
    summary = go("resumed")
    assert summary["resumed_from"] == 8
    assert asset_bytes(tmp_path / "resumed") == asset_bytes(tmp_path / "straight")


def test_checkpoint_and_preview_cadence_do_not_change_the_weights(trained, tmp_path):
    """Why `checkpoint_every` / `preview_every` are not in the training key: the asset's weights and loss log
    are the same bytes whatever they are; only the intermediate previews (a record of the run) differ."""
    cfg = TrainConfig(**{**SMALL, "checkpoint_every": 5, "preview_every": 4})
    _, out, _ = run(tmp_path, "cadence", cfg, preview_prompts=None)
    assert asset_bytes(out) == asset_bytes(trained["out"])  # trained: checkpoint_every 2, preview_every 0
    names = sorted(p.name for p in (out / "previews").iterdir())
    assert names == ["step-000004-0.png", "step-000004-1.png", "step-000008-0.png", "step-000008-1.png",
                     "step-000012-0.png", "step-000012-1.png"]
    for name in ("step-000012-0.png", "step-000012-1.png"):  # the final previews follow the weights alone
        assert np.array_equal(np.asarray(Image.open(out / "previews" / name)),
                              np.asarray(Image.open(trained["out"] / "previews" / name)))


def _drawn_timesteps(tmp_path: Path, name: str, **settings) -> list[int]:
    """The timesteps the UNet sees during a short training with ``settings`` (previews off)."""
    pipe = fresh(tmp_path)
    seen: list[int] = []
    pipe.unet.register_forward_pre_hook(lambda _m, args: seen.extend(int(t) for t in args[1].flatten()))
    cfg = TrainConfig(**{"phase1_steps": 15, "phase2_steps": 15, "batch_size": 4, "checkpoint_every": 0,
                         "seed": 3, **settings})
    train_concept(pipe, WORDS, items(), cfg, tmp_path / name, checkpoint_dir=tmp_path / f"{name}-ck",
                  preview_prompts=[])
    return seen[:cfg.total_steps * cfg.batch_size]  # the final previews, if any, come after


def test_cubic_timestep_sampling_favours_high_noise(tmp_path):
    """`timestep_sampling: cubic` draws t = (1 - u^3) T: mostly the noisier half, where the layout is decided;
    the default stays uniform, and a cubic run makes another asset."""
    n = 1000  # tiny's num_train_timesteps
    uniform = _drawn_timesteps(tmp_path, "u")
    cubic = _drawn_timesteps(tmp_path, "c", timestep_sampling="cubic")
    assert len(uniform) == len(cubic) == 120
    assert all(0 <= t < n for t in uniform + cubic)
    high = [sum(t >= n // 2 for t in ts) / len(ts) for ts in (uniform, cubic)]
    assert 0.35 < high[0] < 0.65 and high[1] > 0.7, high  # 0.5 and 0.79 expected
    assert np.mean(cubic) > np.mean(uniform) + 100
    a = (tmp_path / "u" / "embeddings.safetensors").read_bytes()
    assert a != (tmp_path / "c" / "embeddings.safetensors").read_bytes()
    with pytest.raises(ValueError, match="timestep_sampling must be one of uniform, cubic"):
        TrainConfig(timestep_sampling="logit")
