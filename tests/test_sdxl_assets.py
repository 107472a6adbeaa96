"""SDXL (`tiny-xl`) concept assets: two-encoder training (frozen rows, exact resume), multi-vector words,
the exports read back by diffusers' own SDXL loaders and converters, and clear errors across families."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from caspec.assets import format as fmt  # noqa: E402
from caspec.assets.export import export_asset  # noqa: E402
from caspec.assets.importer import import_asset  # noqa: E402
from caspec.models import sampling as S  # noqa: E402
from caspec.models.load import load_pipeline  # noqa: E402
from caspec.models.text import added_cond  # noqa: E402
from caspec.spec.models import ModelSpec  # noqa: E402
from caspec.train import PseudoWord, TrainConfig, train_concept  # noqa: E402

WORDS = [PseudoWord("<a1>", "dance", "constant", vectors=2), PseudoWord("<b1>", "robot", "varied"),
         PseudoWord("<b2>", "robot", "varied")]
PROMPT = "a photo of <a1> <b2>"


def fresh(name="tiny-xl"):
    return load_pipeline(ModelSpec(base=name, device="cpu"), Path("."), fresh=True)


def items():
    return [(Image.new("RGB", (64, 64), c), f"<a1> <b{k}>") for k, c in enumerate([(200, 40, 40), (40, 40, 200)], 1)]


CFG = TrainConfig(phase1_steps=3, phase2_steps=3, lr_embeddings=5e-2, lr_lora_unet=1e-2, lr_lora_text=1e-3,
                  checkpoint_every=2, seed=5)


def train(tmp: Path, name: str, **kw):
    pipe = fresh()
    summary = train_concept(pipe, WORDS, items(), CFG, tmp / name, checkpoint_dir=tmp / f"{name}-ckpt",
                            preview_prompts=[], **kw)
    return pipe, summary


def asset_bytes(folder: Path) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in (fmt.EMBEDDINGS_FILE, fmt.LORA_FILE)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, caspec_cache):
    tmp = tmp_path_factory.mktemp("xl-assets")
    pipe, _ = train(tmp, "asset")
    return tmp, pipe, fmt.load_asset(tmp / "asset")


def test_two_encoders_trained_frozen_rows_untouched(trained):
    tmp, pipe, asset = trained
    base = fresh()
    assert asset.family == "sdxl" and asset.encoders == ["text_encoder", "text_encoder_2"]
    assert asset.rows("<a1>").shape == (2, 32) and asset.rows("<a1>", "text_encoder_2").shape == (2, 48)
    assert asset.vectors("<b1>") == 1 and set(asset.lora) == {"text_encoder", "text_encoder_2", "unet"}
    assert all(asset.lora[c] for c in asset.lora)
    for comp, _, te in pipe.text_encoders:
        old = getattr(base, comp).get_input_embeddings().weight
        new = te.get_input_embeddings().weight
        n = old.shape[0]
        assert torch.equal(new[:n], old), f"{comp}: a frozen row changed"
        assert new.shape[0] == n + 4  # <a1>, <a1>_1, <b1>, <b2>
        # each new row moved away from its init word's row (both encoders learned)
        init = old[base.tokenizer("dance", add_special_tokens=False).input_ids[0]]
        assert not torch.equal(new[n], init)
    # base weights of every component are untouched by LoRA training
    for comp, module in base.lora_modules:
        trained_state = dict(dict(pipe.lora_modules)[comp].named_parameters())
        for k, v in module.named_parameters():
            if "token_embedding" in k:
                continue
            key = next((t for t in (k, k.replace(".weight", ".base_layer.weight"),
                                    k.replace(".bias", ".base_layer.bias")) if t in trained_state), None)
            assert key is not None and torch.equal(trained_state[key], v), f"{comp}.{k} changed"


def test_resume_after_interrupt_is_exact(trained, tmp_path):
    tmp, _, _ = trained
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, "resumed", stop_after=4)
    _, summary = train(tmp_path, "resumed")
    assert summary["resumed_from"] == 4 and summary["steps_run"] == 2
    assert asset_bytes(tmp_path / "resumed") == asset_bytes(tmp / "asset")


def _unet_out(unet, like, cond):
    """``unet``'s output on fixed inputs, conditioned as caspec conditions ``like``'s family."""
    torch.manual_seed(0)
    x = torch.randn(1, 4, 32, 32)
    return unet(x, torch.tensor([500]), encoder_hidden_states=cond.embeds,
                added_cond_kwargs=added_cond(like, cond, 64)).sample


def test_diffusers_export_loads_in_diffusers_sdxl_loaders(trained, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    _, _, asset = trained
    out = tmp_path / "diffusers"
    export_asset(asset, "diffusers", out)
    mine = fresh()
    fmt.apply_asset(mine, asset, lora_scale=1.0)
    theirs = fresh()
    ref = StableDiffusionXLPipeline(vae=theirs.vae, text_encoder=theirs.text_encoder,
                                    text_encoder_2=theirs.text_encoder_2, tokenizer=theirs.tokenizer,
                                    tokenizer_2=theirs.tokenizer_2, unet=theirs.unet,
                                    scheduler=S._scheduler_copy(theirs))
    ref.load_lora_weights(str(out), adapter_name="asset")
    for word in ("a1", "b1", "b2"):
        state = load_file(out / f"{word}.safetensors")
        assert set(state) == {"clip_l", "clip_g"}  # the layout diffusers' SDXL pivotal tuning writes
        ref.load_textual_inversion(state["clip_l"], token=f"<{word}>", text_encoder=ref.text_encoder,
                                   tokenizer=ref.tokenizer)
        ref.load_textual_inversion(state["clip_g"], token=f"<{word}>", text_encoder=ref.text_encoder_2,
                                   tokenizer=ref.tokenizer_2)
    with torch.no_grad():
        cond, _ = S.encode_prompts(mine, [PROMPT], guidance_scale=1.0)
        pe, _, pooled, _ = ref.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
        assert torch.allclose(cond.embeds, pe, atol=1e-6) and torch.allclose(cond.pooled, pooled, atol=1e-6)
        # the multi-vector word went in as two tokens on both sides, and LoRA changed the text encoders
        bare, _ = S.encode_prompts(fresh(), ["a photo of dance robot"], guidance_scale=1.0)
        assert not torch.allclose(cond.embeds, bare.embeds)
        from caspec.models.text import TextCond

        mine_out = _unet_out(mine.unet, mine, cond)
        assert torch.allclose(mine_out, _unet_out(ref.unet, mine, TextCond(pe, pooled)), atol=1e-5)
        assert not torch.allclose(mine_out, _unet_out(fresh().unet, mine, cond), atol=1e-5)  # the UNet LoRA acts


def test_kohya_sdxl_keys_convert_back_with_diffusers_converters(trained, tmp_path):
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
    from safetensors import safe_open
    from safetensors.torch import save_file

    _, pipe, asset = trained
    out = tmp_path / "a1111"
    export_asset(asset, "a1111", out)
    lora_file = out / "asset.safetensors"
    with safe_open(str(lora_file), "pt") as fh:
        keys = list(fh.keys())
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in keys}
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for k in keys)
    assert any(k.startswith("lora_te2_text_model_") for k in keys)
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") for k in keys)
    assert not any(k.startswith(("lora_te_", "lora_unet_down_blocks")) for k in keys)
    # diffusers' own converter maps every kohya layer back to the module it came from, same tensors
    converted, alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(dict(tensors), unet_config=pipe.unet.config)
    assert len(converted) == sum(len(v) for v in asset.lora.values())
    assert set(alphas.values()) == {asset.lora_alpha}
    got = {v.data_ptr() for v in converted.values()}
    assert got == {v.data_ptr() for k, v in tensors.items() if not k.endswith(".alpha")}
    # a community file (no caspec header): the importer maps the names with diffusers' converters
    community = tmp_path / "community"
    community.mkdir()
    save_file(tensors, community / "asset.safetensors")  # no metadata at all
    for word in ("a1", "b1", "b2"):
        with safe_open(str(out / f"{word}.safetensors"), "pt") as fh:
            save_file({k: fh.get_tensor(k) for k in fh.keys()}, community / f"{word}.safetensors")
    back = fmt.load_asset(import_asset(community, tmp_path / "back"))
    assert back.family == "sdxl" and back.tokens and back.vectors("<a1>") == 2
    for comp in asset.lora:
        assert set(back.lora[comp]) == set(asset.lora[comp]), comp
        assert all(torch.equal(back.lora[comp][k], asset.lora[comp][k]) for k in asset.lora[comp])


def test_family_mismatches_are_clear_errors(trained, tmp_path):
    _, _, asset = trained
    with pytest.raises(ValueError, match=r"trained on an SDXL model, but this model is SD 1\.x"):
        fmt.apply_asset(fresh("tiny"), asset)
    sd1 = tmp_path / "sd1"
    fmt.save_asset(sd1, tokens=["<x>"], roles={"<x>": "constant"}, init_words={"<x>": "x"},
                   embeddings={"<x>": torch.zeros(32)}, lora={}, lora_rank=4, lora_alpha=4, targets={})
    with pytest.raises(ValueError, match=r"SD 1\.x model, but this model is SDXL"):
        fmt.apply_asset(fresh(), fmt.load_asset(sd1))
    # an SDXL embedding file beside a one-encoder one cannot make one asset
    mixed = tmp_path / "mixed"
    export_asset(asset, "a1111", mixed)
    from safetensors.torch import save_file

    save_file({"emb_params": torch.zeros(1, 32)}, mixed / "other.safetensors")
    with pytest.raises(ValueError, match="clip_l \\+ clip_g"):
        import_asset(mixed, tmp_path / "mixed-out")


def test_multi_vector_community_embeddings_import_and_apply(tmp_path):
    """A1111 files with num_vectors_per_token > 1, as .pt (weights_only) and .safetensors, on SD 1.x."""
    from safetensors.torch import save_file

    src = tmp_path / "src"
    src.mkdir()
    pt = torch.randn(3, 32)
    torch.save({"string_to_param": {"*": pt}, "name": "grain"}, src / "grain.pt")
    st = torch.randn(2, 32)
    save_file({"emb_params": st}, src / "glow.safetensors")
    asset = fmt.load_asset(import_asset(src, tmp_path / "asset"))
    assert asset.family == "sd1" and asset.vectors("<grain>") == 3 and asset.vectors("<glow>") == 2
    assert torch.equal(asset.rows("<grain>"), pt) and torch.equal(asset.rows("<glow>"), st)
    pipe = fresh("tiny")
    fmt.apply_asset(pipe, asset)
    assert pipe.expansions == {"<grain>": ["<grain>", "<grain>_1", "<grain>_2"], "<glow>": ["<glow>", "<glow>_1"]}
    ids = pipe.tokenizer(S.expand_prompt(pipe, "a <grain> cat"), add_special_tokens=False).input_ids
    assert len(ids) == 5  # a, three vectors, cat
    rows = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(rows[ids[1:4]], pt)
    # exported again, the vectors stay together: one [3, d] tensor
    out = tmp_path / "out"
    export_asset(asset, "a1111", out)
    from safetensors.torch import load_file

    assert torch.equal(load_file(out / "grain.safetensors")["emb_params"], pt)
