"""The interface every model family implements, and what the UNet families (SD 1.x, SD 2.x, SDXL) share.

A :class:`Family` knows everything about a model layout that the rest of caspec must not guess:

* its components and how a folder of them is recognised (:meth:`Family.claims`) and loaded
  (:meth:`Family.load_parts`), and which files of a folder decide its identity (:attr:`Family.weights`);
* prompt encoding (:meth:`Family.encode`, :meth:`Family.added_cond`) for sampling and training alike;
* the noise schedule and the training target (:meth:`Family.training_schedule`, :meth:`Family.predict`);
* the default LoRA targets (:attr:`Family.default_targets`);
* export and import key naming (:attr:`Family.embedding_keys`, :meth:`Family.kohya_name`,
  :meth:`Family.lora_saver`, :meth:`Family.kohya_modules`, :attr:`Family.kohya_base_version`).

Code elsewhere asks the family (``caspec.families.get(name)``); it never tests a family's name.
This module imports no torch at import time: planning reads families too.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

TEXT_MODEL = "text_model."  # CLIPTextModel's inner module (flattened away by recent transformers)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object read from ``path``, or ``{}`` when it is missing or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def config_value(cfg: Any, key: str, default: Any = KeyError, *, what: str = "model config") -> Any:
    """A value from a config given as a mapping (a parsed ``config.json``) or an attribute namespace
    (``unet.config``); ``ValueError`` naming ``what`` when it is missing and no default is given."""
    if isinstance(cfg, Mapping):
        if key in cfg:
            return cfg[key]
    elif hasattr(cfg, key):
        return getattr(cfg, key)
    if default is KeyError:
        raise ValueError(f"{what} has no {key!r}")
    return default


def with_text_model(module: str) -> str:
    """A CLIP text-encoder module path with its ``text_model.`` prefix (the layout other tools expect)."""
    return module if module.startswith(TEXT_MODEL) else TEXT_MODEL + module


@functools.lru_cache(maxsize=1)
def clip_has_text_model() -> bool:
    """Whether this transformers' ``CLIPTextModel`` nests its layers under ``text_model`` (transformers < 5 does)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                             bos_token_id=0, eos_token_id=1, pad_token_id=1, num_attention_heads=1,
                                             max_position_embeddings=4, projection_dim=8))
    return any(n == "text_model" for n, _ in model.named_children())


@functools.lru_cache(maxsize=8)
def files_tokenizer(folder: Path, clip: bool = True) -> Any:
    """The tokenizer saved in ``folder`` (a model's ``tokenizer/``), read once per process: CLIP's as the
    families load it, or (``clip=False``) whatever ``AutoTokenizer`` reads there (T5's)."""
    from transformers import AutoTokenizer, CLIPTokenizer

    return (CLIPTokenizer if clip else AutoTokenizer).from_pretrained(folder, local_files_only=True)


def text_positions(folder: Path, encoder: str, tokenizer: str) -> int:
    """Positions ``encoder`` reads (the smaller of its config's and its tokenizer's), from files only."""
    sizes = [int(files_tokenizer(folder / tokenizer).model_max_length)]
    limit = read_json(folder / encoder / "config.json").get("max_position_embeddings")
    if limit:
        sizes.append(int(limit))
    return min(sizes)


