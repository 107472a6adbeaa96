"""Kohya SDXL LoRA names (caspec.families.sdxl), checked against diffusers' own SDXL loader as the oracle.

Two small random SDXL-shaped UNets (the one diffusers' SDXL pipeline tests use, and a three-down-block one with
SDXL's block types) and two tiny CLIP text encoders. A kohya file is written with :func:`kohya_sdxl_name`, read
with ``StableDiffusionXLLoraLoaderMixin.lora_state_dict(sd, unet_config=unet.config)`` and loaded with its
``load_lora_into_unet`` / ``load_lora_into_text_encoder``; the peft weights that land in each module must be
exactly the tensors written for it (``lora_down`` -> ``lora_A``, ``lora_up`` -> ``lora_B``) and its scale
``alpha / rank``.
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from caspec.families.sdxl import diffusers_to_sgm, kohya_sdxl_name, sgm_to_diffusers  # noqa: E402

RANK, ALPHA = 4, 8.0  # scale 2: a lost or ignored alpha shows
ATTN_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TE_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, the fields that decide the layout
SDXL_CONFIG = {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
               "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
               "layers_per_block": 2, "mid_block_type": "UNetMidBlock2DCrossAttn",
               "transformer_layers_per_block": [1, 2, 10]}

_COMMON = dict(sample_size=32, in_channels=4, out_channels=4, use_linear_projection=True,
               addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
               cross_attention_dim=64, norm_num_groups=1)
LAYOUTS = {
    # diffusers' tests/pipelines/stable_diffusion_xl: two blocks
    "pipeline-test": dict(block_out_channels=(32, 64), layers_per_block=2,
                          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                          up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                          attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2)),
    # SDXL's block types and count, small widths
    "sdxl-blocks": dict(block_out_channels=(16, 32, 32), layers_per_block=2,
                        down_block_types=tuple(SDXL_CONFIG["down_block_types"]),
                        up_block_types=tuple(SDXL_CONFIG["up_block_types"]),
                        attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 2, 2)),
}


@pytest.fixture(params=sorted(LAYOUTS))
def unet(request):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**_COMMON, **LAYOUTS[request.param]).eval()


def text_encoders():
    """Tiny CLIP-L-like (``CLIPTextModel``) and bigG-like (``CLIPTextModelWithProjection``) text encoders."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                         vocab_size=99, projection_dim=32, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    torch.manual_seed(0)
    return {"text_encoder": CLIPTextModel(cfg), "text_encoder_2": CLIPTextModelWithProjection(cfg)}


def lora_tensors(module, gen):
    """Random kohya ``lora_down`` / ``lora_up`` for a Linear or Conv2d (kohya's LoCon shapes for convs)."""
    if isinstance(module, torch.nn.Linear):
        return (torch.randn(RANK, module.in_features, generator=gen),
                torch.randn(module.out_features, RANK, generator=gen))
    kh, kw = module.kernel_size
    return (torch.randn(RANK, module.in_channels, kh, kw, generator=gen),
            torch.randn(module.out_channels, RANK, 1, 1, generator=gen))


def attention_targets(unet):
    return [n for n, _ in unet.named_modules() if n.endswith(ATTN_TARGETS)]


def write_kohya(components, modules, gen, alpha=ALPHA):
    """A kohya SDXL state dict for ``{component: [module path]}`` and the tensors expected back per module."""
    unet_config = components["unet"].config
    sd, expected, names = {}, {}, {}
    for comp, paths in modules.items():
        model = components[comp]
        for path in paths:
            name = kohya_sdxl_name(comp, path, unet_config)
            assert name not in names, f"{comp}:{path} and {names[name]} share the kohya name {name}"
            names[name] = f"{comp}:{path}"
            down, up = lora_tensors(model.get_submodule(path), gen)
            sd[f"{name}.lora_down.weight"] = down
            sd[f"{name}.lora_up.weight"] = up
            sd[f"{name}.alpha"] = torch.tensor(alpha)
            expected.setdefault(comp, {})[path] = (down, up)
    return sd, expected


def load_with_diffusers(components, sd):
    """diffusers' SDXL loader on ``sd``: (its state dict, its network alphas); LoRA injected as adapter ``k``."""
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin as Loader

    unet = components["unet"]
    state, alphas = Loader.lora_state_dict(dict(sd), unet_config=unet.config)
    Loader.load_lora_into_unet(state, alphas, unet, adapter_name="k")
    for comp in ("text_encoder", "text_encoder_2"):
        if comp in components:
            Loader.load_lora_into_text_encoder(state, alphas, components[comp], prefix=comp, adapter_name="k")
    return state, alphas


