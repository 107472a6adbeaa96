"""A random-weight model folder with Stable Diffusion 1.5's exact configurations and file layout.

The layout is the real repository's (stable-diffusion-v1-5/stable-diffusion-v1-5): ``model_index.json``
naming a safety checker and a feature extractor, ``unet/``, ``vae/`` and ``text_encoder/`` with fp32
weights and an fp16 variant beside them (``*.fp16.safetensors``) plus ``.bin`` files, the tokenizer as
``vocab.json`` + ``merges.txt`` (CLIP's real BPE, as caspec's tiny model ships it), a PNDM scheduler config,
``safety_checker/`` and ``feature_extractor/``, and single-file checkpoints at the top level. Files that no
diffusers loader should read in caspec's way of loading (the ``.bin`` files beside ``.safetensors``, the
safety checker's weights, the top-level checkpoints) hold a few bytes of garbage: loading one would fail.
The safety checker is a small config plus such a dummy file (a real one would be another 1.2 GB of CLIP
ViT-L/14 vision weights that caspec never loads).

:func:`ensure_sd15` builds it once per recipe into ``$CASPEC_SD15_CACHE`` (default
``~/.cache/caspec-test``), atomically (:func:`caspec.models.tiny.build_atomically`); about 4.3 GB of fp32
and 2.1 GB of fp16 weights.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

RECIPE_VERSION = 1
SEED = 15

UNET: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
VAE: dict[str, Any] = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3,
    "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
TEXT_ENCODER: dict[str, Any] = {  # openai/clip-vit-large-patch14's text tower, as SD 1.5 ships it
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
    "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
    "model_type": "clip_text_model", "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1,
    "projection_dim": 768, "torch_dtype": "float32", "vocab_size": 49408,
}
SCHEDULER: dict[str, Any] = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}
MODEL_INDEX: dict[str, Any] = {
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
TOKENIZER_CONFIG: dict[str, Any] = {
    "add_prefix_space": False, "bos_token": "<|startoftext|>", "do_lower_case": True,
    "eos_token": "<|endoftext|>", "errors": "replace", "model_max_length": 77,
    "name_or_path": "openai/clip-vit-large-patch14", "pad_token": "<|endoftext|>",
    "special_tokens_map_file": "./special_tokens_map.json", "tokenizer_class": "CLIPTokenizer",
    "unk_token": "<|endoftext|>",
}
SPECIAL_TOKENS: dict[str, str] = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                                  "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
FEATURE_EXTRACTOR: dict[str, Any] = {
    "crop_size": 224, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224,
}
SAFETY_CHECKER: dict[str, Any] = {"_name_or_path": "CompVis/stable-diffusion-safety-checker",
                                  "architectures": ["StableDiffusionSafetyChecker"], "model_type": "clip"}

# files caspec must never read: garbage, so that reading one fails
DUMMIES = ("safety_checker/model.safetensors", "safety_checker/pytorch_model.bin",
           "safety_checker/model.fp16.safetensors", "unet/diffusion_pytorch_model.bin",
           "unet/diffusion_pytorch_model.fp16.bin", "vae/diffusion_pytorch_model.bin",
           "text_encoder/pytorch_model.bin", "v1-5-pruned.safetensors", "v1-5-pruned-emaonly.ckpt",
           "v1-5-pruned-emaonly.safetensors")
COMPLETE = ".caspec-sd15-complete"


def recipe() -> dict[str, Any]:
    from importlib.metadata import version

    return {"v": RECIPE_VERSION, "seed": SEED, "unet": UNET, "vae": VAE, "text_encoder": TEXT_ENCODER,
            "scheduler": SCHEDULER, "index": MODEL_INDEX, "tokenizer": TOKENIZER_CONFIG, "dummies": DUMMIES,
            "torch": version("torch"), "diffusers": version("diffusers"), "transformers": version("transformers")}


def recipe_digest() -> str:
    return hashlib.sha256(json.dumps(recipe(), sort_keys=True).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    root = os.environ.get("CASPEC_SD15_CACHE") or str(Path.home() / ".cache" / "caspec-test")
    return Path(root).expanduser()


def _json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _save_weights(module: Any, folder: Path, name: str, fp16_name: str) -> None:
    """fp32 weights and their fp16 variant, written with safetensors (the variant costs one cast)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(folder / name), metadata={"format": "pt"})
    save_file({k: v.half() for k, v in state.items()}, str(folder / fp16_name), metadata={"format": "pt"})


def build(out: Path) -> None:
    """Write the folder into ``out`` (random weights from :data:`SEED`)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from caspec.models.tiny import write_clip_vocab

    def configs(cfg: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in cfg.items() if not k.startswith("_")}

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        unet = UNet2DConditionModel(**configs(UNET))
        _save_weights(unet, out / "unet", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
        _json(out / "unet" / "config.json", UNET)
        del unet
        torch.manual_seed(SEED + 1)
        vae = AutoencoderKL(**configs(VAE))
        _save_weights(vae, out / "vae", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
        _json(out / "vae" / "config.json", VAE)
        del vae
        torch.manual_seed(SEED + 2)
        te = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in TEXT_ENCODER.items() if k != "architectures"}))
        _save_weights(te, out / "text_encoder", "model.safetensors", "model.fp16.safetensors")
        _json(out / "text_encoder" / "config.json", TEXT_ENCODER)
        del te
    write_clip_vocab(out / "tokenizer")
    _json(out / "tokenizer" / "tokenizer_config.json", TOKENIZER_CONFIG)
    _json(out / "tokenizer" / "special_tokens_map.json", SPECIAL_TOKENS)
    _json(out / "scheduler" / "scheduler_config.json", SCHEDULER)
    _json(out / "model_index.json", MODEL_INDEX)
    _json(out / "feature_extractor" / "preprocessor_config.json", FEATURE_EXTRACTOR)
    _json(out / "safety_checker" / "config.json", SAFETY_CHECKER)
    for rel in DUMMIES:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(b"dummy: caspec must not load " + rel.encode())
    (out / COMPLETE).write_text(json.dumps(recipe(), sort_keys=True), encoding="utf-8")


def _is_complete(folder: Path) -> bool:
    try:
        return json.loads((folder / COMPLETE).read_text(encoding="utf-8")) == json.loads(json.dumps(recipe()))
    except (OSError, ValueError):
        return False


def ensure_sd15() -> Path:
    """The folder for the current recipe, built once (locked, atomic)."""
    from caspec.models.tiny import build_atomically

    return build_atomically(cache_dir() / f"sd15-{recipe_digest()}", _is_complete, build)


# what a real SD 1.5 LoRA adapts, derived from the architecture (not from caspec's exporter)
def transformer_blocks() -> list[str]:
    """Module paths of SD 1.5's 16 transformer blocks: down 2+2+2, mid 1, up 3+3+3."""
    down = [f"down_blocks.{b}.attentions.{a}" for b in range(3) for a in range(2)]
    mid = ["mid_block.attentions.0"]
    up = [f"up_blocks.{b}.attentions.{a}" for b in range(1, 4) for a in range(3)]
    return [f"{p}.transformer_blocks.0" for p in down + mid + up]


def kohya_module_names() -> set[str]:
    unet = {f"lora_unet_{block}.{attn}.{proj}".replace(".", "_") for block in transformer_blocks()
            for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0")}
    te = {f"lora_te_text_model_encoder_layers_{i}_self_attn_{p}_proj" for i in range(12) for p in "qkv"}
    te |= {f"lora_te_text_model_encoder_layers_{i}_self_attn_out_proj" for i in range(12)}
    return unet | te
