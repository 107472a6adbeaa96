"""caspec's own DDIM sampling: txt2img (root images) and text-guided SDEdit (variations).

Written against the loaded components of a :class:`~caspec.models.load.Pipe`, not diffusers'
pipeline classes, so that every image depends only on its own (prompt, seed, settings):

* each image's starting noise comes from its own ``torch.Generator("cpu").manual_seed(seed)``
  (drawn in fp32 on the CPU, then moved), so batching and batch composition never pick the noise;
* each distinct prompt is encoded on its own (batch of one), each distinct source image is
  VAE-encoded once, deterministically (the latent distribution's mean);
* every family conditions through :mod:`caspec.models.text`: SDXL's two text encoders, pooled text
  embeddings and added time ids (the image's own square size, no crop), with an empty negative prompt
  as zeros where the model says ``force_zeros_for_empty_prompt``; v-prediction models (SD 2.x) need
  nothing here: the DDIM scheduler reads ``prediction_type`` from the model's config;
* DDIM with eta 0 and classifier-free guidance (the unconditional pass is skipped when
  ``guidance_scale <= 1``); SDEdit starts where diffusers' img2img ``get_timesteps`` does:
  ``init = min(int(steps * strength), steps)`` denoising steps from ``timesteps[steps - init]``;
* every UNet batch runs at one fixed shape (``PAD_BATCHES``), so an image never depends on its
  companions or its position in a batch;
* every call works on its own scheduler copy; shared state is never mutated.

The numerics follow diffusers' StableDiffusion(XL)Pipeline / img2img pipelines (tests compare them).
The VAE always runs in fp32 (SDXL's VAE overflows to NaN in fp16).
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .load import Pipe
from .prompts import check_prompt
from .text import TextCond, added_cond, encode_ids, expand_prompt, tokenize

CPU_BATCH_SIZE = 4  # tiny on 2 cores: 8 images x 50 steps take 7.1 s at 4 or 8 (10.7 s at 1); 4 wastes less padding
CUDA_BATCH_SIZE = 8  # to be tuned per GPU memory
PAD_BATCHES = True
"""Run every UNet batch at the full ``batch_size`` shape, padding a short last batch with copies
of its last item (their outputs are dropped). Matrix kernels pick different code paths for
different batch shapes, which moves a value by up to 1/255 now and then; with one fixed shape
each image's result depends only on its own inputs (measured bit-identical on CPU, whatever its
position and companions), so adding candidates or prompts leaves existing images byte-identical
for a given batch size. That matters beyond looks: an edit's seeds follow its source image's digest,
so one flipped pixel in a root would give all its edits new seeds. The cost: up to one batch of
wasted compute per call. Results are byte-stable for one batch size; another batch size (or
device) may differ by 1/255 in a few pixels."""

Progress = Callable[[int, int], None] | None


def default_batch_size(pipe: Pipe) -> int:
    return CUDA_BATCH_SIZE if pipe.device.type == "cuda" else CPU_BATCH_SIZE


def _scheduler_copy(pipe: Pipe) -> Any:
    """A private DDIM scheduler built from the model's scheduler config."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(pipe.scheduler.config)


def _resolution(pipe: Pipe, resolution: int | None) -> int:
    res = pipe.resolution if resolution is None else int(resolution)
    if res <= 0 or res % pipe.vae_scale_factor:
        raise ValueError(f"resolution {res} is not a multiple of the VAE's downscale factor {pipe.vae_scale_factor}")
    return res


def use_cfg(guidance_scale: float) -> bool:
    return guidance_scale > 1.0


@torch.inference_mode()
def _encode_one(pipe: Pipe, text: str) -> TextCond:
    return encode_ids(pipe, tokenize(pipe, [expand_prompt(pipe, text)]))


def encode_prompts(
    pipe: Pipe, prompts: Sequence[str], negative: str | Sequence[str] | None = None, *, guidance_scale: float = 7.5
) -> tuple[TextCond, TextCond | None]:
    """Text conditioning ``(cond, uncond or None)`` for ``prompts`` (:class:`~caspec.models.text.TextCond`:
    hidden states ``[N, L, D]``, and SDXL's pooled embeddings ``[N, P]``).

    ``uncond`` embeds the negative prompt (one string for all, or one per prompt; ``None``/``""``
    = the empty prompt, all zeros on SDXL models with ``force_zeros_for_empty_prompt``); it is ``None``
    when ``guidance_scale <= 1`` (no unconditional pass).
    Each distinct string is encoded once, on its own. A string longer than the text encoder's window
    raises :class:`~caspec.models.prompts.PromptTooLong` (a ``ValueError``), never a silent cut.
    """
    prompts = list(prompts)
    if isinstance(negative, str) or negative is None:
        negatives = [negative or ""] * len(prompts)
    else:
        negatives = [n or "" for n in negative]
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
    memo: dict[str, TextCond] = {}
    for text in dict.fromkeys(prompts):
        check_prompt(pipe.tokenizer, expand_prompt(pipe, text), text_encoder=pipe.text_encoder)
    for text in dict.fromkeys(negatives if use_cfg(guidance_scale) else []):
        check_prompt(pipe.tokenizer, expand_prompt(pipe, text), what="the negative prompt",
                     text_encoder=pipe.text_encoder)

    def emb(text: str) -> TextCond:
        if text not in memo:
            memo[text] = _encode_one(pipe, text)
        return memo[text]

    cond = TextCond.cat([emb(p) for p in prompts])
    if not use_cfg(guidance_scale):
        return cond, None
    conds = [emb(n) if n or not pipe.force_zeros_for_empty_prompt else emb(prompts[0]).zeros() for n in negatives]
    return cond, TextCond.cat(conds)