def assert_loaded(model, expected, what):
    """The peft LoRA of ``model`` is exactly ``expected`` ({module: (down, up)}), with scale ALPHA / RANK."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    got = get_peft_model_state_dict(model, adapter_name="k")
    want = {}
    for path, (down, up) in expected.items():
        want[f"{path}.lora_A.weight"] = down
        want[f"{path}.lora_B.weight"] = up
    assert sorted(got) == sorted(want), f"{what}: modules with LoRA differ from those written"
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), f"{what}: {key} does not hold the tensor written for it"
    scales = {n: m.scaling["k"] for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert sorted(scales) == sorted(expected)
    assert set(scales.values()) == {ALPHA / RANK}, f"{what}: scales {set(scales.values())}"


def test_sdxl_layout_names():
    """Known names of a real kohya SDXL LoRA, from SDXL's own config (no model)."""
    cases = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q":
            "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
        "down_blocks.1.attentions.1.proj_in": "input_blocks.5.1.proj_in",
        "down_blocks.2.attentions.0.transformer_blocks.9.attn2.to_out.0":
            "input_blocks.7.1.transformer_blocks.9.attn2.to_out.0",
        "down_blocks.2.attentions.1.proj_out": "input_blocks.8.1.proj_out",
        "mid_block.attentions.0.transformer_blocks.9.ff.net.0.proj":
            "middle_block.1.transformer_blocks.9.ff.net.0.proj",
        "mid_block.attentions.0.proj_in": "middle_block.1.proj_in",
        "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k": "output_blocks.0.1.transformer_blocks.0.attn1.to_k",
        "up_blocks.0.attentions.2.transformer_blocks.1.ff.net.2": "output_blocks.2.1.transformer_blocks.1.ff.net.2",
        "up_blocks.1.attentions.2.transformer_blocks.1.attn2.to_v": "output_blocks.5.1.transformer_blocks.1.attn2.to_v",
        "up_blocks.1.attentions.0.norm": "output_blocks.3.1.norm",
        # non-attention layers diffusers' converter also maps back
        "conv_in": "input_blocks.0.0",
        "down_blocks.0.resnets.1.conv1": "input_blocks.2.0.in_layers.2",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
        "down_blocks.1.downsamplers.0.conv": "input_blocks.6.0.op",
        "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
        "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
        "up_blocks.2.resnets.2.conv2": "output_blocks.8.0.out_layers.3",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "conv_out": "out.2",
    }
    for module, sgm in cases.items():
        assert diffusers_to_sgm(module, SDXL_CONFIG) == sgm, module
        assert sgm_to_diffusers(sgm, SDXL_CONFIG) == module, sgm
    assert (kohya_sdxl_name("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", SDXL_CONFIG)
            == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q")
    assert (kohya_sdxl_name("unet", "up_blocks.0.attentions.1.transformer_blocks.3.attn2.to_out.0", SDXL_CONFIG)
            == "lora_unet_output_blocks_1_1_transformer_blocks_3_attn2_to_out_0")


def test_text_encoder_names():
    for module in ("encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.0.self_attn.q_proj"):
        assert (kohya_sdxl_name("text_encoder", module, SDXL_CONFIG)
                == "lora_te1_text_model_encoder_layers_0_self_attn_q_proj")
        assert kohya_sdxl_name("text_encoder_2", module) == "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    assert (kohya_sdxl_name("text_encoder_2", "encoder.layers.31.mlp.fc2")
            == "lora_te2_text_model_encoder_layers_31_mlp_fc2")
    with pytest.raises(ValueError, match="embeddings.token_embedding"):
        kohya_sdxl_name("text_encoder", "embeddings.token_embedding")
    with pytest.raises(ValueError, match="component 'vae'"):
        kohya_sdxl_name("vae", "encoder.conv_in", SDXL_CONFIG)
    with pytest.raises(ValueError, match="needs the UNet config"):
        kohya_sdxl_name("unet", "conv_in")


def test_diffusers_loader_reads_attention_lora_back(unet):
    """Every attention target (to_q/k/v/out.0) of the UNet plus q/k/v/out_proj and fc1/fc2 of both text
    encoders: written under kohya SDXL names, read and loaded by diffusers, each tensor lands in its module."""
    components = {"unet": unet, **text_encoders()}
    # transformers 5 flattens CLIPTextModel (no text_model.) but not CLIPTextModelWithProjection: use each
    # model's own paths; the kohya names carry text_model_ either way
    te_modules = {comp: [f"{'text_model.' if hasattr(components[comp], 'text_model') else ''}encoder.layers.{i}.{t}"
                         for i in (0, 1) for t in TE_TARGETS] for comp in ("text_encoder", "text_encoder_2")}
    modules = {"unet": attention_targets(unet), **te_modules}
    assert len(modules["unet"]) >= 40
    sd, expected = write_kohya(components, modules, torch.Generator().manual_seed(1))

    state, alphas = load_with_diffusers(components, sd)
    n_layers = sum(len(p) for p in modules.values())
    # diffusers keeps the tensors as they are (no alpha folded in) and returns one network alpha per layer,
    # prefixed by component; text-encoder keys carry text_model. whatever the model's own layout
    assert len(state) == 2 * n_layers
    assert len(alphas) == n_layers and set(alphas.values()) == {ALPHA}
    assert {k.split(".")[0] for k in alphas} == {"unet", "text_encoder", "text_encoder_2"}
    assert all(k.startswith(("text_encoder.text_model.", "text_encoder_2.text_model."))
               for k in list(state) + list(alphas) if k.startswith("text_encoder"))
    kept = {k: v for k, v in state.items() if k.startswith("unet.")}
    assert len(kept) == 2 * len(modules["unet"])
    assert {id(v) for v in state.values()} == {id(v) for k, v in sd.items() if not k.endswith(".alpha")}

    for comp, model in components.items():
        assert_loaded(model, expected[comp], comp)


