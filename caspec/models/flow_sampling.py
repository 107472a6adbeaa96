"""caspec's own sampling for FLUX.1-style flow-matching transformers: txt2img (root images), SDEdit
(variations) and instruction edits (FLUX.1 Kontext).

Written against loaded components, not diffusers' pipeline classes, so that every image depends only on
its own (prompt, seed, settings). ``pipe`` is any object with ``tokenizer`` (CLIP), ``text_encoder``
(CLIP-L; only its pooled output is used), ``tokenizer_2``/``text_encoder_2`` (T5; its whole sequence),
``transformer`` (``FluxTransformer2DModel``), ``vae`` (fp32), ``scheduler`` (a template:
``FlowMatchEulerDiscreteScheduler``), ``device``, ``dtype`` (of the transformer and encoders) and
``resolution``.

* Each image's starting noise comes from its own ``torch.Generator("cpu").manual_seed(seed)``, drawn in
  fp32 on the CPU in the unpacked shape ``[1, C, h, w]`` (as ``FluxPipeline.prepare_latents`` draws it),
  then packed into 2x2 patches ``[1, h/2 * w/2, 4C]``.
* Each distinct prompt is encoded on its own (batch of one); each distinct source image is VAE-encoded
  once, deterministically: the latent distribution's mode (its mean), never a sample.
* Sigmas are the pipelines' ``linspace(1, 1/N, N)``, shifted by the scheduler config: dynamically by
  ``mu = calculate_shift(image tokens)`` (FLUX.1-dev) or by the fixed ``shift`` (schnell). Each call
  works on its own scheduler copy; the template is never mutated.
* FLUX.1-dev's distilled guidance goes in as the transformer's ``guidance`` embedding (ignored by models
  without ``guidance_embeds``, i.e. schnell); "true" CFG with a negative prompt (``true_cfg_scale > 1``)
  runs a second transformer pass, as the pipelines do.
* Every transformer batch runs at one fixed shape (``PAD_BATCHES``), so an image never depends on its
  batch companions or its position in a batch; the VAE runs in fp32, one image at a time.

Equalities (tests/test_flux_sampling.py, fp32 on CPU, batch size 1, max pixel difference 0):

* :func:`txt2img` = ``FluxPipeline(prompt, generator=Generator().manual_seed(seed), ...)``;
* :func:`sdedit` = ``FluxImg2ImgPipeline`` whose VAE encode takes the mode (``retrieve_latents(...,
  sample_mode="argmax")``). The stock pipeline *samples* the posterior with the call's generator, which
  also shifts the generator before it draws the noise; caspec never samples an encode;
* :func:`instruct_edit` = ``FluxKontextPipeline(..., max_area=res**2, _auto_resize=False)`` (with
  ``auto_resize=True`` caspec sizes the reference as the pipeline's default ``_auto_resize`` does for a
  square image: FLUX.1 Kontext's preferred 1024x1024).

Only fp32 is checked. In bf16 the loop still follows the pipelines (the latents take the transformer's
dtype, as ``FlowMatchEulerDiscreteScheduler.step`` casts them), but caspec draws the noise in fp32 and runs
the VAE in fp32, so its images differ from a pipeline run entirely in bf16. Note also that diffusers' T5
gives slightly different hidden states when called with autograd on (``encode_prompt`` outside
``torch.no_grad``: another SDPA kernel); the pipelines' ``__call__`` and caspec both run without it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from .prompts import PromptTooLong, prompt_overflow
from .text import expand_prompt

CPU_BATCH_SIZE = 4
CUDA_BATCH_SIZE = 4  # FLUX.1 at 1024 px in bf16: to be tuned per GPU memory
PAD_BATCHES = True
"""Run every transformer batch at the full ``batch_size`` shape, padding a short last batch with copies of
its last item (their outputs are dropped): one fixed shape means the same matrix-kernel code paths, so an
image's bytes depend only on its own inputs (see :mod:`caspec.models.sampling`)."""
MAX_SEQUENCE_LENGTH = 512  # T5 tokens (FluxPipeline's default and maximum)
DEFAULT_GUIDANCE = 3.5  # FluxPipeline's default distilled guidance

Progress = Callable[[int, int], None] | None


# ---------------------------------------------------------------------------------------------
# shapes, schedules


