"""The GPU benchmark's reference side: diffusers' example-script patterns, re-implemented here, that caspec is
measured against, and the timed training run of a reference.

* :class:`ReferenceTI`: the training pattern of ``examples/textual_inversion/textual_inversion.py``
  (caspec's phase 1 is measured against it);
* :class:`ReferenceLoRA`: the pattern of ``examples/dreambooth/train_dreambooth_lora.py`` with
  ``--train_text_encoder`` (against caspec's phase 2);
* :func:`img2img_pipeline` / :func:`img2img_variations`: diffusers' ``StableDiffusionImg2ImgPipeline`` built
  from caspec's UNet and text encoder, with a VAE in the same dtype (the reference pattern loads every
  component in one dtype; caspec keeps its VAE in fp32), ``safety_checker=None``, one CPU generator per
  candidate (against caspec's ``sdedit``).

Precision: the references follow their scripts with ``--mixed_precision fp16`` on CUDA: fp16 frozen
weights, fp32 trained parameters, fp16 autocast around the forward of every model the script hands to
``accelerator.prepare`` (outputs converted to fp32, as accelerate does) and a GradScaler. On the CPU
everything is fp32, without autocast or GradScaler.
"""
from __future__ import annotations

import time
from typing import Any

from .inputs import make_items, make_words
from .measure import Probe, free_memory, peak_memory
from .models import Models
from .settings import BenchSettings

REF_LR_TI = 5e-3  # textual_inversion.py's --learning_rate as caspec uses it (lr_embeddings)
REF_WEIGHT_DECAY = 1e-2  # both scripts' --adam_weight_decay default
REF_MAX_GRAD_NORM = 1.0  # train_dreambooth_lora.py's --max_grad_norm default
REF_UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj")  # train_dreambooth_lora.py
REF_TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


# ---------------------------------------------------------------------------------------------
# img2img (section 1)


