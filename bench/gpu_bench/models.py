"""The GPU benchmark's models: the size presets (SD1.5-shaped, or caspec's tiny configs) and the
random-weight modules built from them, with a fresh device copy for every measured run.

Models are built with random weights (FLOPs and timings do not depend on weight values), so nothing is
downloaded. The tokenizer is CLIP's real BPE, built as :mod:`caspec.models.tiny` builds it
(``clip_vocab()``). The models are built once (pristine copies kept on the CPU in fp32) and every measured
run gets its own fresh copies on the device, so runs never see each other's added tokens or LoRA adapters
and a run's peak memory counts exactly the modules it uses.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class Preset:
    """Model configs and defaults of one size."""

    name: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text: dict[str, Any]
    resolution: int
    e2e_phase1_steps: int
    e2e_phase2_steps: int
    clip_model: str
    matmul_n: int


def _presets() -> dict[str, Preset]:
    from caspec.models.tiny import TEXT_CONFIG, UNET_CONFIG, VAE_CONFIG

    sd15_text = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                 "projection_dim": 768, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}
    sd15_vae = {"in_channels": 3, "out_channels": 3, "latent_channels": 4,
                "block_out_channels": [128, 256, 512, 512],
                "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
                "layers_per_block": 2, "act_fn": "silu", "norm_num_groups": 32, "sample_size": 512,
                "scaling_factor": 0.18215}
    return {
        # UNet2DConditionModel() defaults are SD1.5's UNet except cross_attention_dim (1280 -> 768) and sample_size
        "sd15": Preset("sd15", {"sample_size": 64, "cross_attention_dim": 768}, sd15_vae, sd15_text, 512,
                       1000, 1000, "ViT-B-32", 8192),
        "tiny": Preset("tiny", {**UNET_CONFIG, "sample_size": 16}, {**VAE_CONFIG, "sample_size": 32},
                       dict(TEXT_CONFIG), 32, 4, 4, "caspec-tiny-clip", 256),
    }


PRESET_NAMES = ("sd15", "tiny")


def preset(name: str) -> Preset:
    presets = _presets()
    if name not in presets:
        raise ValueError(f"unknown size {name!r}: one of {', '.join(presets)}")
    return presets[name]


def torch_dtype(name: str) -> Any:
    """The torch dtype of ``fp32`` / ``fp16`` / ``bf16``."""
    import torch

    return getattr(torch, DTYPES[name])


class Models:
    """Random-weight models of one preset: pristine fp32 copies on the CPU, fresh device copies on demand."""

    def __init__(self, p: Preset, device: str, dtype: str, seed: int = 0) -> None:
        import torch
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        from caspec.models import quiet_libraries
        from caspec.models.tiny import SCHEDULER_CONFIG, clip_vocab

        quiet_libraries()
        self.preset = p
        self.device = torch.device(device)
        self.dtype = torch_dtype(dtype)
        self.resolution = p.resolution
        self.seed = seed
        t0 = time.perf_counter()
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                if self.device.type == "cuda":
                    torch.cuda.manual_seed_all(seed)
                with self.device:  # initialise on the device (fast), keep the pristine copy on the CPU
                    built = {"unet": UNet2DConditionModel(**p.unet), "vae": AutoencoderKL(**p.vae),
                             "text_encoder": CLIPTextModel(CLIPTextConfig(**p.text))}
        finally:
            torch.set_default_dtype(prev)
        self._cpu = {name: m.to("cpu").eval().requires_grad_(False) for name, m in built.items()}
        del built
        self.scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
        self._vocab, self._merges = clip_vocab()
        self.params = {name: sum(t.numel() for t in m.parameters()) for name, m in self._cpu.items()}
        self.build_s = time.perf_counter() - t0

    def tokenizer(self) -> Any:
        """A fresh CLIP tokenizer (training adds tokens to it)."""
        from transformers import CLIPTokenizer

        return CLIPTokenizer(vocab=dict(self._vocab), merges=list(self._merges), model_max_length=77)

    def module(self, name: str, dtype: Any = None) -> Any:
        """A fresh copy of ``name`` on the device in ``dtype`` (default: the benchmark dtype), eval mode."""
        import torch

        src = self._cpu[name]
        dtype = self.dtype if dtype is None else dtype
        memo: dict[int, Any] = {}
        for t in list(src.parameters()) + list(src.buffers()):
            new = t.detach().to(device=self.device, dtype=dtype if t.is_floating_point() else t.dtype, copy=True)
            memo[id(t)] = torch.nn.Parameter(new, requires_grad=False) if isinstance(t, torch.nn.Parameter) else new
        return copy.deepcopy(src, memo).eval()

    def pipe(self) -> Any:
        """A caspec :class:`~caspec.models.load.Pipe` of fresh copies (UNet and text encoder in the benchmark
        dtype, VAE in fp32, as caspec loads models)."""
        import torch

        from caspec.models.load import Pipe

        return Pipe(tokenizer=self.tokenizer(), text_encoder=self.module("text_encoder"), unet=self.module("unet"),
                    vae=self.module("vae", torch.float32), scheduler=self.scheduler, device=self.device,
                    dtype=self.dtype, resolution=self.resolution,
                    identity={"kind": "bench", "preset": self.preset.name, "seed": self.seed})