class Family:
    """One model family. Subclasses set the attributes and override what differs."""

    name: str = ""
    title: str = ""
    denoiser: str = "unet"
    """The pipeline component that denoises (``unet``, or ``transformer`` for DiT models)."""
    text_encoders: tuple[str, ...] = ("text_encoder",)
    """Text-encoder components, in the order their outputs are used (concatenated, for SDXL)."""
    tokenizers: Mapping[str, str] = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
    weights: tuple[tuple[str, str], ...] = (("text_encoder", "transformers"), ("unet", "diffusers"),
                                            ("vae", "diffusers"))
    """``(component, library)`` whose weight files a folder's identity hashes (the library picks the file rules)."""
    embedding_keys: Mapping[str, str] | None = None
    """Per text encoder, the key of its vectors in other tools' embedding files (``clip_l``, ...), or None
    when a file holds one encoder's vectors under a single key."""
    default_targets: Mapping[str, tuple[str, ...]] = {"unet": ("to_q", "to_k", "to_v", "to_out.0"),
                                                      "text": ("q_proj", "k_proj", "v_proj", "out_proj")}
    kohya_prefix: Mapping[str, str] = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    kohya_base_version: str = "sd_v1"
    sampling_defaults: Mapping[str, Any] = {"steps": 50, "guidance_scale": 7.5, "scheduler": "ddim"}
    """Sampling settings a spec leaves to the family (the paper's DDIM, 50 steps, guidance 7.5)."""
    default_layout: Mapping[str, Any] | None = None
    """The denoiser layout assumed for imported files that do not record one (see :meth:`asset_layout`)."""

    prompt_tokenizers: tuple[str, ...] = ("tokenizer",)
    """The tokenizer folders :meth:`prompt_overflow` reads (to check prompts without loading the model)."""

    # ------------------------------------------------------------------ components

    @property
    def folders(self) -> list[str]:
        """The component folders a model of this family loads from."""
        return ([self.tokenizers[c] for c in self.text_encoders] + list(self.text_encoders)
                + [self.denoiser, "vae", "scheduler"])

    @property
    def lora_components(self) -> tuple[str, ...]:
        """Components an asset may carry LoRA for, in asset-file order: the text encoders, then the denoiser."""
        return (*self.text_encoders, self.denoiser)

    def lora_targets(self, component: str, cfg: Any) -> tuple[str, ...]:
        """The modules of ``component`` that get LoRA under training settings ``cfg`` (``unet_targets`` for the
        denoiser, ``text_targets`` for the text encoders)."""
        return tuple(cfg.unet_targets if component == self.denoiser else cfg.text_targets)

    def trained_components(self, cfg: Any = None) -> tuple[str, ...]:
        """Components phase 2 puts LoRA on for training settings ``cfg`` (default: all of :attr:`lora_components`)."""
        return self.lora_components

    def claims(self, folder: Path, index: Mapping[str, Any]) -> bool:
        """Whether a diffusers folder (with its ``model_index.json`` as ``index``) is of this family."""
        raise NotImplementedError

    def load_parts(self, folder: Path, dtype: Any, part: Callable[[str], None]) -> dict[str, Any]:
        """Load the components of ``folder`` (``part(name)`` is called before each, for error messages)."""
        raise NotImplementedError

    def prompt_overflow(self, folder: Path, text: str, pseudo_words: Sequence[str]) -> Any:
        """How ``text`` overflows the text encoder's window (an :class:`~caspec.models.prompts.Overflow`, None if
        it fits), from the model folder's tokenizer and text-encoder config files only. Each of ``pseudo_words``
        counts as one token."""
        from ..models.prompts import prompt_overflow

        return prompt_overflow(files_tokenizer(folder / "tokenizer"), text, pseudo_words=pseudo_words,
                               size=text_positions(folder, "text_encoder", "tokenizer"))

    def native_resolution(self, folder: Path) -> int:
        """The model's native square image size from its configs (no weights)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ prompts

    def encode(self, pipe: Any, ids: Sequence[tuple[Any, Any]]) -> Any:
        """Run the text encoders on :func:`caspec.models.text.tokenize`'s output into a ``TextCond``."""
        raise NotImplementedError

    def added_cond(self, pipe: Any, cond: Any, resolution: int) -> dict[str, Any] | None:
        """Extra conditioning the denoiser takes beside the hidden states (None: none)."""
        return None

    def empty_negative_is_zeros(self, index: Mapping[str, Any]) -> bool:
        """Whether an empty negative prompt conditions as zeros (SDXL's ``force_zeros_for_empty_prompt``)."""
        return False

    # ------------------------------------------------------------------ sampling

    @property
    def sampler(self) -> Any:
        """The module that samples this family (``txt2img``, ``sdedit``, ``encode_image``, ``default_batch_size``)."""
        raise NotImplementedError

    def step_sigmas(self, configs: Mapping[str, Any], steps: int, resolution: int) -> list[float]:
        """The noise level at the start of each of ``steps`` sampling steps, as a flow-matching σ
        (``x_t = (1 - σ) x0 + σ ε``; for DDPM schedules the σ of the same signal-to-noise ratio). Pure:
        ``configs`` holds the model's ``scheduler`` and ``vae`` configs (:func:`caspec.models.load.model_configs`)."""
        raise NotImplementedError

    def strength_start(self, steps: int, strength: float) -> int:
        """The sampling step SDEdit starts at for diffusers' ``strength`` (its img2img pipelines' rule)."""
        raise NotImplementedError

    def txt2img(self, pipe: Any, prompts: Sequence[str], seeds: Sequence[int], **settings: Any) -> list[Any]:
        """Images from prompts: ``steps``, ``guidance_scale``, ``negative_prompt``, ``resolution``,
        ``batch_size``, ``progress`` (and ``true_cfg_scale`` where the family has it)."""
        settings.pop("true_cfg_scale", None)
        return self.sampler.txt2img(pipe, prompts, seeds, **settings)

    def sdedit(self, pipe: Any, images: Sequence[Any], prompts: Sequence[str], seeds: Sequence[int], *,
               start: int, **settings: Any) -> list[Any]:
        """SDEdit from sampling step ``start`` (see :func:`caspec.families.noise.edit_start`); settings as
        :meth:`txt2img`."""
        settings.pop("true_cfg_scale", None)
        return self.sampler.sdedit(pipe, images, prompts, seeds, start=start, **settings)

    def instruct(self, pipe: Any, images: Sequence[Any], instructions: Sequence[str], seeds: Sequence[int],
                 **settings: Any) -> list[Any]:
        """Instruction edits ("make the robot purple"): families with an instruction-edit model override this."""
        raise ValueError(f"{self.title} models take no instruction edits (`method: instruct`): give the edits step "
                         "a `model:` that does, such as a FLUX.1 Kontext model")

    # ------------------------------------------------------------------ training

    def training_schedule(self, pipe: Any) -> Any:
        """The noise schedule training draws from (see :class:`DiffusionSchedule`)."""
        raise NotImplementedError

    def predict(self, pipe: Any, z_t: Any, t: Any, cond: Any, resolution: int) -> Any:
        """The denoiser's prediction for noisy latents ``z_t`` at timesteps ``t`` (training forward)."""
        raise NotImplementedError

    def asset_layout(self, pipe: Any) -> dict[str, Any] | None:
        """What an asset records about the denoiser's layout so that its export names stay right."""
        return None

    # ------------------------------------------------------------------ export and import names

    def kohya_name(self, component: str, module: str, layout: Mapping[str, Any] | None = None) -> str:
        """The kohya LoRA layer name of ``component``'s ``module``."""
        if component not in self.kohya_prefix:
            raise ValueError(f"component {component!r} has no kohya name in the {self.title} family")
        path = with_text_model(module) if component != self.denoiser else module
        return self.kohya_prefix[component] + path.replace(".", "_")

    def kohya_lora(self, layers: Mapping[str, Mapping[str, tuple[Any, Any]]], rank: int, alpha: float,
                   layout: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
        """Kohya LoRA tensors (``<name>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``) for
        ``{component: {module: (A, B)}}`` and the map kohya name -> ``component:module``; one name per module,
        alpha as trained (kohya scales by ``alpha / rank``)."""
        import torch

        tensors: dict[str, Any] = {}
        modules: dict[str, str] = {}
        for comp in self.lora_components:
            for module, (a, b) in sorted((layers.get(comp) or {}).items()):
                name = self.kohya_name(comp, module, layout)
                if name in modules:
                    raise ValueError(f"LoRA modules {modules[name]} and {comp}:{module} share the kohya name {name}")
                modules[name] = f"{comp}:{module}"
                tensors[f"{name}.lora_down.weight"] = a.detach().to("cpu", torch.float32).contiguous().clone()
                tensors[f"{name}.lora_up.weight"] = b.detach().to("cpu", torch.float32).contiguous().clone()
                tensors[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
        return tensors, modules

    def kohya_header(self, rank: int, alpha: float) -> dict[str, str]:
        """kohya's safetensors header entries for this family's LoRA files."""
        return {"ss_network_module": "networks.lora", "ss_network_dim": str(int(rank)),
                "ss_network_alpha": repr(float(alpha)), "ss_base_model_version": self.kohya_base_version}

    def lora_layers(self, tensors: Mapping[str, Any], default_alpha: Mapping[str, float]) -> list[Any] | None:
        """A LoRA file's layers ``(component, module, A, B, alpha)`` when this family reads its files itself
        (None: the importer's kohya and diffusers readers apply)."""
        return None

    def lora_saver(self) -> Any:
        """diffusers' loader mixin whose ``save_lora_weights`` packs this family's LoRA files."""
        raise NotImplementedError

    peft_names_in_diffusers_files: bool = False
    """Whether diffusers-format LoRA files keep peft's key names (FLUX.1's scripts) rather than diffusers' own."""

    @property
    def diffusers_lora_components(self) -> tuple[str, ...]:
        """Components whose LoRA diffusers' loader for this family reads (``save_lora_weights`` arguments)."""
        return self.lora_components

    @property
    def embedding_file_keys(self) -> dict[str, str]:
        """Embedding-file key -> text encoder, with the aliases other tools write (ComfyUI's ``t5xxl``)."""
        return {key: enc for enc, key in (self.embedding_keys or {}).items()}

    def kohya_modules(self, names: Mapping[str, Mapping[str, Any]], layout: Mapping[str, Any] | None) -> dict[str, str]:
        """kohya layer name -> ``component:module path`` for the layers ``names`` (name -> its tensors)."""
        raise NotImplementedError

    def claims_lora_names(self, names: Sequence[str]) -> bool:
        """Whether kohya layer ``names`` can only come from this family (import without a caspec header)."""
        return False

    def claims_embedding(self, widths: Mapping[str, int]) -> bool:
        """Whether header-less embeddings with these widths per text encoder belong to this family."""
        return False

    def __repr__(self) -> str:
        return f"<family {self.name}>"


# ---------------------------------------------------------------------------------------------
# the UNet families


class DiffusionSchedule:
    """Training noise for UNet families: DDPM's ``add_noise``, the ε or v target, min-SNR weights.

    Built from the model's scheduler config, so a model's own betas and prediction type are used."""

    def __init__(self, scheduler_config: Any) -> None:
        from diffusers import DDPMScheduler

        self.sched = DDPMScheduler.from_config(scheduler_config)
        self.num_train_timesteps = int(self.sched.config.num_train_timesteps)
        self.prediction_type = self.sched.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r} (epsilon or v_prediction)")

    def timesteps(self, n: int, g: Any, sampling: str) -> Any:
        """``n`` training timesteps: uniform, or ``cubic`` (``t = (1 - u³) T``: more high-noise steps)."""
        import torch

        T = self.num_train_timesteps
        if sampling == "uniform":
            return torch.randint(0, T, (n,), generator=g)
        u = torch.rand(n, generator=g, dtype=torch.float64)
        return ((1.0 - u ** 3) * T).long().clamp(0, T - 1)

    def at(self, t_over_T: float, n: int) -> Any:
        """``n`` copies of the training timestep at noise level ``t_over_T``."""
        import torch

        t = min(max(int(round(t_over_T * self.num_train_timesteps)), 0), self.num_train_timesteps - 1)
        return torch.full((n,), t, dtype=torch.long)

    def clean(self, z_t: Any, pred: Any, t: Any) -> Any:
        """The clean latent a prediction implies (ε or v)."""
        ac = self.sched.alphas_cumprod.to(z_t.device)[t].float().reshape(-1, *([1] * (z_t.ndim - 1)))
        if self.prediction_type == "epsilon":
            return (z_t - (1 - ac).sqrt() * pred) / ac.sqrt()
        return ac.sqrt() * z_t - (1 - ac).sqrt() * pred

    def noisy(self, z0: Any, noise: Any, t: Any) -> tuple[Any, Any]:
        """``(z_t, target)`` for clean latents ``z0``."""
        z_t = self.sched.add_noise(z0, noise, t)
        target = noise if self.prediction_type == "epsilon" else self.sched.get_velocity(z0, noise, t)
        return z_t, target

    def loss_weights(self, t: Any, min_snr_gamma: float | None) -> Any:
        """Per-sample loss weights (min-SNR-γ), or None."""
        if min_snr_gamma is None:
            return None
        import torch
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.sched, t)
        clipped = torch.clamp(snr, max=min_snr_gamma)
        return clipped / snr if self.prediction_type == "epsilon" else clipped / (snr + 1)


