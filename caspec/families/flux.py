"""The FLUX.1 family: a flow-matching ``FluxTransformer2DModel``, CLIP-L (pooled) and T5 (sequence), a 16-channel VAE.

:data:`FLUX` (a :class:`~caspec.families.base.Family`) covers FLUX.1-dev, FLUX.1-schnell, FLUX.1 Kontext and
fine-tunes with their layout (``FluxPipeline`` folders: ``transformer/``, ``text_encoder/`` CLIP-L,
``text_encoder_2/`` T5, ``vae/``, ``scheduler/`` ``FlowMatchEulerDiscreteScheduler``). What differs from SD:

* **prompts**: CLIP-L gives only its pooled output (``pooled_projections``), T5 the whole token sequence
  (``encoder_hidden_states``), as ``FluxPipeline.encode_prompt``; a pseudo-word gets rows in both;
* **sampling**: flow-matching Euler over shifted sigmas with dev's distilled ``guidance`` embedding
  (:mod:`caspec.models.flow_sampling`, bit-equal to diffusers' Flux pipelines);
* **training** (:class:`FlowSchedule`): ``z_t = (1 - σ) z0 + σ ε``, target ``ε - z0``, timesteps drawn uniformly
  from the scheduler's 1000 training timesteps (``weighting_scheme=none``) and dev's guidance 3.5, as
  diffusers' ``train_dreambooth_lora_flux.py`` trains;
* **LoRA**: diffusers' default Flux transformer targets and CLIP-L's attention; T5 gets no LoRA (diffusers'
  ``FluxLoraLoaderMixin`` cannot load one);
* **names**: embedding files key ``clip_l`` / ``t5``; kohya/ComfyUI LoRA names fuse q/k/v
  (:mod:`caspec.families.flux_names`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .base import Family, read_json

FLUX_PIPELINES = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxKontextPipeline", "FluxInpaintPipeline")
TRANSFORMER_CLASS = "FluxTransformer2DModel"
TRAIN_GUIDANCE = 3.5  # diffusers' Flux LoRA scripts' --guidance_scale default (dev's guidance embedding)
DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline's default_sample_size, in latent pixels (x 8 = 1024 px)
TRANSFORMER_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                       "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                       "ff_context.net.2")
"""diffusers' default Flux transformer LoRA targets (``train_dreambooth_lora_flux_advanced.py``)."""
T5_TARGETS = ("q", "k", "v", "o")  # T5's attention projections (``t5_lora``)