def _pad(t: Any, size: int) -> Any:
    if t is None or isinstance(t, TextCond):
        return None if t is None else t.pad(size)
    if t.shape[0] >= size:
        return t
    return torch.cat([t, t[-1:].expand(size - t.shape[0], *t.shape[1:])])


@torch.inference_mode()
def _denoise(
    pipe: Pipe, sched: Any, latents: torch.Tensor, timesteps: torch.Tensor, cond: TextCond,
    uncond: TextCond | None, guidance_scale: float, pad_to: int = 0,
) -> torch.Tensor:
    """DDIM (eta 0) from ``latents`` over ``timesteps`` with classifier-free guidance. Latents stay fp32.
    With ``pad_to`` > batch, the batch runs padded to that shape (see ``PAD_BATCHES``)."""
    n = latents.shape[0]
    if pad_to > n:
        latents, cond, uncond = _pad(latents, pad_to), _pad(cond, pad_to), _pad(uncond, pad_to)
        return _denoise(pipe, sched, latents, timesteps, cond, uncond, guidance_scale)[:n]
    both = TextCond.cat([uncond, cond]) if uncond is not None else cond
    resolution = latents.shape[-1] * pipe.vae_scale_factor
    extra = added_cond(pipe, both, resolution)
    hook = getattr(pipe, "step_hook", None)
    T = float(sched.config.num_train_timesteps)
    for t in timesteps:
        if hook is not None:
            hook(float(t) / T)
        model_in = torch.cat([latents] * 2) if uncond is not None else latents
        model_in = sched.scale_model_input(model_in, t).to(pipe.dtype)
        noise_pred = pipe.unet(model_in, t, encoder_hidden_states=both.embeds, added_cond_kwargs=extra,
                               return_dict=False)[0].to(latents.dtype)
        if uncond is not None:
            n_uncond, n_text = noise_pred.chunk(2)
            noise_pred = n_uncond + guidance_scale * (n_text - n_uncond)
        latents = sched.step(noise_pred, t, latents, eta=0.0, return_dict=False)[0]
    return latents


@torch.inference_mode()
def decode_latents(pipe: Pipe, latents: torch.Tensor) -> list[Image.Image]:
    """VAE-decode (fp32, one image at a time) to uint8 RGB PIL images."""
    sf = pipe.vae.config.scaling_factor
    images = []
    for i in range(latents.shape[0]):
        z = latents[i : i + 1].to(device=pipe.device, dtype=pipe.vae_dtype) / sf
        x = pipe.vae.decode(z, return_dict=False)[0]
        x = (x / 2 + 0.5).clamp(0, 1)
        arr = x.cpu().permute(0, 2, 3, 1).float().numpy()[0]
        images.append(Image.fromarray((arr * 255).round().astype("uint8"), mode="RGB"))
    return images


def _noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn(shape, generator=gen, dtype=torch.float32)


def initial_noise(pipe: Pipe, seed: int, resolution: int | None = None) -> torch.Tensor:
    """The unscaled starting noise ``[1, C, h, w]`` (fp32, CPU) that ``seed`` gives at ``resolution``."""
    res = _resolution(pipe, resolution)
    h = res // pipe.vae_scale_factor
    return _noise(seed, (1, pipe.unet.config.in_channels, h, h))