class UNetFamily(Family):
    """What SD 1.x, SD 2.x and SDXL share: a ``UNet2DConditionModel``, a KL VAE, CLIP text encoders, DDIM."""

    @property
    def sampler(self) -> Any:
        from ..models import sampling

        return sampling

    def step_sigmas(self, configs: Mapping[str, Any], steps: int, resolution: int) -> list[float]:
        from .noise import ddim_step_sigmas

        return ddim_step_sigmas(configs["scheduler"], steps)

    def strength_start(self, steps: int, strength: float) -> int:
        return max(steps - min(int(steps * strength), steps), 0)

    def _variant(self, sub: Path) -> str | None:
        from ..models.load import weight_variant

        return weight_variant(sub)

    def load_parts(self, folder: Path, dtype: Any, part: Callable[[str], None]) -> dict[str, Any]:
        import torch
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

        parts = self.load_text_encoders(folder, dtype, part)
        part("unet")
        parts["unet"] = UNet2DConditionModel.from_pretrained(
            folder, subfolder="unet", local_files_only=True, torch_dtype=dtype, variant=self._variant(folder / "unet"))
        part("vae")
        parts["vae"] = AutoencoderKL.from_pretrained(
            folder, subfolder="vae", local_files_only=True, torch_dtype=torch.float32,
            variant=self._variant(folder / "vae"))
        part("scheduler")
        parts["scheduler"] = DDIMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
        return parts

    def load_text_encoders(self, folder: Path, dtype: Any, part: Callable[[str], None]) -> dict[str, Any]:
        """The CLIP tokenizer(s) and text encoder(s), by component name."""
        from transformers import CLIPTextModel, CLIPTokenizer

        part("tokenizer")
        out = {"tokenizer": CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)}
        part("text_encoder")
        out["text_encoder"] = CLIPTextModel.from_pretrained(
            folder / "text_encoder", local_files_only=True, dtype=dtype, variant=self._variant(folder / "text_encoder"))
        return out

    def native_resolution(self, folder: Path) -> int:
        unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
        vae = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
        size = unet["sample_size"]
        size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size) * 2 ** (len(vae["block_out_channels"]) - 1)

    def encode(self, pipe: Any, ids: Sequence[tuple[Any, Any]]) -> Any:
        """The last hidden state of the one CLIP text encoder."""
        from ..models.text import TextCond

        input_ids, mask = ids[0]
        device = pipe.device
        out = pipe.text_encoder(input_ids.to(device), attention_mask=None if mask is None else mask.to(device))[0]
        return TextCond(out.to(dtype=pipe.dtype))

    def training_schedule(self, pipe: Any) -> DiffusionSchedule:
        return DiffusionSchedule(pipe.scheduler.config)

    def predict(self, pipe: Any, z_t: Any, t: Any, cond: Any, resolution: int) -> Any:
        return pipe.unet(z_t.to(pipe.dtype), t, encoder_hidden_states=cond.embeds,
                         added_cond_kwargs=self.added_cond(pipe, cond, resolution), return_dict=False)[0]

    def lora_saver(self) -> Any:
        from diffusers.loaders import StableDiffusionLoraLoaderMixin

        return StableDiffusionLoraLoaderMixin

    def kohya_modules(self, names: Mapping[str, Mapping[str, Any]], layout: Mapping[str, Any] | None) -> dict[str, str]:
        """Through diffusers' own SD converter (``StableDiffusionLoraLoaderMixin.lora_state_dict``)."""
        from diffusers.loaders import StableDiffusionLoraLoaderMixin

        return {name: converted_module(StableDiffusionLoraLoaderMixin.lora_state_dict(pair_dict(name, parts))[0],
                                       name)
                for name, parts in names.items()}


