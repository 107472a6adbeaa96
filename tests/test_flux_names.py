"""FLUX.1 kohya / ComfyUI LoRA names (caspec.families.flux_names), checked against diffusers' own Flux loader.

A tiny ``FluxTransformer2DModel`` (the config diffusers' fast tests use, with the guidance embedder), a tiny CLIP
and a tiny T5 get random LoRA ``A`` / ``B`` on their linears. The oracle is the delta ``B @ A * alpha / rank`` per
module: the kohya export must give it back through diffusers' ``FluxLoraLoaderMixin.lora_state_dict`` +
``load_lora_into_transformer`` / ``load_lora_into_text_encoder`` and through :func:`flux_lora_layers` in every
naming style. FLUX.1-dev's real shapes are checked on the meta device (no weights, no download).
"""
from __future__ import annotations

import json
import re

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from caspec.families.flux_names import (  # noqa: E402
    CLIP_LORA_TARGETS,
    FLUX_LORA_TARGETS,
    bfl_to_diffusers,
    detect_flux_lora,
    diffusers_to_bfl,
    flux_dev_config,
    flux_dims,
    flux_lora_layers,
    kohya_flux_header,
    kohya_flux_lora,
    kohya_flux_name,
)

RANK, ALPHA = 4, 8.0  # scale 2: a lost or ignored alpha shows
TINY = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
            guidance_embeds=True)
T5_TARGETS = ("SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o", "DenseReluDense.wi_0",
              "DenseReluDense.wi_1", "DenseReluDense.wo")
LINEAR1 = tuple(f"single_transformer_blocks.0.{m}" for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"))


def tiny_transformer():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(**TINY).eval()


def tiny_clip():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                        num_hidden_layers=2, vocab_size=99, projection_dim=32, bos_token_id=0,
                                        eos_token_id=2, pad_token_id=1)).eval()


def tiny_t5():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    return T5EncoderModel(T5Config(d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2, vocab_size=100,
                                   relative_attention_num_buckets=8, feed_forward_proj="gated-gelu")).eval()


@pytest.fixture(scope="module")
def models():
    return {"transformer": tiny_transformer(), "text_encoder": tiny_clip(), "text_encoder_2": tiny_t5()}


def linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def matches(name, targets):
    """peft's target_modules rule: the module name is a target or ends with ``.target``."""
    return any(name == t or name.endswith("." + t) for t in targets)