class FlowSchedule:
    """Flow-matching training noise: ``z_t = (1 - σ) z0 + σ ε`` and the target ``ε - z0``.

    Timesteps are drawn from the scheduler's training timesteps (1000, unshifted for dev's dynamic shifting):
    ``uniform`` as diffusers' scripts with ``weighting_scheme=none``, or ``cubic`` (index ``u³ T``: more
    high-noise steps, the same preference as the UNet families' ``t = (1 - u³) T``)."""

    def __init__(self, scheduler_config: Any) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.sched = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self.num_train_timesteps = int(self.sched.config.num_train_timesteps)

    def timesteps(self, n: int, g: Any, sampling: str) -> Any:
        import torch

        u = torch.rand(n, generator=g)
        if sampling != "uniform":
            u = u ** 3
        index = (u * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        return self.sched.timesteps[index]

    def sigmas(self, t: Any, ndim: int) -> Any:
        """The σ of each timestep in ``t`` (looked up, as diffusers' ``get_sigmas``), shaped to broadcast."""
        schedule = self.sched.timesteps.to(t.device)
        index = [int((schedule == x).nonzero()[0]) for x in t]
        sigma = self.sched.sigmas.to(t.device)[index].flatten()
        return sigma.reshape(-1, *([1] * (ndim - 1)))

    def at(self, t_over_T: float, n: int) -> Any:
        """``n`` copies of the training timestep nearest noise level ``t_over_T``."""
        index = int((self.sched.timesteps - t_over_T * self.num_train_timesteps).abs().argmin())
        return self.sched.timesteps[index].repeat(n)

    def clean(self, z_t: Any, pred: Any, t: Any) -> Any:
        """The clean latent a velocity implies: ``z0 = z_t - σ v``."""
        return z_t - self.sigmas(t, z_t.ndim).to(z_t.dtype) * pred

    def noisy(self, z0: Any, noise: Any, t: Any) -> tuple[Any, Any]:
        sigma = self.sigmas(t, z0.ndim).to(z0.dtype)
        return (1.0 - sigma) * z0 + sigma * noise, noise - z0

    def loss_weights(self, t: Any, min_snr_gamma: float | None) -> Any:
        if min_snr_gamma is not None:
            raise ValueError("min_snr_gamma weights ε/v-prediction losses; FLUX.1 trains with flow matching: "
                             "leave it unset")
        return None


class FluxFamily(Family):
    name = "flux"
    title = "FLUX.1"
    denoiser = "transformer"
    text_encoders = ("text_encoder", "text_encoder_2")
    weights = (("text_encoder", "transformers"), ("text_encoder_2", "transformers"), ("transformer", "diffusers"),
               ("vae", "diffusers"))
    embedding_keys = {"text_encoder": "clip_l", "text_encoder_2": "t5"}
    default_targets = {"unet": TRANSFORMER_TARGETS, "text": ("q_proj", "k_proj", "v_proj", "out_proj")}
    kohya_prefix = {"transformer": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te3_"}
    kohya_base_version = "flux1"
    sampling_defaults = {"steps": 28, "guidance_scale": 3.5, "scheduler": "flow-euler"}  # FluxPipeline's defaults
    peft_names_in_diffusers_files = True
    diffusers_lora_components = ("text_encoder", "transformer")  # FluxLoraLoaderMixin has no T5 LoRA

    # ------------------------------------------------------------------ components

    def lora_targets(self, component: str, cfg: Any) -> tuple[str, ...]:
        """T5's attention projections (``q``, ``k``, ``v``, ``o``) with ``t5_lora``; else as every family."""
        return T5_TARGETS if component == "text_encoder_2" else super().lora_targets(component, cfg)

    def trained_components(self, cfg: Any = None) -> tuple[str, ...]:
        """CLIP-L and the transformer; T5 too with ``t5_lora`` (off by default, as diffusers' Flux scripts)."""
        return self.lora_components if getattr(cfg, "t5_lora", False) else ("text_encoder", "transformer")

    def claims(self, folder: Path, index: Mapping[str, Any]) -> bool:
        cls = str(index.get("_class_name", ""))
        transformer = read_json(folder / "transformer" / "config.json").get("_class_name")
        return cls in FLUX_PIPELINES or transformer == TRANSFORMER_CLASS

    def load_parts(self, folder: Path, dtype: Any, part: Callable[[str], None]) -> dict[str, Any]:
        import torch
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

        from ..models.load import weight_variant

        out: dict[str, Any] = {}
        part("tokenizer")
        out["tokenizer"] = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
        part("text_encoder")
        out["text_encoder"] = CLIPTextModel.from_pretrained(
            folder / "text_encoder", local_files_only=True, dtype=dtype, variant=weight_variant(folder / "text_encoder"))
        part("tokenizer_2")
        out["tokenizer_2"] = AutoTokenizer.from_pretrained(folder / "tokenizer_2", local_files_only=True)
        part("text_encoder_2")
        out["text_encoder_2"] = T5EncoderModel.from_pretrained(
            folder / "text_encoder_2", local_files_only=True, dtype=dtype,
            variant=weight_variant(folder / "text_encoder_2"))
        part("transformer")
        out["transformer"] = FluxTransformer2DModel.from_pretrained(
            folder, subfolder="transformer", local_files_only=True, torch_dtype=dtype,
            variant=weight_variant(folder / "transformer"))
        part("vae")
        out["vae"] = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True,
                                                   torch_dtype=torch.float32, variant=weight_variant(folder / "vae"))
        part("scheduler")
        out["scheduler"] = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler",
                                                                           local_files_only=True)
        return out

    def native_resolution(self, folder: Path) -> int:
        from .. import families

        declared = read_json(folder / families.TINY_FILE).get("resolution")
        if declared:
            return int(declared)
        vae = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
        return DEFAULT_SAMPLE_SIZE * 2 ** (len(vae["block_out_channels"]) - 1)

    # ------------------------------------------------------------------ prompts

    def encode(self, pipe: Any, ids: Sequence[tuple[Any, Any]]) -> Any:
        """CLIP-L's pooled output and T5's last hidden state, as ``FluxPipeline.encode_prompt``."""
        from ..models.text import TextCond

        (clip_ids, _), (t5_ids, _) = ids
        pooled = pipe.text_encoder(clip_ids.to(pipe.device), output_hidden_states=False).pooler_output
        pooled = pooled.to(dtype=pipe.text_encoder.dtype, device=pipe.device)
        embeds = pipe.text_encoder_2(t5_ids.to(pipe.device), output_hidden_states=False)[0]
        return TextCond(embeds.to(dtype=pipe.text_encoder_2.dtype, device=pipe.device), pooled)

    # ------------------------------------------------------------------ sampling

    @property
    def sampler(self) -> Any:
        from ..models import flow_sampling

        return flow_sampling

    def step_sigmas(self, configs: Mapping[str, Any], steps: int, resolution: int) -> list[float]:
        from .noise import flow_step_sigmas

        vae_scale = 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
        return flow_step_sigmas(configs["scheduler"], steps, (resolution // vae_scale // 2) ** 2)

    def strength_start(self, steps: int, strength: float) -> int:
        return int(max(steps - min(steps * strength, steps), 0))

    def txt2img(self, pipe: Any, prompts: Sequence[str], seeds: Sequence[int], **settings: Any) -> list[Any]:
        return self.sampler.txt2img(pipe, prompts, seeds, **_flux_settings(settings))

    def sdedit(self, pipe: Any, images: Sequence[Any], prompts: Sequence[str], seeds: Sequence[int], *,
               start: int, **settings: Any) -> list[Any]:
        return self.sampler.sdedit(pipe, images, prompts, seeds, start=start, **_flux_settings(settings))

    def instruct(self, pipe: Any, images: Sequence[Any], instructions: Sequence[str], seeds: Sequence[int],
                 **settings: Any) -> list[Any]:
        """Instruction edits as ``FluxKontextPipeline`` (a Kontext model)."""
        # the reference is fitted to the output size (FluxKontextPipeline's `_auto_resize=False` with max_area = size²)
        return self.sampler.instruct_edit(pipe, images, instructions, seeds, auto_resize=False,
                                          **_flux_settings(settings))

    # ------------------------------------------------------------------ training

    def training_schedule(self, pipe: Any) -> FlowSchedule:
        return FlowSchedule(pipe.scheduler.config)

    def predict(self, pipe: Any, z_t: Any, t: Any, cond: Any, resolution: int) -> Any:
        """The transformer's velocity for unpacked latents ``z_t`` (packed in, unpacked out), as diffusers'
        Flux LoRA scripts call it (``timestep / 1000``, guidance 3.5 where the model embeds guidance)."""
        import torch

        from ..models.flow_sampling import image_ids, pack_latents, unpack_latents

        transformer = pipe.transformer
        n, side = z_t.shape[0], z_t.shape[-1]
        dtype = pipe.dtype
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full([n], TRAIN_GUIDANCE, device=pipe.device, dtype=torch.float32)
        txt_ids = torch.zeros(cond.embeds.shape[1], 3, device=pipe.device, dtype=dtype)
        out = transformer(hidden_states=pack_latents(z_t.to(dtype)), timestep=(t / 1000).to(dtype), guidance=guidance,
                          pooled_projections=cond.pooled, encoder_hidden_states=cond.embeds, txt_ids=txt_ids,
                          img_ids=image_ids(side, pipe.device, dtype), return_dict=False)[0]
        return unpack_latents(out, side)

    # ------------------------------------------------------------------ names

    def kohya_name(self, component: str, module: str, layout: Mapping[str, Any] | None = None) -> str:
        from .flux_names import kohya_flux_name

        return kohya_flux_name(component, module)

    def kohya_lora(self, layers: Mapping[str, Mapping[str, tuple[Any, Any]]], rank: int, alpha: float,
                   layout: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
        """kohya's fused FLUX.1 names (q/k/v into ``qkv`` / ``linear1``, each delta kept: :mod:`.flux_names`)."""
        from .flux_names import kohya_flux_lora

        return kohya_flux_lora(layers, rank, alpha)

    def kohya_header(self, rank: int, alpha: float) -> dict[str, str]:
        from .flux_names import kohya_flux_header

        header = kohya_flux_header(rank, alpha, {})
        header.pop("modules", None)
        return header

    def lora_layers(self, tensors: Mapping[str, Any], default_alpha: Mapping[str, float]) -> list[Any]:
        """Every FLUX.1 naming style in circulation (kohya, ComfyUI, diffusers / ai-toolkit, OneTrainer)."""
        from .flux_names import flux_lora_layers

        return [(x.component, x.module, x.A, x.B, x.alpha)
                for x in flux_lora_layers(tensors, default_alpha=dict(default_alpha) or None)]

    def lora_saver(self) -> Any:
        from diffusers.loaders import FluxLoraLoaderMixin

        return FluxLoraLoaderMixin

    @property
    def embedding_file_keys(self) -> dict[str, str]:
        return {**super().embedding_file_keys, "t5xxl": "text_encoder_2"}

    def claims_lora_names(self, names: Sequence[str]) -> bool:
        from .flux_names import detect_flux_lora

        return detect_flux_lora(names)


def _flux_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """caspec's sampling settings in the Flux sampler's terms: ``guidance_scale`` is dev's distilled guidance;
    a negative prompt is used through true CFG (``true_cfg_scale`` > 1), as the Flux pipelines do."""
    out = dict(settings)
    out["guidance"] = out.pop("guidance_scale", None)
    negative = out.pop("negative_prompt", None)
    true_cfg = out.pop("true_cfg_scale", None)
    out["true_cfg_scale"] = float(true_cfg) if true_cfg is not None else 1.0
    out["negative_prompt"] = negative if negative else None
    return out


FLUX = FluxFamily()

__all__ = ["FLUX", "FluxFamily", "FlowSchedule", "TRANSFORMER_TARGETS", "TRAIN_GUIDANCE"]