def pair_dict(name: str, parts: Mapping[str, Any]) -> dict[str, Any]:
    """One kohya layer's ``lora_down`` / ``lora_up`` as a state dict for diffusers' converters."""
    return {f"{name}.lora_down.weight": parts["lora_down.weight"], f"{name}.lora_up.weight": parts["lora_up.weight"]}


def converted_module(converted: Mapping[str, Any], name: str = "") -> str:
    """``component:peft module path`` of one layer as diffusers' ``lora_state_dict`` returns it."""
    from diffusers.utils.state_dict_utils import (StateDictType, convert_state_dict_to_diffusers,
                                                  convert_state_dict_to_peft, convert_unet_state_dict_to_peft)

    comps = {k.split(".", 1)[0] for k in converted}
    if len(comps) != 1:
        raise ValueError(f"cannot map the kohya layer {name} to a module path (converted to {sorted(converted)})")
    comp = comps.pop()
    part = {k.removeprefix(f"{comp}."): v for k, v in converted.items()}
    if comp in ("unet", "transformer"):
        peft = convert_unet_state_dict_to_peft(part)
    else:
        peft = convert_state_dict_to_diffusers(part, original_type=StateDictType.DIFFUSERS_OLD)
        peft = convert_state_dict_to_peft(peft, original_type=StateDictType.DIFFUSERS)
    down = [k for k in peft if k.endswith(".lora_A.weight")]
    if len(down) != 1 or len(peft) != 2:
        raise ValueError(f"cannot map the kohya layer {name} to a module path (converted to {sorted(peft)})")
    return f"{comp}:{down[0].removesuffix('.lora_A.weight')}"


__all__ = ["Family", "UNetFamily", "DiffusionSchedule", "read_json", "with_text_model", "TEXT_MODEL",
           "pair_dict", "converted_module", "clip_has_text_model", "config_value"]
