"""The embedded model ``toy``: a small Stable-Diffusion-shaped pipeline *trained* on the shapes world.

Unlike ``tiny`` (random weights), ``toy`` draws what its prompts say: "a red star at the left".  Its
weights were trained by ``caspec toyworld train`` (:mod:`caspec.toyworld.train`) and ship inside the
package as safetensors (``caspec/toyworld/weights``); the configs below describe the architecture.
``ensure_toy()`` assembles an ordinary diffusers folder from them in the user cache (the tokenizer is
CLIP's real BPE vocabulary from open_clip), so ``toy`` loads through the same code path as any local
model.  ``toy_identity()`` is pure and hashes the shipped weight files: retraining changes every key.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from ..store.hashing import sha256_file
from .tiny import TOKENIZER_MAX_LENGTH, build_atomically, cache_root, package_version, write_clip_vocab

TOY_VERSION = 1
TOY_RESOLUTION = 32
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "toyworld" / "weights"
IDENTITY_FILE = "caspec-toy.json"
COMPONENTS = ("unet", "vae", "text_encoder")

UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [64, 128],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
    "norm_num_groups": 16,
}
VAE_CONFIG: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "layers_per_block": 1,
    "norm_num_groups": 16,
    "scaling_factor": 1.0,  # replaced by the measured 1/std of the training latents (see train.py)
}
TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
    "hidden_act": "quick_gelu",
}
# The noise schedule: cosine, with every signal-to-noise ratio multiplied by SNR_SHIFT (a log-SNR shift, as
# "simple diffusion" does for resolution).  An 8x8 latent has far fewer numbers per object than SD's 64x64
# one, so at SD's schedule the noise at SDEdit strength 0.86 would erase where and what the object is;
# shifted, strength 0.86 keeps the layout (SNR about 0.8) while the terminal SNR stays near zero.
SCHEDULE: dict[str, Any] = {"kind": "cosine", "snr_shift": 16.0, "num_train_timesteps": 1000, "max_beta": 0.999}
SCHEDULER_BASE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def toy_betas() -> list[float]:
    """Betas of the shifted cosine schedule: alpha_bar(t) = sigmoid(log SNR_cos(t) + log shift)."""
    n, shift, max_beta = SCHEDULE["num_train_timesteps"], SCHEDULE["snr_shift"], SCHEDULE["max_beta"]

    def alpha_bar(i: int) -> float:  # i in 0..n; alpha_bar(0) = 1
        if i == 0:
            return 1.0
        if i == n:
            return 0.0
        t = i / n
        snr = shift / math.tan(math.pi * t / 2) ** 2
        return snr / (1.0 + snr)

    return [round(min(max_beta, 1.0 - alpha_bar(i + 1) / alpha_bar(i)), 12) for i in range(n)]


def scheduler_config() -> dict[str, Any]:
    """The diffusers DDIMScheduler config (``trained_betas`` carry the schedule)."""
    return {**SCHEDULER_BASE, "beta_schedule": "linear", "trained_betas": toy_betas()}


WEIGHT_FILES = {name: f"{name}.safetensors" for name in COMPONENTS}
META_FILE = "toy.json"  # written by training: the VAE scaling factor, seeds, steps, final losses


def weights_present(folder: Path = WEIGHTS_DIR) -> bool:
    return all((folder / f).is_file() for f in WEIGHT_FILES.values()) and (folder / META_FILE).is_file()


def toy_meta(folder: Path = WEIGHTS_DIR) -> dict[str, Any]:
    return json.loads((folder / META_FILE).read_text(encoding="utf-8"))


def vae_config(meta: dict[str, Any]) -> dict[str, Any]:
    return {**VAE_CONFIG, "scaling_factor": float(meta["vae_scaling_factor"])}


def toy_identity(folder: Path = WEIGHTS_DIR) -> dict[str, Any]:
    """What enters cache keys for ``toy``: configs and the sha256 of every shipped weight file."""
    if not weights_present(folder):
        from ..errors import ModelError

        raise ModelError(f"the `toy` model's weights are missing from {folder}",
                         hint="reinstall caspec, or train them with `caspec toyworld train`")
    return {
        "toy_version": TOY_VERSION,
        "resolution": TOY_RESOLUTION,
        "unet": UNET_CONFIG,
        "vae": vae_config(toy_meta(folder)),
        "text_encoder": TEXT_CONFIG,
        "scheduler": {"class": "DDIMScheduler", **SCHEDULER_BASE, "schedule": SCHEDULE},
        "tokenizer": {"bpe": "open_clip default_bpe", "model_max_length": TOKENIZER_MAX_LENGTH},
        "weights": {name: sha256_file(folder / f) for name, f in sorted(WEIGHT_FILES.items())},
        "diffusers": package_version("diffusers"),
        "transformers": package_version("transformers"),
    }


def toy_dir(identity: dict[str, Any]) -> Path:
    short = identity["weights"]["unet"][:12]
    return cache_root() / "models" / f"toy-v{TOY_VERSION}-{short}"


def _is_complete(folder: Path, identity: dict[str, Any]) -> bool:
    try:
        stored = json.loads((folder / IDENTITY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return stored == json.loads(json.dumps(identity)) and (folder / "model_index.json").is_file()


def ensure_toy() -> Path:
    """Assemble the toy diffusers folder in the user cache once (see ``build_atomically``); return it."""
    identity = toy_identity()

    def build(tmp: Path) -> None:
        build_toy_folder(tmp, WEIGHTS_DIR)
        (tmp / IDENTITY_FILE).write_text(json.dumps(identity, indent=1, sort_keys=True), encoding="utf-8")

    return build_atomically(toy_dir(identity), lambda folder: _is_complete(folder, identity), build)


def build_toy_folder(out: Path, weights: Path) -> None:
    """Write a diffusers ``save_pretrained``-style folder for the toy model from the weight files."""
    from diffusers import DDIMScheduler
    from transformers import CLIPTokenizer

    meta = toy_meta(weights)
    out.mkdir(parents=True, exist_ok=True)
    configs = {
        "unet": ("diffusion_pytorch_model.safetensors",
                 {"_class_name": "UNet2DConditionModel", **UNET_CONFIG}),
        "vae": ("diffusion_pytorch_model.safetensors", {"_class_name": "AutoencoderKL", **vae_config(meta)}),
        "text_encoder": ("model.safetensors",
                         {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **TEXT_CONFIG}),
    }
    for name, (fname, cfg) in configs.items():
        sub = out / name
        sub.mkdir()
        (sub / "config.json").write_text(json.dumps(cfg, indent=1, sort_keys=True), encoding="utf-8")
        shutil.copyfile(weights / WEIGHT_FILES[name], sub / fname)
    DDIMScheduler(**scheduler_config()).save_pretrained(out / "scheduler")
    write_clip_vocab(out / "tokenizer")
    tok = CLIPTokenizer(str(out / "tokenizer" / "vocab.json"), str(out / "tokenizer" / "merges.txt"),
                        model_max_length=TOKENIZER_MAX_LENGTH)
    tok.save_pretrained(out / "tokenizer")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=1, sort_keys=True), encoding="utf-8")


__all__ = ["TOY_VERSION", "TOY_RESOLUTION", "WEIGHTS_DIR", "UNET_CONFIG", "VAE_CONFIG", "TEXT_CONFIG",
           "SCHEDULE", "scheduler_config", "weights_present", "toy_identity", "ensure_toy", "build_toy_folder"]
