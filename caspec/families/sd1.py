"""The SD 1.x family: ``StableDiffusionPipeline`` with one CLIP ViT-L-shaped text encoder (width 768 on real models).

Prompts condition with the text encoder's last hidden state; kohya names are ``lora_unet_<diffusers path>`` and
``lora_te_text_model_<path>``; embedding files hold one ``[n, d]`` tensor. The family claims every
Stable-Diffusion folder that no other family claims (a folder missing ``unet/`` is reported by the loader).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from .base import UNetFamily


class SD1Family(UNetFamily):
    name = "sd1"
    title = "SD 1.x"
    kohya_base_version = "sd_v1"

    def claims(self, folder: Path, index: Mapping[str, Any]) -> bool:
        return True

    def claims_embedding(self, widths: Mapping[str, int]) -> bool:
        return set(widths) == {"text_encoder"}


SD1 = SD1Family()

__all__ = ["SD1", "SD1Family"]