def _vae_scale(pipe: Any) -> int:
    """The VAE's downscale factor: 2 ** (number of VAE blocks - 1) (8 for FLUX.1's VAE)."""
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


vae_scale_factor = _vae_scale


def default_batch_size(pipe: Any) -> int:
    return CUDA_BATCH_SIZE if pipe.device.type == "cuda" else CPU_BATCH_SIZE


def _resolution(pipe: Any, resolution: int | None) -> int:
    res = pipe.resolution if resolution is None else int(resolution)
    multiple = 2 * _vae_scale(pipe)
    if res <= 0 or res % multiple:
        raise ValueError(f"resolution {res} is not a multiple of {multiple} (2 x the VAE's downscale factor, "
                         "for the transformer's 2x2 patches)")
    return res


def _latent_side(res: int, vsf: int) -> int:
    """Side of the unpacked latent: ``2 * (res // (2 * vsf))`` as the pipelines compute it."""
    return 2 * (int(res) // (vsf * 2))


def image_seq_len(res: int, vsf: int) -> int:
    """Image tokens of a ``res``² image: ``(res / vsf / 2)²`` (256 for tiny-flux, 4096 for FLUX.1 at 1024)."""
    return (_latent_side(res, vsf) // 2) ** 2


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent shift ``mu``: linear in the image's token count (diffusers' ``calculate_shift``)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def _mu(config: Mapping[str, Any], seq_len: int) -> float:
    return calculate_shift(seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                           config.get("base_shift", 0.5), config.get("max_shift", 1.15))


def _schedule(config: Mapping[str, Any], steps: int, seq_len: int, device: Any = None, cls: Any = None) -> Any:
    """A private scheduler (``cls``, default ``FlowMatchEulerDiscreteScheduler``) built from ``config``, set to
    the pipelines' sigmas ``linspace(1, 1/steps, steps)`` and ``mu`` for ``seq_len`` image tokens."""
    if cls is None:
        from diffusers import FlowMatchEulerDiscreteScheduler as cls
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    sched = cls.from_config(config)
    sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
    sched.set_timesteps(steps if sigmas is None else None, device=device, sigmas=sigmas, mu=_mu(config, seq_len))
    return sched


def _scheduler_config(source: Any) -> Mapping[str, Any]:
    """The scheduler config of a pipe, a scheduler or a config mapping."""
    if isinstance(source, Mapping):
        return source
    return getattr(source, "scheduler", source).config


def _pipe_schedule(pipe: Any, steps: int, res: int) -> Any:
    """A private copy of the pipe's scheduler (its own type and config), set for ``steps`` at ``res``."""
    return _schedule(pipe.scheduler.config, steps, image_seq_len(res, _vae_scale(pipe)), pipe.device,
                     cls=type(pipe.scheduler))


def sdedit_start(source: Any, steps: int, strength: float, resolution: int | None = None, *,
                 vae_scale_factor: int | None = None) -> tuple[int, float]:
    """Where SDEdit starts: ``(start_step, sigma)`` as ``FluxImg2ImgPipeline`` computes them
    (``t_start = int(N - min(N * strength, N))``, ``sigma = sigmas[t_start]``).

    ``source`` is a pipe, a scheduler, or a scheduler config mapping (no weights needed); with a config,
    give ``resolution`` (and ``vae_scale_factor`` if the VAE is not FLUX.1's 8). Raises ``ValueError``
    when no denoising step would run, or when the start is pure noise (``sigma >= 1``: the source image
    would be discarded, e.g. FLUX.1-schnell at 4 steps and strength 0.86).
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if resolution is None:
        resolution = getattr(source, "resolution", None)
    if resolution is None:
        raise ValueError("sdedit_start needs a resolution (the image token count decides the shift)")
    vsf = vae_scale_factor or (_vae_scale(source) if hasattr(source, "vae") else 8)
    sched = _schedule(_scheduler_config(source), steps, image_seq_len(int(resolution), vsf))
    init = min(steps * strength, steps)
    start = int(max(steps - init, 0))
    if steps - start < 1:
        raise ValueError(f"strength {strength} at {steps} steps leaves no denoising step")
    sigma = float(sched.sigmas[start])
    if sigma >= 1.0:
        raise ValueError(f"strength {strength} at {steps} steps starts at sigma {sigma:.3f}: pure noise, the "
                         "source image would be discarded; lower the strength or use more steps")
    return start, sigma


# ---------------------------------------------------------------------------------------------
# latents


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B, h/2 * w/2, 4C]`` (2x2 patches, as ``FluxPipeline._pack_latents``)."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(latents: torch.Tensor, side: int) -> torch.Tensor:
    """``[B, side/2 * side/2, 4C]`` -> ``[B, C, side, side]`` (``side``: the unpacked latent's side)."""
    b, _, channels = latents.shape
    latents = latents.view(b, side // 2, side // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, channels // 4, side, side)


def image_ids(side: int, device: Any, dtype: torch.dtype, index: int = 0) -> torch.Tensor:
    """RoPE positions ``[(side/2)², 3]`` of a packed latent: (index, row, column); Kontext's reference is index 1."""
    n = side // 2
    ids = torch.zeros(n, n, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(n)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(n)[None, :]
    ids = ids.reshape(n * n, 3).to(device=device, dtype=dtype)
    if index:
        ids[..., 0] = index
    return ids


def initial_noise(pipe: Any, seed: int, resolution: int | None = None) -> torch.Tensor:
    """The unpacked starting noise ``[1, C, h, w]`` (fp32, CPU) that ``seed`` gives at ``resolution``."""
    res = _resolution(pipe, resolution)
    side = _latent_side(res, _vae_scale(pipe))
    gen = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn((1, pipe.transformer.config.in_channels // 4, side, side), generator=gen, dtype=torch.float32)


def _pad(t: torch.Tensor | None, size: int) -> torch.Tensor | None:
    if t is None or t.shape[0] >= size:
        return t
    return torch.cat([t, t[-1:].expand(size - t.shape[0], *t.shape[1:])])


def _batches(n: int, batch_size: int) -> list[range]:
    batch_size = max(1, int(batch_size))
    return [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


# ---------------------------------------------------------------------------------------------
# text


@dataclass(frozen=True)
class FluxCond:
    """Text conditioning of N prompts: CLIP's pooled output ``[N, P]`` and T5's hidden states ``[N, L, D]``."""

    pooled: torch.Tensor
    embeds: torch.Tensor

    @staticmethod
    def cat(conds: Sequence["FluxCond"]) -> "FluxCond":
        return FluxCond(torch.cat([c.pooled for c in conds]), torch.cat([c.embeds for c in conds]))

    def __getitem__(self, sel: slice) -> "FluxCond":
        return FluxCond(self.pooled[sel], self.embeds[sel])

    def pad(self, size: int) -> "FluxCond":
        return FluxCond(_pad(self.pooled, size), _pad(self.embeds, size))


def check_prompt(pipe: Any, text: str, *, what: str = "the prompt",
                 max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> None:
    """Raise :class:`~caspec.models.prompts.PromptTooLong` when ``text`` does not fit T5's
    ``max_sequence_length`` (never a silent cut), or when a pseudo-word falls beyond CLIP's 77 positions.
    Ordinary words beyond CLIP's window are cut as in diffusers: CLIP only gives the pooled summary."""
    t5 = prompt_overflow(pipe.tokenizer_2, expand_prompt(pipe, text),
                         size=max_sequence_length + 1)  # T5 adds one special token (</s>), not two
    if t5 is not None:
        raise PromptTooLong(f"{what} does not fit T5's {max_sequence_length} tokens: {t5.describe()}", t5)
    clip = prompt_overflow(pipe.tokenizer, expand_prompt(pipe, text), text_encoder=pipe.text_encoder)
    if clip is not None and clip.cut_pseudo_words:
        raise PromptTooLong(f"{what} does not fit CLIP's window: {clip.describe()}", clip)


@torch.inference_mode()
def _encode_one(pipe: Any, text: str, max_sequence_length: int) -> FluxCond:
    """One prompt's conditioning, as ``FluxPipeline.encode_prompt`` computes it."""
    clip_ids = pipe.tokenizer([expand_prompt(pipe, text)], padding="max_length",
                              max_length=pipe.tokenizer.model_max_length, truncation=True,
                              return_tensors="pt").input_ids
    pooled = pipe.text_encoder(clip_ids.to(pipe.device), output_hidden_states=False).pooler_output
    pooled = pooled.to(dtype=pipe.text_encoder.dtype, device=pipe.device)
    t5_ids = pipe.tokenizer_2([expand_prompt(pipe, text)], padding="max_length",
                              max_length=max_sequence_length, truncation=True, return_tensors="pt").input_ids
    embeds = pipe.text_encoder_2(t5_ids.to(pipe.device), output_hidden_states=False)[0]
    embeds = embeds.to(dtype=pipe.text_encoder_2.dtype, device=pipe.device)
    return FluxCond(pooled, embeds)


def text_ids(pipe: Any, length: int) -> torch.Tensor:
    """The text tokens' RoPE positions: zeros ``[length, 3]`` (in the CLIP encoder's dtype, as the pipelines)."""
    return torch.zeros(length, 3).to(device=pipe.device, dtype=pipe.text_encoder.dtype)


def _conds(pipe: Any, prompts: Sequence[str], max_sequence_length: int,
           memo: dict[str, FluxCond] | None = None, what: str = "the prompt") -> FluxCond:
    memo = {} if memo is None else memo
    for text in dict.fromkeys(prompts):
        if text not in memo:
            check_prompt(pipe, text, what=what, max_sequence_length=max_sequence_length)
            memo[text] = _encode_one(pipe, text, max_sequence_length)
    return FluxCond.cat([memo[p] for p in prompts])


def encode_prompts(pipe: Any, prompts: Sequence[str], max_sequence_length: int = MAX_SEQUENCE_LENGTH,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(pooled CLIP [N, P], T5 hidden states [N, L, D], text_ids [L, 3])`` for ``prompts``, each distinct
    prompt encoded on its own, as ``FluxPipeline.encode_prompt`` computes them (it returns them in the
    order ``prompt_embeds, pooled_prompt_embeds, text_ids``)."""
    cond = _conds(pipe, list(prompts), max_sequence_length)
    return cond.pooled, cond.embeds, text_ids(pipe, cond.embeds.shape[1])


def _prompt_conds(pipe: Any, prompts: list[str], negative: str | Sequence[str] | None, true_cfg_scale: float,
                  max_sequence_length: int) -> tuple[FluxCond, FluxCond | None]:
    """Conditioning of the prompts and, for true CFG (``true_cfg_scale > 1`` with a negative prompt, as the
    pipelines decide), of the negative prompts (one for all, or one per prompt)."""
    memo: dict[str, FluxCond] = {}
    cond = _conds(pipe, prompts, max_sequence_length, memo)
    if not (true_cfg_scale > 1 and negative is not None):
        return cond, None
    negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
    return cond, _conds(pipe, negatives, max_sequence_length, memo, what="the negative prompt")


# ---------------------------------------------------------------------------------------------
# images


def image_to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """An image, center-cropped to a square and resized to ``size``² (LANCZOS), as ``[1, 3, H, W]`` fp32 in
    [-1, 1] (the same arithmetic as diffusers' ``VaeImageProcessor.preprocess``)."""
    from ..ops.images import fit_square

    arr = np.asarray(fit_square(image, size)).astype(np.float32) / 255.0
    return 2.0 * torch.from_numpy(arr[None].transpose(0, 3, 1, 2)) - 1.0


@torch.inference_mode()
def encode_image(pipe: Any, image: Image.Image, size: int) -> torch.Tensor:
    """Deterministic VAE latent (the distribution's mode), ``(z - shift) * scale``: fp32 ``[1, C, h, w]``."""
    x = image_to_tensor(image, size).to(device=pipe.device, dtype=torch.float32)
    z = pipe.vae.encode(x).latent_dist.mode()
    cfg = pipe.vae.config
    return ((z - cfg.shift_factor) * cfg.scaling_factor).float()


def _image_key(image: Image.Image, size: int) -> tuple:
    return (image.mode, image.size, hashlib.sha256(image.tobytes()).hexdigest(), size)


def _encode_images(pipe: Any, images: Sequence[Image.Image], size: int) -> list[torch.Tensor]:
    """Each distinct source image encoded once (see :func:`encode_image`)."""
    memo: dict[tuple, torch.Tensor] = {}
    out = []
    for img in images:
        key = _image_key(img, size)
        if key not in memo:
            memo[key] = encode_image(pipe, img, size)
        out.append(memo[key])
    return out


@torch.inference_mode()
def decode_latents(pipe: Any, latents: torch.Tensor, resolution: int) -> list[Image.Image]:
    """Packed latents -> uint8 RGB PIL images: ``z / scale + shift`` decoded by the fp32 VAE one image at a
    time, then ``VaeImageProcessor.postprocess``'s arithmetic."""
    side = _latent_side(resolution, _vae_scale(pipe))
    cfg = pipe.vae.config
    images = []
    for i in range(latents.shape[0]):
        z = unpack_latents(latents[i : i + 1], side).to(device=pipe.device, dtype=torch.float32)
        x = pipe.vae.decode(z / cfg.scaling_factor + cfg.shift_factor, return_dict=False)[0]
        x = (x * 0.5 + 0.5).clamp(0, 1)
        arr = x.cpu().permute(0, 2, 3, 1).float().numpy()[0]
        images.append(Image.fromarray((arr * 255).round().astype("uint8"), mode="RGB"))
    return images


# ---------------------------------------------------------------------------------------------
# denoising


@dataclass(frozen=True)
class _Batch:
    """One transformer batch: packed latents and their conditioning (reference latents for Kontext)."""

    latents: torch.Tensor
    cond: FluxCond
    uncond: FluxCond | None
    ref: torch.Tensor | None = None

    def pad(self, size: int) -> "_Batch":
        return _Batch(_pad(self.latents, size), self.cond.pad(size),
                      None if self.uncond is None else self.uncond.pad(size), _pad(self.ref, size))


def _velocity(pipe: Any, latents: torch.Tensor, ref: torch.Tensor | None, cond: FluxCond, timestep: torch.Tensor,
              guidance: torch.Tensor | None, txt_ids: torch.Tensor, img_ids: torch.Tensor) -> torch.Tensor:
    """The transformer's velocity for ``latents`` (Kontext: with the reference tokens appended, then cut off)."""
    model_in = latents if ref is None else torch.cat([latents, ref], dim=1)
    out = pipe.transformer(hidden_states=model_in, timestep=timestep / 1000, guidance=guidance,
                           pooled_projections=cond.pooled, encoder_hidden_states=cond.embeds, txt_ids=txt_ids,
                           img_ids=img_ids, joint_attention_kwargs={}, return_dict=False)[0]
    return out[:, : latents.shape[1]]


@torch.inference_mode()
def _denoise(pipe: Any, sched: Any, start: int, batch: _Batch, guidance: float | None, true_cfg_scale: float,
             img_ids: torch.Tensor, pad_to: int = 0) -> torch.Tensor:
    """Flow-matching Euler from ``batch.latents`` over ``sched.timesteps[start:]`` (the pipelines' loop).
    With ``pad_to`` > batch, the batch runs padded to that shape (see ``PAD_BATCHES``)."""
    n = batch.latents.shape[0]
    if pad_to > n:
        return _denoise(pipe, sched, start, batch.pad(pad_to), guidance, true_cfg_scale, img_ids)[:n]
    txt_ids = text_ids(pipe, batch.cond.embeds.shape[1])
    g = None
    if pipe.transformer.config.guidance_embeds:
        g = torch.full([1], DEFAULT_GUIDANCE if guidance is None else float(guidance), device=pipe.device,
                       dtype=torch.float32).expand(n)
    latents = batch.latents
    sched.set_begin_index(start)
    hook = getattr(pipe, "step_hook", None)
    T = float(sched.config.num_train_timesteps)
    for t in sched.timesteps[start:]:
        if hook is not None:
            hook(float(t) / T)
        timestep = t.expand(n).to(latents.dtype)
        v = _velocity(pipe, latents, batch.ref, batch.cond, timestep, g, txt_ids, img_ids)
        if batch.uncond is not None:
            v_neg = _velocity(pipe, latents, batch.ref, batch.uncond, timestep, g, txt_ids, img_ids)
            v = v_neg + true_cfg_scale * (v - v_neg)
        latents = sched.step(v, t, latents, return_dict=False)[0]
    return latents


def _check_lengths(**seqs: Sequence[Any]) -> None:
    lengths = {k: len(v) for k, v in seqs.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError("need as many of each: " + ", ".join(f"{n} {k}" for k, n in lengths.items()))


def _noise_batch(pipe: Any, seeds: Sequence[int], idx: range, res: int) -> torch.Tensor:
    return torch.cat([initial_noise(pipe, seeds[i], res) for i in idx])


def txt2img(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int = 28,
    guidance: float | None = DEFAULT_GUIDANCE,
    true_cfg_scale: float = 1.0,
    negative_prompt: str | Sequence[str] | None = None,
    resolution: int | None = None,
    batch_size: int | None = None,
    max_sequence_length: int = MAX_SEQUENCE_LENGTH,
    progress: Progress = None,
) -> list[Image.Image]:
    """One image per (prompt, seed): flow-matching Euler over ``steps`` from seeded noise, with FLUX.1-dev's
    ``guidance`` embedding (ignored by schnell-like models) and optional true CFG against ``negative_prompt``."""
    prompts, seeds = list(prompts), list(seeds)
    _check_lengths(prompts=prompts, seeds=seeds)
    res = _resolution(pipe, resolution)
    bs = batch_size or default_batch_size(pipe)
    cond_all, uncond_all = _prompt_conds(pipe, prompts, negative_prompt, true_cfg_scale, max_sequence_length)
    side = _latent_side(res, _vae_scale(pipe))
    img_ids = image_ids(side, pipe.device, cond_all.embeds.dtype)
    out: list[Image.Image] = []
    for idx in _batches(len(prompts), bs):
        sel = slice(idx.start, idx.stop)
        sched = _pipe_schedule(pipe, steps, res)
        latents = pack_latents(_noise_batch(pipe, seeds, idx, res)).to(device=pipe.device, dtype=cond_all.embeds.dtype)
        batch = _Batch(latents, cond_all[sel], None if uncond_all is None else uncond_all[sel])
        latents = _denoise(pipe, sched, 0, batch, guidance, true_cfg_scale, img_ids, pad_to=bs if PAD_BATCHES else 0)
        out.extend(decode_latents(pipe, latents, res))
        if progress is not None:
            progress(len(out), len(prompts))
    return out


def sdedit(
    pipe: Any,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    strength: float | None = None,
    start: int | None = None,
    steps: int = 28,
    guidance: float | None = DEFAULT_GUIDANCE,
    true_cfg_scale: float = 1.0,
    negative_prompt: str | Sequence[str] | None = None,
    resolution: int | None = None,
    batch_size: int | None = None,
    max_sequence_length: int = MAX_SEQUENCE_LENGTH,
    progress: Progress = None,
) -> list[Image.Image]:
    """Text-guided SDEdit, one output per (image, prompt, seed), as ``FluxImg2ImgPipeline``: each source is
    fitted to the resolution and encoded once (the mode, ``(z - shift) * scale``), noised to the start
    sigma of :func:`sdedit_start` (``sigma * noise + (1 - sigma) * x0``), then denoised over the remaining
    steps. Raises ``ValueError`` when the start is pure noise."""
    images, prompts, seeds = list(images), list(prompts), list(seeds)
    _check_lengths(images=images, prompts=prompts, seeds=seeds)
    res = _resolution(pipe, resolution)
    if start is None:
        start, _ = sdedit_start(pipe, steps, float(strength if strength is not None else 0.86), res)
    elif not 0 <= start < steps:
        raise ValueError(f"start step {start} is outside the {steps} sampling steps")
    bs = batch_size or default_batch_size(pipe)
    cond_all, uncond_all = _prompt_conds(pipe, prompts, negative_prompt, true_cfg_scale, max_sequence_length)
    sources = _encode_images(pipe, images, res)
    side = _latent_side(res, _vae_scale(pipe))
    img_ids = image_ids(side, pipe.device, cond_all.embeds.dtype)
    out: list[Image.Image] = []
    for idx in _batches(len(images), bs):
        sel = slice(idx.start, idx.stop)
        sched = _pipe_schedule(pipe, steps, res)
        dtype = cond_all.embeds.dtype
        x0 = torch.cat([sources[i] for i in idx]).to(device=pipe.device, dtype=dtype)
        noise = _noise_batch(pipe, seeds, idx, res).to(device=pipe.device, dtype=dtype)
        sigma = sched.sigmas[start].to(device=pipe.device, dtype=dtype)
        latents = pack_latents(sigma * noise + (1.0 - sigma) * x0)
        batch = _Batch(latents, cond_all[sel], None if uncond_all is None else uncond_all[sel])
        latents = _denoise(pipe, sched, start, batch, guidance, true_cfg_scale, img_ids,
                           pad_to=bs if PAD_BATCHES else 0)
        out.extend(decode_latents(pipe, latents, res))
        if progress is not None:
            progress(len(out), len(images))
    return out


def kontext_reference_size(width: int, height: int, *, auto_resize: bool = True,
                           multiple_of: int = 16) -> tuple[int, int]:
    """The ``(width, height)`` ``FluxKontextPipeline`` gives a reference image of that size: with
    ``auto_resize``, the preferred Kontext resolution nearest in aspect ratio; rounded down to ``multiple_of``
    (2 x the VAE's downscale factor)."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    if auto_resize:
        aspect = width / height
        _, width, height = min((abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    return width // multiple_of * multiple_of, height // multiple_of * multiple_of


def instruct_edit(
    pipe: Any,
    images: Sequence[Image.Image],
    instructions: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int = 28,
    guidance: float | None = DEFAULT_GUIDANCE,
    true_cfg_scale: float = 1.0,
    negative_prompt: str | Sequence[str] | None = None,
    resolution: int | None = None,
    auto_resize: bool = True,
    batch_size: int | None = None,
    max_sequence_length: int = MAX_SEQUENCE_LENGTH,
    progress: Progress = None,
) -> list[Image.Image]:
    """Instruction edits, one output per (image, instruction, seed), as ``FluxKontextPipeline``: the output
    (``resolution``², from seeded noise over all ``steps``) attends to the reference image's latents
    appended as extra tokens with their own positions (index 1). The reference is center-cropped to a
    square and resized once to ``resolution``² (``auto_resize=False``) or to Kontext's preferred size for
    a square (1024², ``auto_resize=True``, the pipeline's default)."""
    images, instructions, seeds = list(images), list(instructions), list(seeds)
    _check_lengths(images=images, instructions=instructions, seeds=seeds)
    res = _resolution(pipe, resolution)
    vsf = _vae_scale(pipe)
    ref_size, _ = kontext_reference_size(res, res, auto_resize=auto_resize, multiple_of=2 * vsf)
    bs = batch_size or default_batch_size(pipe)
    cond_all, uncond_all = _prompt_conds(pipe, instructions, negative_prompt, true_cfg_scale, max_sequence_length)
    dtype = cond_all.embeds.dtype
    refs = _encode_images(pipe, images, ref_size)
    side = _latent_side(res, vsf)
    ref_side = refs[0].shape[-1]
    img_ids = torch.cat([image_ids(side, pipe.device, dtype), image_ids(ref_side, pipe.device, dtype, index=1)])
    out: list[Image.Image] = []
    for idx in _batches(len(images), bs):
        sel = slice(idx.start, idx.stop)
        sched = _pipe_schedule(pipe, steps, res)
        ref = pack_latents(torch.cat([refs[i] for i in idx]).to(device=pipe.device, dtype=dtype))
        latents = pack_latents(_noise_batch(pipe, seeds, idx, res)).to(device=pipe.device, dtype=dtype)
        batch = _Batch(latents, cond_all[sel], None if uncond_all is None else uncond_all[sel], ref)
        latents = _denoise(pipe, sched, 0, batch, guidance, true_cfg_scale, img_ids, pad_to=bs if PAD_BATCHES else 0)
        out.extend(decode_latents(pipe, latents, res))
        if progress is not None:
            progress(len(out), len(images))
    return out


__all__ = ["CPU_BATCH_SIZE", "CUDA_BATCH_SIZE", "PAD_BATCHES", "MAX_SEQUENCE_LENGTH", "FluxCond", "vae_scale_factor",
           "default_batch_size", "image_seq_len", "calculate_shift", "sdedit_start", "pack_latents", "unpack_latents",
           "image_ids", "initial_noise", "check_prompt", "encode_prompts", "text_ids",
           "image_to_tensor", "encode_image", "decode_latents", "txt2img", "sdedit", "kontext_reference_size",
           "instruct_edit"]