def img2img_pipeline(models: Models, pipe: Any) -> Any:
    """diffusers' ``StableDiffusionImg2ImgPipeline`` sharing ``pipe``'s UNet and text encoder, with a VAE in
    the benchmark dtype, a DDIM scheduler of the same config, no safety checker, no progress bar."""
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

    ref = StableDiffusionImg2ImgPipeline(
        vae=models.module("vae", models.dtype), text_encoder=pipe.text_encoder, tokenizer=models.tokenizer(),
        unet=pipe.unet, scheduler=DDIMScheduler.from_config(pipe.scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref


def img2img_variations(ref: Any, root: Any, prompts: list[str], seeds: list[int], *, strength: float, steps: int,
                       guidance_scale: float) -> list[Any]:
    """One variation of ``root`` per prompt in one pipeline call, one CPU generator per candidate."""
    import torch

    gens = [torch.Generator("cpu").manual_seed(x) for x in seeds]
    with torch.inference_mode():
        return ref(prompt=prompts, image=root, strength=strength, num_inference_steps=steps,
                   guidance_scale=guidance_scale, generator=gens, output_type="pil").images


# ---------------------------------------------------------------------------------------------
# the reference training patterns (section 2)


def weight_dtype(precision: str) -> Any:
    """The scripts' ``weight_dtype`` for ``--mixed_precision``."""
    import torch

    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


class _Reference:
    """What both reference scripts share: the dataset (per step: pick a shuffled batch, preprocess each PIL
    image to [-1, 1] and tokenize its caption, as their ``Dataset.__getitem__`` and a DataLoader with
    ``num_workers=0`` do), the placeholder tokens added to a resized embedding table with rows copied
    from the initializer words, the DDPM noise schedule, and fp16 autocast + GradScaler when the
    precision is fp16 (on CUDA)."""

    def __init__(self, models: Models, words: list[Any], items: list[tuple[Any, str]], *, batch: int,
                 precision: str, seed: int, text_dtype: Any) -> None:
        import torch
        from diffusers import DDPMScheduler

        self.device = models.device
        self.items, self.batch, self.resolution = list(items), int(batch), models.resolution
        self.precision = precision
        self.weight_dtype = weight_dtype(precision)
        self.amp_dtype = None if precision == "no" else self.weight_dtype
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        self.noise_scheduler = DDPMScheduler.from_config(models.scheduler.config)
        self.tokenizer = models.tokenizer()
        self.text_encoder = models.module("text_encoder", text_dtype)
        self.unet = models.module("unet", self.weight_dtype)
        self.vae = models.module("vae", self.weight_dtype)
        for m in (self.text_encoder, self.unet, self.vae):
            m.requires_grad_(False)
        tokens = [w.token for w in words]
        if self.tokenizer.add_tokens(tokens) != len(tokens):
            raise ValueError("the tokenizer already holds a placeholder token")
        init_ids = [self.tokenizer.encode(w.init_word, add_special_tokens=False)[0] for w in words]
        self.placeholder_ids = [int(i) for i in self.tokenizer.convert_tokens_to_ids(tokens)]
        with torch.random.fork_rng(devices=[]):
            self.text_encoder.resize_token_embeddings(len(self.tokenizer))
        table = self.text_encoder.get_input_embeddings().weight.data
        with torch.no_grad():
            for pid, iid in zip(self.placeholder_ids, init_ids):
                table[pid] = table[iid].clone()
        self.generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self._order: list[int] = []

    def _example(self, k: int) -> tuple[Any, Any]:
        import numpy as np
        import torch
        from PIL import Image

        image, caption = self.items[k]
        ids = self.tokenizer(caption, padding="max_length", truncation=True, max_length=self.tokenizer.model_max_length,
                             return_tensors="pt").input_ids[0]
        image = image.convert("RGB") if image.mode != "RGB" else image
        image = image.resize((self.resolution, self.resolution), resample=Image.Resampling.BICUBIC)
        arr = (np.asarray(image).astype(np.uint8) / 127.5 - 1.0).astype(np.float32)
        return torch.from_numpy(arr).permute(2, 0, 1), ids

    def _next_batch(self) -> tuple[Any, Any]:
        import torch

        idx = []
        for _ in range(self.batch):
            if not self._order:
                self._order = torch.randperm(len(self.items), generator=self.generator).tolist()
            idx.append(self._order.pop(0))
        examples = [self._example(k) for k in idx]
        pixels = torch.stack([e[0] for e in examples]).to(self.device)
        ids = torch.stack([e[1] for e in examples]).to(self.device)
        return pixels, ids

    def _autocast(self) -> Any:
        import torch

        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None)

    def _noisy(self, pixels: Any) -> tuple[Any, Any, Any, Any]:
        """VAE-encode (a sample of the latent distribution, every step), noise, timesteps, target."""
        import torch

        latents = self.vae.encode(pixels.to(dtype=self.weight_dtype)).latent_dist.sample().detach()
        latents = latents * self.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                          device=latents.device).long()
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        pred_type = self.noise_scheduler.config.prediction_type
        target = noise if pred_type == "epsilon" else self.noise_scheduler.get_velocity(latents, noise, t)
        return noisy, noise, t, target

    def _backward_step(self, loss: Any, clip: list[Any] | None = None) -> None:
        import torch

        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if clip is not None:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(clip, REF_MAX_GRAD_NORM)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(clip, REF_MAX_GRAD_NORM)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class ReferenceTI(_Reference):
    """The training pattern of diffusers' ``examples/textual_inversion/textual_inversion.py``.

    UNet and VAE frozen in the weight dtype (fp16 under ``--mixed_precision fp16``), the text encoder
    in fp32 with everything but its token-embedding table frozen; AdamW over the *whole* table; every
    step VAE-encodes its images; only the text encoder runs under autocast (it is the one model given
    to ``accelerator.prepare``; its output is converted to fp32, then to the weight dtype); after each
    step every row but the new ones is restored from a saved copy (the script's ``index_no_updates``,
    a CPU mask built each step)."""

    def __init__(self, models: Models, words: list[Any], items: list[tuple[Any, str]], *, batch: int = 1,
                 precision: str = "no", seed: int = 0, lr: float = REF_LR_TI,
                 weight_decay: float = REF_WEIGHT_DECAY) -> None:
        import torch

        super().__init__(models, words, items, batch=batch, precision=precision, seed=seed, text_dtype=torch.float32)
        te = self.text_encoder
        tm = getattr(te, "text_model", te)  # transformers 5 flattened CLIPTextModel (no .text_model)
        tm.encoder.requires_grad_(False)
        tm.final_layer_norm.requires_grad_(False)
        tm.embeddings.position_embedding.requires_grad_(False)
        te.get_input_embeddings().weight.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(te.get_input_embeddings().parameters(), lr=lr, betas=(0.9, 0.999),
                                           weight_decay=weight_decay, eps=1e-8)
        self.orig_embeds = te.get_input_embeddings().weight.data.clone()
        te.train()

    def step(self) -> float:
        import torch
        import torch.nn.functional as F

        pixels, ids = self._next_batch()
        noisy, _noise, t, target = self._noisy(pixels)
        with self._autocast():
            hidden = self.text_encoder(ids)[0]
        hidden = hidden.float().to(dtype=self.weight_dtype)
        pred = self.unet(noisy, t, hidden).sample
        loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
        self._backward_step(loss)
        keep = torch.ones((len(self.tokenizer),), dtype=torch.bool)
        keep[min(self.placeholder_ids): max(self.placeholder_ids) + 1] = False
        with torch.no_grad():
            self.text_encoder.get_input_embeddings().weight[keep] = self.orig_embeds[keep]
        return float(loss.detach().item())


