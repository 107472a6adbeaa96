"""Model families: which Stable Diffusion layout a model folder has (SD 1.x, SD 2.x or SDXL), read from its configs.

The family decides what the text side looks like (one CLIP text encoder, or SDXL's two), how prompts
condition the UNet (SDXL adds pooled text embeddings and time ids), and how assets are named in other
tools' formats (kohya's ``lora_te_`` vs ``lora_te1_``/``lora_te2_``, ``clip_l``/``clip_g`` embeddings).

* ``sd1``: ``StableDiffusionPipeline`` with a CLIP ViT-L-shaped text encoder (width 768 on real models);
* ``sd2``: the same pipeline with an OpenCLIP ViT-H-shaped text encoder (width 1024), often v-prediction;
* ``sdxl``: ``StableDiffusionXLPipeline``: ``text_encoder`` (CLIP ViT-L) and ``text_encoder_2``
  (OpenCLIP ViT-bigG, with a projection), a UNet with the ``text_time`` added embedding.

Pure (reads JSON configs, imports no torch), so planning can use it. Layouts caspec does not run (SD 3,
Flux, the SDXL refiner, pixel-space or non-UNet models) are refused with a :class:`ModelError` saying so.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ModelError

FAMILIES = ("sd1", "sd2", "sdxl")
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
TEXT_ENCODERS = {"sd1": ("text_encoder",), "sd2": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2")}
"""The text-encoder components of each family, in the order their hidden states are concatenated."""
TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
SDXL_EMBEDDING_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
"""How SDXL embedding files (diffusers' pivotal tuning, A1111, ComfyUI) name each text encoder's vectors."""
SD2_TEXT_WIDTH = 1024
SUPPORTED = "SD 1.x, SD 2.x and SDXL base models (diffusers layout: unet/, vae/, text_encoder/, tokenizer/)"


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def folder_family(folder: Path) -> str:
    """The family of a diffusers model folder (``sd1``, ``sd2``, ``sdxl``), or a :class:`ModelError`."""
    folder = Path(folder)
    index = _json(folder / "model_index.json")
    cls = str(index.get("_class_name", ""))
    tiny = _json(folder / "caspec-tiny.json")
    if tiny.get("family") in FAMILIES:
        return str(tiny["family"])
    if (folder / "transformer").is_dir() or "StableDiffusion3" in cls or "Flux" in cls:
        raise ModelError(f"{folder} holds a {cls or 'transformer-based'} model (a `transformer/`, not a `unet/`): "
                         f"caspec runs {SUPPORTED}",
                         hint="use an SD 1.x, SD 2.x or SDXL base model")
    if "Refiner" in cls or (index.get("requires_aesthetics_score") is True):
        raise ModelError(f"{folder} is an SDXL refiner ({cls}): caspec trains and samples with base models",
                         hint="use the SDXL base model (e.g. stabilityai/stable-diffusion-xl-base-1.0)")
    has_te2 = (folder / "text_encoder_2").is_dir() or "text_encoder_2" in index
    has_te = (folder / "text_encoder").is_dir()
    if has_te2 and not has_te:
        raise ModelError(f"{folder} has `text_encoder_2/` but no `text_encoder/` (an SDXL refiner layout)",
                         hint="use the SDXL base model, which has both text encoders")
    # a folder missing `unet/` is reported by the loader, which names the part it cannot load
    if has_te2 or "XL" in cls:
        return "sdxl"
    width = _json(folder / "text_encoder" / "config.json").get("hidden_size")
    cross = _json(folder / "unet" / "config.json").get("cross_attention_dim")
    if width == SD2_TEXT_WIDTH or cross == SD2_TEXT_WIDTH:
        return "sd2"
    return "sd1"


def embedded_family(name: str) -> str:
    """The family of an embedded model (``tiny``, ``toy``, ``tiny-xl``, ``tiny-v``)."""
    from .tiny import TINY_MODELS

    return TINY_MODELS[name].family if name in TINY_MODELS else "sd1"


def describe(family: str | None) -> str:
    return FAMILY_NAMES.get(family or "", str(family or "unknown"))


__all__ = ["FAMILIES", "FAMILY_NAMES", "TEXT_ENCODERS", "TOKENIZER_OF", "SDXL_EMBEDDING_KEYS", "folder_family",
           "embedded_family", "describe"]