def _batches(n: int, batch_size: int) -> list[range]:
    batch_size = max(1, int(batch_size))
    return [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def txt2img(
    pipe: Pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int = 50,
    guidance_scale: float = 7.5,
    negative_prompt: str | None = "",
    resolution: int | None = None,
    batch_size: int | None = None,
    progress: Progress = None,
) -> list[Image.Image]:
    """One image per (prompt, seed): DDIM ``steps`` with classifier-free guidance from seeded noise."""
    prompts, seeds = list(prompts), list(seeds)
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    res = _resolution(pipe, resolution)
    bs = batch_size or default_batch_size(pipe)
    cond_all, uncond_all = encode_prompts(pipe, prompts, negative_prompt, guidance_scale=guidance_scale)
    out: list[Image.Image] = []
    with torch.inference_mode():
        for idx in _batches(len(prompts), bs):
            sched = _scheduler_copy(pipe)
            sched.set_timesteps(steps, device=pipe.device)
            noise = torch.cat([initial_noise(pipe, seeds[i], res) for i in idx]).to(pipe.device)
            latents = noise * sched.init_noise_sigma
            sel = slice(idx.start, idx.stop)
            latents = _denoise(pipe, sched, latents, sched.timesteps, cond_all[sel],
                               None if uncond_all is None else uncond_all[sel], guidance_scale,
                               pad_to=bs if PAD_BATCHES else 0)
            out.extend(decode_latents(pipe, latents))
            if progress is not None:
                progress(len(out), len(prompts))
    return out


def sdedit_timesteps(sched: Any, steps: int, strength: float) -> torch.Tensor:
    """The timesteps SDEdit denoises over (diffusers img2img ``get_timesteps``); set_timesteps first."""
    init = min(int(steps * strength), steps)
    start = max(steps - init, 0)
    return sched.timesteps[start * sched.order :]


def image_to_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """An RGB image, fitted to ``resolution``², as a ``[1, 3, H, W]`` fp32 tensor in [-1, 1]."""
    from ..ops.images import fit_square

    img = fit_square(image.convert("RGB"), resolution)
    arr = np.asarray(img).astype(np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None] * 2.0 - 1.0


@torch.inference_mode()
def encode_image(pipe: Pipe, image: Image.Image, resolution: int | None = None) -> torch.Tensor:
    """Deterministic VAE latent (the distribution's mean, times the scaling factor), fp32 ``[1, C, h, w]``."""
    res = _resolution(pipe, resolution)
    x = image_to_tensor(image, res).to(device=pipe.device, dtype=pipe.vae_dtype)
    dist = pipe.vae.encode(x).latent_dist
    return (dist.mean * pipe.vae.config.scaling_factor).float()


def _image_key(image: Image.Image) -> tuple:
    return (image.mode, image.size, hashlib.sha256(image.tobytes()).hexdigest())


def sdedit(
    pipe: Pipe,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    strength: float = 0.86,
    start: int | None = None,
    steps: int = 50,
    guidance_scale: float = 7.5,
    negative_prompt: str | None = "",
    resolution: int | None = None,
    batch_size: int | None = None,
    progress: Progress = None,
) -> list[Image.Image]:
    """Text-guided SDEdit: one output per (image, prompt, seed) triple.

    Each source is VAE-encoded once (mean latent); noise from the triple's seed is added with
    ``scheduler.add_noise`` at the start timestep; then ``int(steps * strength)`` DDIM steps with CFG.
    ``start`` (a sampling step, see :func:`caspec.families.noise.edit_start`) replaces ``strength``'s start.
    """
    images, prompts, seeds = list(images), list(prompts), list(seeds)
    if not (len(images) == len(prompts) == len(seeds)):
        raise ValueError(f"sdedit needs as many images, prompts and seeds ({len(images)}, {len(prompts)}, {len(seeds)})")
    if start is None:
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if int(steps * strength) < 1:
            raise ValueError(f"steps × strength = {steps} × {strength} < 1: no denoising step would run")
    elif not 0 <= start < steps:
        raise ValueError(f"start step {start} is outside the {steps} sampling steps")
    res = _resolution(pipe, resolution)
    bs = batch_size or default_batch_size(pipe)

    latents_of: dict[tuple, torch.Tensor] = {}
    src_latents = []
    for img in images:
        k = _image_key(img)
        if k not in latents_of:
            latents_of[k] = encode_image(pipe, img, res)
        src_latents.append(latents_of[k])

    cond_all, uncond_all = encode_prompts(pipe, prompts, negative_prompt, guidance_scale=guidance_scale)
    out: list[Image.Image] = []
    with torch.inference_mode():
        for idx in _batches(len(images), bs):
            sched = _scheduler_copy(pipe)
            sched.set_timesteps(steps, device=pipe.device)
            timesteps = (sdedit_timesteps(sched, steps, strength) if start is None
                         else sched.timesteps[start * sched.order:])
            z0 = torch.cat([src_latents[i] for i in idx]).to(pipe.device)
            noise = torch.cat([_noise(seeds[i], tuple(src_latents[i].shape)) for i in idx]).to(pipe.device)
            t0 = timesteps[:1].repeat(len(idx))
            latents = sched.add_noise(z0, noise, t0)
            sel = slice(idx.start, idx.stop)
            latents = _denoise(pipe, sched, latents, timesteps, cond_all[sel],
                               None if uncond_all is None else uncond_all[sel], guidance_scale,
                               pad_to=bs if PAD_BATCHES else 0)
            out.extend(decode_latents(pipe, latents))
            if progress is not None:
                progress(len(out), len(images))
    return out


__all__ = ["CPU_BATCH_SIZE", "CUDA_BATCH_SIZE", "default_batch_size", "encode_prompts", "txt2img", "sdedit",
           "encode_image", "decode_latents", "initial_noise", "sdedit_timesteps", "image_to_tensor"]
