"""The SD 2.x family: SD 1.x's pipeline with an OpenCLIP ViT-H-shaped text encoder (width 1024), often v-prediction.

v-prediction needs nothing here: DDIM sampling and the training target read ``prediction_type`` from the
model's scheduler config. What differs from SD 1.x is how a folder and a header-less embedding are recognised
(the text width) and kohya's ``ss_base_model_version``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from .base import UNetFamily, read_json

TEXT_WIDTH = 1024


class SD2Family(UNetFamily):
    name = "sd2"
    title = "SD 2.x"
    kohya_base_version = "sd_v2"

    def claims(self, folder: Path, index: Mapping[str, Any]) -> bool:
        width = read_json(folder / "text_encoder" / "config.json").get("hidden_size")
        cross = read_json(folder / "unet" / "config.json").get("cross_attention_dim")
        return TEXT_WIDTH in (width, cross)

    def claims_embedding(self, widths: Mapping[str, int]) -> bool:
        return dict(widths) == {"text_encoder": TEXT_WIDTH}


SD2 = SD2Family()

__all__ = ["SD2", "SD2Family", "TEXT_WIDTH"]