def test_diffusers_loader_reads_every_supported_unet_layer_back(unet):
    """Every Linear / Conv2d of the UNet (resnet convs, time_emb_proj, samplers, conv_in/out, embeddings,
    attention projections and feed-forwards) has a kohya SDXL name that diffusers loads into that module."""
    layers = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert {"conv_in", "conv_out", "time_embedding.linear_1", "add_embedding.linear_2",
            "down_blocks.0.downsamplers.0.conv", "up_blocks.0.upsamplers.0.conv"} <= set(layers)
    sd, expected = write_kohya({"unet": unet}, {"unet": layers}, torch.Generator().manual_seed(2))
    state, alphas = load_with_diffusers({"unet": unet}, sd)
    assert len(state) == 2 * len(layers) and len(alphas) == len(layers)
    assert_loaded(unet, expected["unet"], "unet")


def test_round_trip_and_inverse(unet):
    cfg = unet.config
    layers = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    leaf_types = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.LayerNorm, torch.nn.GroupNorm)
    attention = [n for n, m in unet.named_modules() if ".attentions." in n and isinstance(m, leaf_types)]
    assert set(attention_targets(unet)) <= set(attention)
    sgm = {}
    for module in sorted(set(layers) | set(attention)):
        path = diffusers_to_sgm(module, cfg)
        assert path.startswith(("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.",
                                "out.")), path
        assert path not in sgm, f"{module} and {sgm[path]} both map to {path}"
        sgm[path] = module
        assert sgm_to_diffusers(path, cfg) == module
        assert diffusers_to_sgm(module, dict(cfg)) == path  # a plain dict (config.json) works the same


def test_unsupported_modules_raise(unet):
    cfg = unet.config
    final_down = len(cfg.down_block_types) - 1
    for module in ("down_blocks.0.resnets.0.norm1",  # GroupNorm: diffusers' converter has no name for in_layers.0
                   "down_blocks.1.attentions.0.transformer_blocks.0.attn1",  # not a leaf
                   "down_blocks.0.attentions.0.proj_in",  # DownBlock2D has no attentions
                   f"down_blocks.{final_down}.downsamplers.0.conv",  # the last down block does not downsample
                   "up_blocks.0.attentions.3.proj_in",  # 3 layers per up block
                   "conv_norm_out", "time_proj", "unet.conv_in"):
        with pytest.raises(ValueError, match="kohya SDXL export supports LoRA on attention layers") as err:
            diffusers_to_sgm(module, cfg)
        assert repr(module) in str(err.value)
    with pytest.raises(ValueError, match="'input_blocks.3.1.proj_in'"):
        sgm_to_diffusers("input_blocks.3.1.proj_in", cfg)  # input_blocks.3 is the first downsampler
    with pytest.raises(ValueError, match="'middle_block.0.in_layers.0'"):
        sgm_to_diffusers("middle_block.0.in_layers.0", cfg)
    # an UpBlock2D that upsamples has its conv at SGM output_blocks.N.1.conv, which diffusers' converter reads as
    # an attention: refused rather than written under a name diffusers would load elsewhere
    odd = {"down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
           "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "layers_per_block": 1}
    assert diffusers_to_sgm("up_blocks.1.attentions.1.proj_in", odd) == "output_blocks.3.1.proj_in"
    with pytest.raises(ValueError, match="up_blocks.0.upsamplers.0.conv"):
        diffusers_to_sgm("up_blocks.0.upsamplers.0.conv", odd)
    with pytest.raises(ValueError, match="AttnDownBlock2D"):
        diffusers_to_sgm("conv_in", {**odd, "down_block_types": ["AttnDownBlock2D", "DownBlock2D"]})
    with pytest.raises(ValueError, match="layers_per_block"):
        diffusers_to_sgm("conv_in", {"down_block_types": odd["down_block_types"],
                                     "up_block_types": odd["up_block_types"]})