def random_layers(models, targets, seed=0, rank=RANK):
    """``{component: {module: (A, B)}}`` with random A and B for the linears matching ``targets[component]``."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for comp, wanted in targets.items():
        out[comp] = {n: (torch.randn(rank, m.in_features, generator=gen),
                         torch.randn(m.out_features, rank, generator=gen))
                     for n, m in linears(models[comp]).items() if wanted is None or matches(n, wanted)}
    return out


def expected(layers, rank=RANK, alpha=ALPHA):
    return {(c, m): b @ a * (alpha / rank) for c, mods in layers.items() for m, (a, b) in mods.items()}


def deltas(flux_layers):
    return {(l.component, l.module): l.delta() for l in flux_layers}


def assert_same_deltas(got, want, atol=1e-5):
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].shape == want[key].shape, key
        assert torch.allclose(got[key], want[key], atol=atol, rtol=1e-5), key


DEFAULT = {"transformer": FLUX_LORA_TARGETS, "text_encoder": CLIP_LORA_TARGETS}
EVERYTHING = {"transformer": None, "text_encoder": None, "text_encoder_2": T5_TARGETS}


# ------------------------------------------------------------------------------------------------ names


def test_every_transformer_linear_has_a_bfl_name_and_back(models):
    for name in linears(models["transformer"]):
        target = diffusers_to_bfl(name, models["transformer"].config)
        back = bfl_to_diffusers(target.path)
        assert len(back) == target.parts
        assert back[target.part or 0] == name


def test_name_examples():
    assert diffusers_to_bfl("transformer_blocks.3.attn.add_v_proj") == ("double_blocks.3.txt_attn.qkv", 2, 3)
    assert diffusers_to_bfl("single_transformer_blocks.7.proj_mlp") == ("single_blocks.7.linear1", 3, 4)
    assert diffusers_to_bfl("norm_out.linear").path == "final_layer.adaLN_modulation.1"
    assert (kohya_flux_name("transformer", "transformer_blocks.0.ff_context.net.2")
            == "lora_unet_double_blocks_0_txt_mlp_2")
    assert kohya_flux_name("transformer", "time_text_embed.timestep_embedder.linear_1") == "lora_unet_time_in_in_layer"
    for module in ("encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.0.self_attn.q_proj"):
        assert kohya_flux_name("text_encoder", module) == "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    assert (kohya_flux_name("text_encoder_2", "encoder.block.0.layer.0.SelfAttention.q")
            == "lora_te3_encoder_block_0_layer_0_SelfAttention_q")
    assert (kohya_flux_name("text_encoder_2", "encoder.block.23.layer.1.DenseReluDense.wi_1")
            == "lora_te3_encoder_block_23_layer_1_DenseReluDense_wi_1")


def test_export_default_targets_names_and_modules(models):
    layers = random_layers(models, DEFAULT)
    tensors, modules = kohya_flux_lora(layers, RANK, ALPHA)
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    double = {f"lora_unet_double_blocks_0_{s}" for s in ("img_attn_qkv", "txt_attn_qkv", "img_attn_proj",
                                                         "txt_attn_proj", "img_mlp_0", "img_mlp_2", "txt_mlp_0",
                                                         "txt_mlp_2")}
    clip = {f"lora_te1_text_model_encoder_layers_{i}_self_attn_{p}_proj" for i in range(2) for p in "qkv"}
    clip |= {f"lora_te1_text_model_encoder_layers_{i}_self_attn_out_proj" for i in range(2)}
    assert names == double | {"lora_unet_single_blocks_0_linear1"} | clip
    assert set(modules) == names
    assert modules["lora_unet_single_blocks_0_linear1"] == "transformer:" + ",".join(LINEAR1[:3])
    assert modules["lora_unet_double_blocks_0_txt_attn_qkv"] == "transformer:" + ",".join(
        f"transformer_blocks.0.attn.add_{p}_proj" for p in "qkv")
    assert modules["lora_te1_text_model_encoder_layers_1_self_attn_out_proj"] == (
        "text_encoder:encoder.layers.1.self_attn.out_proj")
    for key, t in tensors.items():
        assert t.dtype == torch.float32 and t.device.type == "cpu", key
    header = kohya_flux_header(RANK, ALPHA, modules)
    assert header["ss_network_module"] == "networks.lora_flux" and header["ss_base_model_version"] == "flux1"
    assert json.loads(header["modules"]) == modules


# ------------------------------------------------------------------------------------------------ fused layout


def test_fused_lora_up_is_block_diagonal_with_scaled_alpha(models):
    layers = random_layers(models, DEFAULT)
    tensors, _ = kohya_flux_lora(layers, RANK, ALPHA)
    tl = layers["transformer"]
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
    parts = [tl[f"transformer_blocks.0.attn.to_{p}"] for p in "qkv"]
    assert torch.equal(down, torch.cat([a for a, _ in parts]))
    assert up.shape == (3 * 32, 3 * RANK)
    for i in range(3):
        for j in range(3):
            block = up[32 * i:32 * (i + 1), RANK * j:RANK * (j + 1)]
            assert torch.equal(block, parts[i][1]) if i == j else not block.any()
    assert tensors[f"{name}.alpha"].item() == 3 * ALPHA
    # non-fused layers keep rank and alpha
    assert tensors["lora_unet_double_blocks_0_img_mlp_0.lora_down.weight"].shape == (RANK, 32)
    assert tensors["lora_unet_double_blocks_0_img_mlp_0.alpha"].item() == ALPHA


def test_partial_single_block_fusion_has_zero_mlp_rows(models):
    layers = random_layers(models, DEFAULT)  # single blocks: attn.to_q/k/v only, no proj_mlp
    tensors, _ = kohya_flux_lora(layers, RANK, ALPHA)
    up = tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    down = tensors["lora_unet_single_blocks_0_linear1.lora_down.weight"]
    mlp = models["transformer"].single_transformer_blocks[0].proj_mlp.out_features
    assert up.shape == (3 * 32 + mlp, 3 * RANK) and down.shape == (3 * RANK, 32)
    assert not up[3 * 32:].any()
    assert tensors["lora_unet_single_blocks_0_linear1.alpha"].item() == 3 * ALPHA
    # with proj_mlp: four parts, rank 4r, alpha 4 alpha, the MLP rows in the last column block
    full = random_layers(models, {"transformer": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")})
    tensors, modules = kohya_flux_lora(full, RANK, ALPHA)
    up = tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    assert up.shape == (3 * 32 + mlp, 4 * RANK)
    assert torch.equal(up[96:, 3 * RANK:], full["transformer"]["single_transformer_blocks.0.proj_mlp"][1])
    assert not up[96:, :3 * RANK].any()
    assert tensors["lora_unet_single_blocks_0_linear1.alpha"].item() == 4 * ALPHA
    assert modules["lora_unet_single_blocks_0_linear1"] == "transformer:" + ",".join(LINEAR1)


def test_config_gives_the_same_layout_and_checks_it(models):
    layers = random_layers(models, DEFAULT)
    plain, _ = kohya_flux_lora(layers, RANK, ALPHA)
    with_config, _ = kohya_flux_lora(layers, RANK, ALPHA, config=models["transformer"].config)
    assert plain.keys() == with_config.keys()
    assert all(torch.equal(plain[k], with_config[k]) for k in plain)
    assert flux_dims(models["transformer"].config) == (32, 128)
    wrong = dict(TINY, attention_head_dim=8)  # inner 16: the q/k/v LoRAs (32 outputs) do not fit
    with pytest.raises(ValueError, match="fused layout"):
        kohya_flux_lora(layers, RANK, ALPHA, config=wrong)


# ------------------------------------------------------------------------------------------------ diffusers oracle


def _peft_deltas(model, adapter):
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and adapter in module.lora_A:
            a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            out[name] = (b @ a * module.scaling[adapter]).detach()
    return out


def test_diffusers_loads_the_kohya_export_to_the_same_deltas(models):
    """Every transformer linear but the single-block linear1 parts (diffusers hard-codes FLUX.1's [3072]*3+[12288]
    split, tested at real size below), and CLIP q/k/v/out: diffusers' loader puts the same delta in each module."""
    from diffusers import FluxPipeline

    targets = {"transformer": None, "text_encoder": CLIP_LORA_TARGETS}
    layers = random_layers(models, targets)
    layers["transformer"] = {m: ab for m, ab in layers["transformer"].items() if m not in LINEAR1}
    tensors, _ = kohya_flux_lora(layers, RANK, ALPHA)
    state, alphas = FluxPipeline.lora_state_dict(dict(tensors), return_alphas=True)
    # diffusers 0.42.1 names the non-block layers (x_embedder, context_embedder, time_text_embed.*, proj_out,
    # norm_out.linear) without "transformer.", so load_lora_weights would skip them: put the prefix back
    state = {k if k.startswith(("transformer.", "text_encoder.")) else f"transformer.{k}": v for k, v in state.items()}
    transformer, clip = tiny_transformer(), tiny_clip()
    FluxPipeline.load_lora_into_transformer(state, network_alphas=alphas, transformer=transformer, adapter_name="k")
    FluxPipeline.load_lora_into_text_encoder(state, network_alphas=alphas, text_encoder=clip, prefix="text_encoder",
                                             adapter_name="k")
    got = {("transformer", m): d for m, d in _peft_deltas(transformer, "k").items()}
    got.update({("text_encoder", m.removeprefix("text_model.")): d for m, d in _peft_deltas(clip, "k").items()})
    assert_same_deltas(got, expected(layers))