class ReferenceLoRA(_Reference):
    """The training pattern of diffusers' ``examples/dreambooth/train_dreambooth_lora.py`` with
    ``--train_text_encoder``: UNet, VAE and text encoder frozen in the weight dtype; peft LoRA (rank r,
    alpha r, gaussian init) on the UNet's ``to_q/k/v, to_out.0, add_k/v_proj`` and the text encoder's
    ``q/k/v/out_proj``, its parameters cast to fp32 (``cast_training_params``); both models under
    autocast (both are prepared); every step VAE-encodes its images; gradients unscaled and clipped to
    norm 1, then AdamW. The placeholder tokens are added (rows from the initializer words, not trained)
    so that the captions are caspec's; the learning rates are caspec's (two groups)."""

    def __init__(self, models: Models, words: list[Any], items: list[tuple[Any, str]], *, batch: int = 1,
                 precision: str = "no", seed: int = 0, rank: int = 4, lr_unet: float = 1e-4,
                 lr_text: float = 5e-5, weight_decay: float = REF_WEIGHT_DECAY) -> None:
        import torch
        from peft import LoraConfig, inject_adapter_in_model

        super().__init__(models, words, items, batch=batch, precision=precision, seed=seed,
                         text_dtype=weight_dtype(precision))
        params: dict[str, list[Any]] = {}
        for name, module, targets in (("unet", self.unet, REF_UNET_TARGETS), ("text", self.text_encoder, REF_TEXT_TARGETS)):
            present = [t for t in targets if any(n == t or n.endswith("." + t) for n, _ in module.named_modules())]
            cfg = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=present)
            inject_adapter_in_model(cfg, module, adapter_name="default")
            ps = [p for n, p in module.named_parameters() if "lora_" in n]
            for p in ps:
                p.requires_grad_(True)
                if precision == "fp16":
                    p.data = p.data.float()  # diffusers.training_utils.cast_training_params
            params[name] = ps
        if not params["unet"] or not params["text"]:
            raise RuntimeError("LoRA injection produced no trainable parameters")
        self.lora_params = params["unet"] + params["text"]
        self.optimizer = torch.optim.AdamW([{"params": params["unet"], "lr": lr_unet},
                                            {"params": params["text"], "lr": lr_text}],
                                           betas=(0.9, 0.999), weight_decay=weight_decay, eps=1e-8)
        self.unet.train()
        self.text_encoder.train()

    def step(self) -> float:
        import torch.nn.functional as F

        pixels, ids = self._next_batch()
        noisy, _noise, t, target = self._noisy(pixels)
        with self._autocast():
            hidden = self.text_encoder(ids, attention_mask=None, return_dict=False)[0]
        hidden = hidden.float()
        with self._autocast():
            pred = self.unet(noisy, t, hidden, return_dict=False)[0]
        pred = pred.float()
        loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
        self._backward_step(loss, clip=self.lora_params)
        return float(loss.detach().item())


def reference_train_run(models: Models, s: BenchSettings, phase: int, batch: int) -> dict[str, Any]:
    """One timed training run of the reference pattern of ``phase`` (1: textual inversion, 2: DreamBooth
    LoRA) at ``batch``: the script's loop, step after step, under a :class:`~.measure.Probe`."""
    total = s.train_warmup + s.train_steps + 1
    free_memory(models.device)
    t0 = time.perf_counter()
    cls = ReferenceTI if phase == 1 else ReferenceLoRA
    ref = cls(models, make_words(s.train_images), make_items(s.train_images, models.resolution), batch=batch,
              precision=s.ref_precision, seed=s.seed)
    probe = Probe(models.device, total)
    try:
        for i in range(total):
            loss = ref.step()
            probe(i + 1, total, {"loss": loss, "phase": phase})
    finally:
        probe.close()
    result = probe.summary(batch, s.train_warmup, s.train_steps)
    result["peak_mem_bytes"] = peak_memory(models.device)
    result["run_s"] = time.perf_counter() - t0
    del ref
    free_memory(models.device)
    return result
