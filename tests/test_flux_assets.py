"""FLUX.1 (`tiny-flux`) concept assets: two-phase flow-matching training on CLIP-L + T5 rows (frozen rows and base
weights untouched, exact resume, fp32 LoRA), the diffusers export read back by diffusers' own Flux loaders, the
family's detection and refusals, and where edits start (strength vs the SNR-matched noise level)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from caspec import families  # noqa: E402
from caspec.assets import format as fmt  # noqa: E402
from caspec.assets.export import export_asset  # noqa: E402
from caspec.errors import ModelError  # noqa: E402
from caspec.families.noise import PureNoiseStart, edit_start, reference_sigma  # noqa: E402
from caspec.models import flow_sampling as F  # noqa: E402
from caspec.models.load import load_pipeline, model_configs  # noqa: E402
from caspec.spec.models import ModelSpec  # noqa: E402
from caspec.train import PseudoWord, TrainConfig, train_concept  # noqa: E402

WORDS = [PseudoWord("<a1>", "dance", "constant", vectors=2), PseudoWord("<b1>", "robot", "varied"),
         PseudoWord("<b2>", "robot", "varied")]
PROMPT = "a photo of <a1> <b2>"
CFG = TrainConfig(phase1_steps=3, phase2_steps=3, lr_embeddings=5e-2, lr_lora_unet=1e-2, lr_lora_text=1e-3,
                  checkpoint_every=2, seed=5, unet_targets=families.get("flux").default_targets["unet"])


def fresh(name="tiny-flux"):
    return load_pipeline(ModelSpec(base=name, device="cpu"), Path("."), fresh=True)


def items():
    return [(Image.new("RGB", (64, 64), c), f"<a1> <b{k}>") for k, c in enumerate([(200, 40, 40), (40, 40, 200)], 1)]


def train(tmp: Path, name: str, **kw):
    pipe = fresh()
    summary = train_concept(pipe, WORDS, items(), CFG, tmp / name, checkpoint_dir=tmp / f"{name}-ckpt",
                            preview_prompts=[], **kw)
    return pipe, summary


def asset_bytes(folder: Path) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in (fmt.EMBEDDINGS_FILE, fmt.LORA_FILE)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, caspec_cache):
    tmp = tmp_path_factory.mktemp("flux-assets")
    pipe, summary = train(tmp, "asset")
    return tmp, pipe, fmt.load_asset(tmp / "asset"), summary


def test_rows_in_clip_and_t5_frozen_rows_and_base_untouched(trained):
    _, pipe, asset, summary = trained
    base = fresh()
    assert asset.family == "flux" and asset.encoders == ["text_encoder", "text_encoder_2"]
    assert asset.rows("<a1>").shape == (2, 32) and asset.rows("<a1>", "text_encoder_2").shape == (2, 32)
    assert set(c for c, s in asset.lora.items() if s) == {"text_encoder", "transformer"}  # no T5 LoRA
    assert all(v.dtype == torch.float32 for s in asset.lora.values() for v in s.values())
    assert summary["final_loss"] is not None and summary["steps"] == 6
    for comp, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):  # both rows trained
        init = getattr(base, comp).get_input_embeddings().weight[
            getattr(base, tok)("dance", add_special_tokens=False).input_ids[0]]
        assert not torch.allclose(asset.rows("<a1>", comp)[0], init, atol=1e-4), comp
    for comp, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        old = getattr(base, comp).get_input_embeddings().weight
        new = getattr(pipe, comp).get_input_embeddings().weight
        added = set(getattr(pipe, tok).convert_tokens_to_ids(["<a1>", "<a1>_1", "<b1>", "<b2>"]))
        keep = torch.tensor([i for i in range(old.shape[0]) if i not in added])
        # every other row is bit-identical (T5's table has spare rows past its tokenizer: new words may take them)
        assert torch.equal(new[keep], old[keep]) and len(added) == 4
    trained_params = dict(pipe.transformer.named_parameters())
    for name, p in base.transformer.named_parameters():  # base weights (under the adapters) unchanged
        prefix, leaf = name.rsplit(".", 1)
        got = trained_params.get(f"{prefix}.base_layer.{leaf}", trained_params.get(name))
        assert got is not None and torch.equal(got, p), name


def test_resume_after_interrupt_is_exact(trained, tmp_path):
    tmp, _, _, _ = trained
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, "resumed", stop_after=4)
    _, summary = train(tmp_path, "resumed")
    assert summary["resumed_from"] == 4 and summary["steps_run"] == 2
    assert asset_bytes(tmp_path / "resumed") == asset_bytes(tmp / "asset")


def test_diffusers_export_loads_in_diffusers_flux_loaders(trained, tmp_path):
    """diffusers' own `load_lora_weights` and `load_textual_inversion` read the export and give caspec's text
    conditioning and transformer output."""
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    _, _, asset, _ = trained
    out = tmp_path / "diffusers"
    export_asset(asset, "diffusers", out)
    mine = fresh()
    fmt.apply_asset(mine, asset, lora_scale=1.0)
    theirs = fresh()
    ref = FluxPipeline(vae=theirs.vae, text_encoder=theirs.text_encoder, text_encoder_2=theirs.text_encoder_2,
                       tokenizer=theirs.tokenizer, tokenizer_2=theirs.tokenizer_2, transformer=theirs.transformer,
                       scheduler=theirs.scheduler)
    ref.load_lora_weights(str(out), adapter_name="asset")
    for word in ("a1", "b1", "b2"):
        state = load_file(out / f"{word}.safetensors")
        assert set(state) == {"clip_l", "t5"}  # the layout diffusers' Flux pivotal tuning writes
        ref.load_textual_inversion(state["clip_l"], token=f"<{word}>", text_encoder=ref.text_encoder,
                                   tokenizer=ref.tokenizer)
        ref.load_textual_inversion(state["t5"], token=f"<{word}>", text_encoder=ref.text_encoder_2,
                                   tokenizer=ref.tokenizer_2)
    with torch.no_grad():
        pooled, embeds, txt_ids = F.encode_prompts(mine, [PROMPT], max_sequence_length=32)
        pe, ppe, _ = ref.encode_prompt(PROMPT, prompt_2=None, device="cpu", max_sequence_length=32)
        assert torch.allclose(pooled, ppe, atol=1e-6) and torch.allclose(embeds, pe, atol=1e-6)
        bare, _, _ = F.encode_prompts(fresh(), ["a photo of dance robot"], max_sequence_length=32)
        assert not torch.allclose(pooled, bare, atol=1e-4)  # the words (and CLIP's LoRA) act

        def out_of(transformer):
            torch.manual_seed(0)
            x = torch.randn(1, 256, 64)
            return transformer(hidden_states=x, timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                               pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=txt_ids,
                               img_ids=F.image_ids(32, "cpu", torch.float32), return_dict=False)[0]

        mine_out = out_of(mine.transformer)
        assert torch.allclose(mine_out, out_of(ref.transformer), atol=1e-5)
        assert not torch.allclose(mine_out, out_of(fresh().transformer), atol=1e-5)  # the transformer LoRA acts


def test_flux_folders_are_recognised_and_other_families_refused(tmp_path, caspec_cache):
    from caspec.models.tiny_flux import ensure_tiny_flux

    folder = ensure_tiny_flux("tiny-flux")
    copy = tmp_path / "flux"
    (copy / "transformer").mkdir(parents=True)
    (copy / "model_index.json").write_text((folder / "model_index.json").read_text())
    (copy / "transformer" / "config.json").write_text((folder / "transformer" / "config.json").read_text())
    assert families.folder_family(copy) == "flux"
    for cls, transformer, title in (("Flux2Pipeline", "Flux2Transformer2DModel", "FLUX.2"),
                                    ("ChromaPipeline", "ChromaTransformer2DModel", "Chroma"),
                                    ("QwenImagePipeline", "QwenImageTransformer2DModel", "Qwen-Image"),
                                    ("StableDiffusion3Pipeline", "SD3Transformer2DModel", "SD 3.x"),
                                    ("DiffusionPipeline", "Flux3Transformer2DModel", "FLUX.3")):
        other = tmp_path / cls
        (other / "transformer").mkdir(parents=True)
        (other / "model_index.json").write_text(json.dumps({"_class_name": cls}))
        (other / "transformer" / "config.json").write_text(json.dumps({"_class_name": transformer}))
        with pytest.raises(ModelError, match=f"{title.replace('.', '[.]')} family .*not supported yet"):
            families.folder_family(other)


def test_noise_level_matches_snr_across_families():
    sd1 = model_configs(ModelSpec(base="tiny"), Path("."))
    flux = model_configs(ModelSpec(base="tiny-flux"), Path("."))
    # on SD 1.x, noise_level 0.86 starts where strength 0.86 does (the paper's T)
    assert edit_start(families.get("sd1"), sd1, 50, 64, noise_level=0.86) == \
        edit_start(families.get("sd1"), sd1, 50, 64, strength=0.86)
    # on FLUX.1 the same strength starts far noisier; the noise level starts at (or just below) SD 1.x's noise
    s_start, s_sigma = edit_start(families.get("flux"), flux, 28, 64, strength=0.86)
    n_start, n_sigma = edit_start(families.get("flux"), flux, 28, 64, noise_level=0.86)
    assert n_start > s_start and n_sigma <= reference_sigma(0.86) < s_sigma
    # schnell's 4 steps at strength 0.86 start from pure noise: refused
    schnell = model_configs(ModelSpec(base="tiny-flux-schnell"), Path("."))
    with pytest.raises(PureNoiseStart, match="pure noise"):
        edit_start(families.get("flux"), schnell, 4, 64, strength=0.86)


def test_pure_numpy_schedules_equal_the_schedulers():
    """Planning computes each edit's start without torch; the σ must be the schedulers' own."""
    import numpy as np
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    from caspec.families.noise import flow_sigma

    for base in ("tiny", "toy", "tiny-v"):
        cfg = model_configs(ModelSpec(base=base), Path("."))
        sched = DDIMScheduler.from_config(cfg["scheduler"])
        sched.set_timesteps(50)
        want = flow_sigma(sched.alphas_cumprod[sched.timesteps].double().numpy())
        got = families.get("sd1").step_sigmas(cfg, 50, 64)
        assert np.allclose(got, want, atol=1e-5), base  # float32 cumprods: agree to ~1e-5
    for base, steps in (("tiny-flux", 28), ("tiny-flux-schnell", 4)):
        cfg = model_configs(ModelSpec(base=base), Path("."))
        sched = F._schedule(cfg["scheduler"], steps, F.image_seq_len(64, 2))
        got = families.get("flux").step_sigmas(cfg, steps, 64)
        assert np.allclose(got, sched.sigmas[:-1].double().numpy(), atol=1e-6), base
        for strength in (0.3, 0.6, 0.86):
            if base == "tiny-flux-schnell" and strength == 0.86:
                continue
            start, sigma = F.sdedit_start(cfg["scheduler"], steps, strength, 64, vae_scale_factor=2)
            assert edit_start(families.get("flux"), cfg, steps, 64, strength=strength)[0] == start


def test_t5_lora_is_opt_in_and_exported_where_tools_read_it(tmp_path, caspec_cache):
    """`t5_lora`: phase 2 adapts T5 too; diffusers' Flux loader cannot load that, so the diffusers export says so,
    while the kohya export carries it as `lora_te3_` and imports back to the same deltas."""
    from dataclasses import replace

    from safetensors import safe_open

    from caspec.assets.importer import import_asset

    pipe = fresh()
    train_concept(pipe, WORDS, items(), replace(CFG, t5_lora=True, checkpoint_every=0), tmp_path / "t5",
                  checkpoint_dir=tmp_path / "t5-ckpt", preview_prompts=[])
    asset = fmt.load_asset(tmp_path / "t5")
    assert asset.lora.get("text_encoder_2") and asset.targets["text_encoder_2"] == ["q", "k", "v", "o"]
    with pytest.raises(ValueError, match="text_encoder_2, which diffusers' FLUX.1 loader cannot load"):
        export_asset(asset, "diffusers", tmp_path / "d")
    export_asset(asset, "a1111", tmp_path / "a")
    with safe_open(str(tmp_path / "a" / "t5.safetensors"), "pt") as fh:
        assert any(k.startswith("lora_te3_encoder_block_0_layer_0_SelfAttention_q.") for k in fh.keys())
    back = fmt.load_asset(import_asset(tmp_path / "a", tmp_path / "back"))
    for key, a in asset.lora["text_encoder_2"].items():
        if key.endswith("lora_A.weight"):
            m = key.removesuffix(".lora_A.weight")
            d0 = asset.lora["text_encoder_2"][f"{m}.lora_B.weight"] @ a
            d1 = back.lora["text_encoder_2"][f"{m}.lora_B.weight"] @ back.lora["text_encoder_2"][key]
            assert torch.allclose(d0 * asset.lora_alpha / asset.lora_rank, d1 * back.lora_alpha / back.lora_rank,
                                  atol=1e-6)


def test_training_and_sampling_encode_prompts_alike(caspec_cache):
    """Training encodes captions through the family (tokenize + FLUX.encode); sampling as FluxPipeline does:
    the same conditioning."""
    from caspec.models.text import encode_ids, tokenize

    pipe = load_pipeline(ModelSpec(base="tiny-flux", device="cpu"), Path("."))
    with torch.no_grad():
        cond = encode_ids(pipe, tokenize(pipe, ["a photo of a red robot"]))
        pooled, embeds, _ = F.encode_prompts(pipe, ["a photo of a red robot"])
    assert torch.equal(cond.pooled, pooled) and torch.equal(cond.embeds, embeds)