@pytest.mark.parametrize("targets", [("attn.to_q", "attn.to_k", "attn.to_v"),
                                     ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")], ids=["qkv", "qkv+mlp"])
def test_diffusers_splits_linear1_at_flux1_size(targets):
    """One single block at FLUX.1's real width (3072, MLP 12288): diffusers' converter gives every part its delta
    back (absent proj_mlp: a zero one). Deltas compared on random probes (B @ (A @ x)) to stay small."""
    from diffusers import FluxPipeline

    gen = torch.Generator().manual_seed(1)
    sizes = {"attn.to_q": 3072, "attn.to_k": 3072, "attn.to_v": 3072, "proj_mlp": 12288}
    layers = {f"single_transformer_blocks.0.{t}": (torch.randn(RANK, 3072, generator=gen) / 30,
                                                   torch.randn(sizes[t], RANK, generator=gen) / 30) for t in targets}
    tensors, _ = kohya_flux_lora({"transformer": layers}, RANK, ALPHA)
    state, _ = FluxPipeline.lora_state_dict(dict(tensors), return_alphas=True)
    probe = torch.randn(3072, 3, generator=gen)
    seen = set()
    for key in state:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
        got = state[key.replace("lora_A", "lora_B")] @ (state[key] @ probe)
        if module in layers:
            a, b = layers[module]
            assert torch.allclose(got, b @ (a @ probe) * (ALPHA / RANK), atol=1e-5), module
            seen.add(module)
        else:
            assert module == "single_transformer_blocks.0.proj_mlp" and not got.any()
    assert seen == set(layers)


# ------------------------------------------------------------------------------------------------ import


def style_tensors(style, layers):
    """``layers`` written in one naming style (what each tool's files look like)."""
    if style == "kohya":
        tensors, _ = kohya_flux_lora(layers, RANK, ALPHA)
        return tensors
    if style == "comfyui":  # diffusion_model.<BFL path>, text_encoders.<clip_l|t5xxl>.transformer.<path>
        tensors, modules = kohya_flux_lora(layers, RANK, ALPHA)
        out = {}
        for key, value in tensors.items():
            name, suffix = re.match(r"^(.+?)(\.lora_down\.weight|\.lora_up\.weight|\.alpha)$", key).groups()
            comp, first = modules[name].split(":")[0], modules[name].split(":")[1].split(",")[0]
            if comp == "transformer":
                prefix = "diffusion_model." + diffusers_to_bfl(first).path
            elif comp == "text_encoder":
                prefix = "text_encoders.clip_l.transformer.text_model." + first
            else:
                prefix = "text_encoders.t5xxl.transformer." + first
            out[prefix + suffix] = value
        return out
    out = {}
    for comp, mods in layers.items():
        for module, (a, b) in mods.items():
            if style == "diffusers":  # peft keys, alpha kept in the header (default_alpha)
                out[f"{comp}.{module}.lora_A.weight"], out[f"{comp}.{module}.lora_B.weight"] = a, b
                continue
            name = {"transformer": "lora_transformer_" + module.replace(".", "_"),  # OneTrainer legacy
                    "text_encoder": "lora_te1_text_model_" + module.replace(".", "_"),
                    "text_encoder_2": "lora_te2_" + module.replace(".", "_")}[comp]
            out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = a, b
            out[f"{name}.alpha"] = torch.tensor(ALPHA)
    return out


@pytest.mark.parametrize("style", ["kohya", "comfyui", "diffusers", "onetrainer"])
@pytest.mark.parametrize("targets", ["default", "everything"])
def test_import_round_trips_every_style(models, style, targets):
    layers = random_layers(models, DEFAULT if targets == "default" else EVERYTHING)
    if targets == "default":
        layers["text_encoder_2"] = random_layers(models, {"text_encoder_2": T5_TARGETS[:4]}, seed=5)["text_encoder_2"]
    tensors = style_tensors(style, layers)
    default_alpha = dict.fromkeys(layers, ALPHA) if style == "diffusers" else None
    got = flux_lora_layers(tensors, default_alpha=default_alpha)
    assert_same_deltas(deltas(got), expected(layers))
    assert detect_flux_lora(tensors)
    ranks = {l.rank for l in got}
    assert ranks == {RANK}  # block-sparse fused layers split back to rank r per part


def test_import_kohya_t5_keys_that_diffusers_drops(models):
    from diffusers import FluxPipeline

    layers = {"text_encoder_2": random_layers(models, {"text_encoder_2": T5_TARGETS})["text_encoder_2"],
              "transformer": random_layers(models, {"transformer": ("attn.to_out.0",)})["transformer"]}
    tensors, modules = kohya_flux_lora(layers, RANK, ALPHA)
    assert "lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_0" in modules
    assert_same_deltas(deltas(flux_lora_layers(tensors)), expected(layers))
    state, _ = FluxPipeline.lora_state_dict(dict(tensors), return_alphas=True)
    assert state and not any("encoder.block" in k or k.startswith("text_encoder") for k in state)


def test_import_clip_paths_follow_the_transformers_layout(models):
    layers = random_layers(models, {"text_encoder": ("q_proj",)})
    tensors, _ = kohya_flux_lora(layers, RANK, ALPHA)
    flat = {l.module for l in flux_lora_layers(tensors, clip_text_model=False)}
    nested = {l.module for l in flux_lora_layers(tensors, clip_text_model=True)}
    assert flat == set(layers["text_encoder"])
    assert nested == {"text_model." + m for m in flat}
    native = {l.module for l in flux_lora_layers(tensors)}
    assert native == (nested if hasattr(models["text_encoder"], "text_model") else flat)


def test_import_dense_fused_layer_as_sd_scripts_trains_it():
    """sd-scripts trains the fused linear itself: one shared lora_down, dense lora_up. Each part gets the whole
    lora_down and its rows; diffusers' converter agrees on the double-block qkv (its single-block split is FLUX.1-
    size only)."""
    from diffusers import FluxPipeline

    gen = torch.Generator().manual_seed(3)
    down, up = torch.randn(RANK, 32, generator=gen), torch.randn(96, RANK, generator=gen)
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    sd = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(ALPHA)}
    got = deltas(flux_lora_layers(sd))
    want = {("transformer", f"transformer_blocks.0.attn.to_{p}"): up[32 * i:32 * (i + 1)] @ down * (ALPHA / RANK)
            for i, p in enumerate("qkv")}
    assert_same_deltas(got, want)
    state, _ = FluxPipeline.lora_state_dict(dict(sd), return_alphas=True)
    oracle = {("transformer", k.removeprefix("transformer.").removesuffix(".lora_A.weight")):
              state[k.replace("lora_A", "lora_B")] @ state[k] for k in state if k.endswith(".lora_A.weight")}
    assert_same_deltas(got, oracle)
    # single-block linear1, dense, at the tiny width: q/k/v 32 rows each, MLP 128
    lin = "lora_unet_single_blocks_0_linear1"
    up1 = torch.randn(224, RANK, generator=gen)
    sd = {f"{lin}.lora_down.weight": down, f"{lin}.lora_up.weight": up1, f"{lin}.alpha": torch.tensor(ALPHA)}
    bounds = [0, 32, 64, 96, 224]
    want = {("transformer", m): up1[bounds[i]:bounds[i + 1]] @ down * (ALPHA / RANK) for i, m in enumerate(LINEAR1)}
    assert_same_deltas(deltas(flux_lora_layers(sd)), want)


def test_import_goes_through_diffusers_for_xlabs_files():
    gen = torch.Generator().manual_seed(4)
    qkv_down, qkv_up = torch.randn(RANK, 32, generator=gen), torch.randn(96, RANK, generator=gen)
    proj_down, proj_up = torch.randn(RANK, 32, generator=gen), torch.randn(32, RANK, generator=gen)
    sd = {"double_blocks.0.processor.qkv_lora1.down.weight": qkv_down,
          "double_blocks.0.processor.qkv_lora1.up.weight": qkv_up,
          "double_blocks.0.processor.proj_lora1.down.weight": proj_down,
          "double_blocks.0.processor.proj_lora1.up.weight": proj_up}
    assert detect_flux_lora(sd)
    want = {("transformer", f"transformer_blocks.0.attn.to_{p}"): qkv_up[32 * i:32 * (i + 1)] @ qkv_down
            for i, p in enumerate("qkv")}
    want[("transformer", "transformer_blocks.0.attn.to_out.0")] = proj_up @ proj_down
    assert_same_deltas(deltas(flux_lora_layers(sd)), want)


def test_detect_flux_lora():
    assert detect_flux_lora(["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"])
    assert detect_flux_lora(["diffusion_model.single_blocks.3.linear1.lora_A.weight"])
    assert detect_flux_lora(["transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"])
    assert detect_flux_lora(["lora_transformer_single_transformer_blocks_0_proj_mlp.alpha"])
    assert not detect_flux_lora([])
    assert not detect_flux_lora(["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"])  # SD 1.x
    assert not detect_flux_lora(["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight"])
    assert not detect_flux_lora(["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
                                 "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"])
    # diffusers names on double blocks only are SD3's as well
    assert not detect_flux_lora(["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"])
    assert not detect_flux_lora(["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"])


# ------------------------------------------------------------------------------------------------ FLUX.1-dev, meta


def test_flux1_dev_shapes_on_meta_device():
    """FLUX.1-dev (19 double, 38 single blocks, width 3072), CLIP-L and T5-XXL built on the meta device: the
    default targets at rank 16 give sd-scripts' names and shapes (networks/convert_flux_lora.py lists them)."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    config = flux_dev_config()
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**config)
        clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                            num_hidden_layers=12, vocab_size=49408, max_position_embeddings=77,
                                            projection_dim=768))
        t5 = T5EncoderModel(T5Config(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                                     vocab_size=32128, feed_forward_proj="gated-gelu"))
    assert all(p.is_meta for p in transformer.parameters())
    r = 16

    def meta_layers(model, targets):
        return {n: (torch.empty(r, m.in_features, device="meta"), torch.empty(m.out_features, r, device="meta"))
                for n, m in linears(model).items() if matches(n, targets)}

    layers = {"transformer": meta_layers(transformer, FLUX_LORA_TARGETS),
              "text_encoder": meta_layers(clip, CLIP_LORA_TARGETS), "text_encoder_2": meta_layers(t5, T5_TARGETS)}
    assert len(layers["transformer"]) == 19 * 12 + 38 * 3  # single blocks match attn.to_q/k/v only
    tensors, modules = kohya_flux_lora(layers, r, 16.0, config=transformer.config)
    derived, _ = kohya_flux_lora(layers, r, 16.0)  # sizes from the shapes alone
    assert {k: v.shape for k, v in derived.items()} == {k: v.shape for k, v in tensors.items()}

    kinds = {}
    for name in modules:
        kind = re.sub(r"(blocks|layers|block)_\d+_", r"\1_N_", name)
        kinds[kind] = kinds.get(kind, 0) + 1
    assert kinds == {**{f"lora_unet_double_blocks_N_{s}": 19 for s in (
        "img_attn_qkv", "txt_attn_qkv", "img_attn_proj", "txt_attn_proj", "img_mlp_0", "img_mlp_2", "txt_mlp_0",
        "txt_mlp_2")}, "lora_unet_single_blocks_N_linear1": 38,
        **{f"lora_te1_text_model_encoder_layers_N_self_attn_{p}_proj": 12 for p in ("q", "k", "v", "out")},
        **{f"lora_te3_encoder_block_N_layer_0_SelfAttention_{p}": 24 for p in "qkvo"},
        **{f"lora_te3_encoder_block_N_layer_1_DenseReluDense_{p}": 24 for p in ("wi_0", "wi_1", "wo")}}

    def shape(name, part):
        return tuple(tensors[f"{name}.lora_{part}.weight"].shape)

    assert shape("lora_unet_single_blocks_37_linear1", "up") == (21504, 48)
    assert shape("lora_unet_single_blocks_37_linear1", "down") == (48, 3072)
    assert shape("lora_unet_double_blocks_18_img_attn_qkv", "up") == (9216, 48)
    assert shape("lora_unet_double_blocks_18_txt_attn_qkv", "down") == (48, 3072)
    assert shape("lora_unet_double_blocks_0_img_mlp_0", "up") == (12288, 16)
    assert shape("lora_unet_double_blocks_0_txt_mlp_2", "down") == (16, 12288)
    assert shape("lora_unet_double_blocks_0_img_attn_proj", "up") == (3072, 16)
    assert shape("lora_te1_text_model_encoder_layers_11_self_attn_out_proj", "up") == (768, 16)
    assert shape("lora_te3_encoder_block_23_layer_1_DenseReluDense_wo", "down") == (16, 10240)
    assert tensors["lora_unet_single_blocks_0_linear1.alpha"].item() == 48.0
    assert tensors["lora_unet_double_blocks_0_img_mlp_0.alpha"].item() == 16.0
    # each fused lora_up has the rows of BFL's fused weight: the sum of the diffusers parts' outputs
    block = transformer.single_transformer_blocks[0]
    rows = sum(m.out_features for m in (block.attn.to_q, block.attn.to_k, block.attn.to_v, block.proj_mlp))
    assert shape("lora_unet_single_blocks_0_linear1", "up")[0] == rows


# ------------------------------------------------------------------------------------------------ errors


def test_export_errors(models):
    a, b = torch.zeros(RANK, 32), torch.zeros(32, RANK)
    with pytest.raises(ValueError, match="no FLUX.1 kohya name"):
        kohya_flux_lora({"transformer": {"transformer_blocks.0.attn.norm_q": (a, b)}}, RANK, ALPHA)
    with pytest.raises(ValueError, match="no FLUX.1 kohya name"):
        kohya_flux_lora({"transformer": {"single_transformer_blocks.0.attn.to_out.0": (a, b)}}, RANK, ALPHA)
    with pytest.raises(ValueError, match="components"):
        kohya_flux_lora({"unet": {"x": (a, b)}}, RANK, ALPHA)
    with pytest.raises(ValueError, match="rank"):
        kohya_flux_lora({"transformer": {"transformer_blocks.0.attn.to_q": (a, b)}}, RANK + 1, ALPHA)
    with pytest.raises(ValueError, match="outside this config"):
        kohya_flux_lora({"transformer": {"transformer_blocks.1.attn.to_q": (a, b)}}, RANK, ALPHA,
                        config=models["transformer"].config)
    with pytest.raises(ValueError, match="text_encoder module"):
        kohya_flux_lora({"text_encoder": {"encoder.layers.0.layer_norm1": (a, b)}}, RANK, ALPHA)
    with pytest.raises(ValueError, match="text_encoder_2 module"):
        kohya_flux_lora({"text_encoder_2": {"shared": (a, b)}}, RANK, ALPHA)
    with pytest.raises(ValueError, match="2-D"):
        kohya_flux_lora({"transformer": {"proj_out": (a[None], b)}}, RANK, ALPHA)
    with pytest.raises(ValueError, match="fused layout"):  # k is 32 wide, q 16: not FLUX's equal q/k/v
        kohya_flux_lora({"transformer": {"transformer_blocks.0.attn.to_q": (a, torch.zeros(16, RANK)),
                                         "transformer_blocks.0.attn.to_k": (a, b)}}, RANK, ALPHA)


def test_import_errors(models):
    layers = random_layers(models, {"transformer": ("attn.to_out.0",)})
    good, _ = kohya_flux_lora(layers, RANK, ALPHA)
    name = "lora_unet_double_blocks_0_img_attn_proj"
    with pytest.raises(ValueError, match="empty"):
        flux_lora_layers({})
    with pytest.raises(ValueError, match="lacks its up"):
        flux_lora_layers({k: v for k, v in good.items() if "lora_up" not in k})
    with pytest.raises(ValueError, match="no known FLUX.1 style"):
        flux_lora_layers({**good, "lora_unet_double_blocks_0_img_attn_qk.lora_down.weight": torch.zeros(RANK, 32)})
    with pytest.raises(ValueError, match="no known FLUX.1 style"):
        flux_lora_layers({**good, f"{name}.dora_scale": torch.zeros(32)})
    with pytest.raises(ValueError, match="scalar"):
        flux_lora_layers({**good, f"{name}.alpha": torch.ones(2)})
    with pytest.raises(ValueError, match="not a linear LoRA pair"):
        flux_lora_layers({**good, f"{name}.lora_up.weight": torch.zeros(32, RANK + 1)})
    with pytest.raises(ValueError, match="twice"):
        flux_lora_layers({**good, f"{name}.lora_A.weight": torch.zeros(RANK, 32)})
    a, b = layers["transformer"]["transformer_blocks.0.attn.to_out.0"]
    with pytest.raises(ValueError, match="more than one LoRA layer"):  # the same module in two styles
        flux_lora_layers({**good, "transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight": a,
                          "transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight": b})
    lin = "lora_unet_single_blocks_0_linear1"
    with pytest.raises(ValueError, match="linear1 lora_up"):
        flux_lora_layers({f"{lin}.lora_down.weight": torch.zeros(RANK, 32),
                          f"{lin}.lora_up.weight": torch.zeros(90, RANK)})
    with pytest.raises(ValueError, match="not a FLUX.1 LoRA"):  # an SD 1.x kohya file: diffusers' Flux loader fails too
        flux_lora_layers({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(RANK, 32),
                          "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, RANK)})
