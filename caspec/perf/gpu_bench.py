"""The GPU benchmark of issue 7: caspec against the diffusers reference patterns, measured in one process.

What it is for: telling, on one CUDA card, how fast caspec does a concept library's work compared with
the way diffusers' example scripts do the same work, and how close to the card's matrix-multiply rate
it runs; and, at ``tiny`` sizes on the CPU, running the very same code inside the test suite so that it
cannot rot between the (rare, short) sessions that have a GPU. ``bench/gpu.py`` is its command line.

Models are built with random weights (FLOPs and timings do not depend on weight values), so nothing
is downloaded. Size presets (:func:`preset`):

* ``sd15``: diffusers' ``UNet2DConditionModel()`` default config (``cross_attention_dim`` set to SD1.5's
  768, ``sample_size`` 64), the SD1.5 ``AutoencoderKL`` config (channels 128/256/512/512, 4 down/up
  blocks, 2 layers per block, 4 latent channels, scaling 0.18215), a CLIP ViT-L/14-shaped
  ``CLIPTextModel`` (hidden 768, 12 layers, 12 heads, intermediate 3072, vocab 49408, 77 positions),
  512x512 images;
* ``tiny``: caspec's embedded tiny configs (:mod:`caspec.models.tiny`) at 32x32, for the CPU.

The tokenizer is CLIP's real BPE, built as :mod:`caspec.models.tiny` builds it (``clip_vocab()``).
The models are built once (pristine copies kept on the CPU in fp32) and every measured run gets its
own fresh copies on the device, so runs never see each other's added tokens or LoRA adapters and a
run's peak memory counts exactly the modules it uses. Sections, each caspec against its reference,
every ratio computed from the numbers of the same run:

1. ``sdedit``: 8 variations of one root image (50 DDIM steps, strength 0.86, CFG 7.5), caspec's
   :func:`caspec.models.sampling.sdedit` (batch size as the edit step uses it) against diffusers'
   ``StableDiffusionImg2ImgPipeline`` built from the same UNet and text encoder, with a VAE in the
   same dtype (the reference pattern loads every component in one dtype; caspec keeps its VAE in fp32),
   ``safety_checker=None``, one CPU generator per candidate. Median wall time over the repeats.
2. ``train``: samples/s, step time, peak memory, counted FLOPs and losses of caspec's trainer
   (:func:`caspec.train.train_concept`, phase 1 alone and phase 2 alone, at each batch size) against
   :class:`ReferenceTI` (the pattern of diffusers' ``examples/textual_inversion/textual_inversion.py``)
   and :class:`ReferenceLoRA` (the pattern of ``examples/dreambooth/train_dreambooth_lora.py``),
   both re-implemented here. A run is ``warmup`` untimed steps, ``steps`` timed steps (wall clock from
   the end of the last warm-up step to the end of the last timed step, the device synchronised), then
   one more step under ``torch.utils.flop_counter.FlopCounterMode`` to count its FLOPs.
3. ``e2e``: one concept end to end as ``caspec run`` does it: a pipe for sampling, 8 SDEdit candidates,
   CLIP scores and caspec's select-clip decision (:func:`caspec.ops.select_clip.decide`), a fresh pipe,
   two-phase training at batch 4 (checkpoints and end-of-training previews at caspec's defaults), the
   asset written (and read back) in caspec's asset format. Run twice in the process: ``cold`` (first,
   before any other section, right after the models are built) and ``warm`` (last). With fewer steps
   than 1000 + 1000 the time of 1000 + 1000 is also projected from the run's own mean step times.
4. ``flops``: a measured matrix-multiply rate (bf16 on CUDA, fp32 on the CPU) and, per training row,
   the effective TFLOP/s of the step (counted FLOPs / step time) and its fraction of that rate.

Precision: on CUDA caspec's modules are in ``dtype`` (default bf16, the issue's target; VAE fp32)
with :class:`~caspec.train.TrainConfig`'s ``mixed_precision`` (default ``no``); the references follow
their scripts with ``--mixed_precision fp16``: fp16 frozen weights, fp32 trained parameters, fp16
autocast around the forward of every model the script hands to ``accelerator.prepare`` (outputs
converted to fp32, as accelerate does) and a GradScaler. On the CPU everything is fp32, without
autocast or GradScaler. Peak memory is ``torch.cuda.max_memory_allocated`` (None on the CPU).

Entry points: :func:`settings_for` (defaults per size), :func:`run_benchmark` (returns the report
dict; ``on_section`` sees it after every section, so a killed run still leaves its finished sections),
:func:`markdown` (the report as a table), :func:`fnum` (how every figure is printed).
"""
from __future__ import annotations

import copy
import datetime as _dt
import gc
import importlib
import importlib.metadata
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

SECTIONS = ("sdedit", "train", "e2e", "flops")
REPORT_FORMAT = "caspec-gpu-bench"
REPORT_VERSION = 1
MIB = 2 ** 20
COLOURS = ("silver", "purple", "gold", "red", "green", "blue", "orange", "white", "black", "pink")
_PALETTE = [(220, 40, 40), (40, 180, 60), (40, 70, 220), (230, 200, 30), (200, 60, 200), (30, 200, 200)]
REF_LR_TI = 5e-3  # textual_inversion.py's --learning_rate as caspec uses it (lr_embeddings)
REF_WEIGHT_DECAY = 1e-2  # both scripts' --adam_weight_decay default
REF_MAX_GRAD_NORM = 1.0  # train_dreambooth_lora.py's --max_grad_norm default
REF_UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj")  # train_dreambooth_lora.py
REF_TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


# ---------------------------------------------------------------------------------------------
# sizes


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
    from ..models.tiny import TEXT_CONFIG, UNET_CONFIG, VAE_CONFIG

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


# ---------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class BenchSettings:
    """Everything one benchmark run does (see :func:`settings_for` for the defaults per size)."""

    size: str = "tiny"
    device: str = "cpu"
    dtype: str = "fp32"  # caspec's UNet/text-encoder dtype (fp32 | fp16 | bf16); its VAE stays fp32
    ref_precision: str = "no"  # the reference scripts' --mixed_precision: no | fp16 | bf16
    mixed_precision: str = "no"  # caspec TrainConfig.mixed_precision
    seed: int = 0
    sections: tuple[str, ...] = SECTIONS
    sdedit_variations: int = 8
    sdedit_steps: int = 50
    sdedit_strength: float = 0.86
    sdedit_guidance: float = 7.5
    sdedit_repeats: int = 3
    train_batches: tuple[int, ...] = (1, 4)
    train_images: int = 4
    train_warmup: int = 3
    train_steps: int = 10
    e2e_phase1_steps: int = 1000
    e2e_phase2_steps: int = 1000
    e2e_candidates: int = 8
    e2e_keep: int = 4
    e2e_batch: int = 4
    clip_model: str = "ViT-B-32"
    matmul_n: int = 8192
    matmul_iters: int = 10

    def validate(self) -> None:
        if self.size not in PRESET_NAMES:
            raise ValueError(f"size must be one of {', '.join(PRESET_NAMES)}, got {self.size!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        for name in ("ref_precision", "mixed_precision"):
            if getattr(self, name) not in ("no", "fp16", "bf16"):
                raise ValueError(f"{name} must be no, fp16 or bf16, got {getattr(self, name)!r}")
        if self.device == "cpu" and "fp16" in (self.dtype, self.ref_precision, self.mixed_precision):
            raise ValueError("fp16 needs CUDA (GradScaler); on the CPU use fp32 (or bf16)")
        unknown = [s for s in self.sections if s not in SECTIONS]
        if unknown or not self.sections:
            raise ValueError(f"sections must be some of {', '.join(SECTIONS)}, got {list(self.sections)}")
        if self.train_warmup < 1 or self.train_steps < 1:
            raise ValueError("train_warmup and train_steps must be >= 1 (the first step is never timed)")
        if self.sdedit_repeats < 1 or self.sdedit_variations < 1 or self.sdedit_steps < 1:
            raise ValueError("sdedit_repeats, sdedit_variations and sdedit_steps must be >= 1")
        if int(self.sdedit_steps * self.sdedit_strength) < 1:
            raise ValueError("sdedit_steps x sdedit_strength must be >= 1")
        if not 1 <= self.e2e_keep <= self.e2e_candidates:
            raise ValueError("e2e_keep must be between 1 and e2e_candidates")
        if self.e2e_phase1_steps < 0 or self.e2e_phase2_steps < 0 or self.e2e_phase1_steps + self.e2e_phase2_steps < 1:
            raise ValueError("e2e phase steps must be >= 0 and add up to at least 1")
        if not self.train_batches or min(self.train_batches) < 1 or self.train_images < 1:
            raise ValueError("train_batches and train_images must be >= 1")


_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def settings_for(size: str, device: str, *, quick: bool = False, phase1_steps: int | None = None,
                 phase2_steps: int | None = None, **overrides: Any) -> BenchSettings:
    """The defaults for ``size`` on ``device``: caspec in bf16 and the references in fp16 mixed precision
    on CUDA, fp32 everywhere on the CPU. ``quick``: fewer repeats and steps (a smoke run, not figures to
    report). ``phase1_steps``/``phase2_steps``: the end-to-end training steps (default: the preset's)."""
    p = preset(size)
    cuda = device == "cuda"
    s = BenchSettings(size=size, device=device, dtype="bf16" if cuda else "fp32",
                      ref_precision="fp16" if cuda else "no", clip_model=p.clip_model,
                      e2e_phase1_steps=p.e2e_phase1_steps, e2e_phase2_steps=p.e2e_phase2_steps,
                      matmul_n=p.matmul_n if cuda else min(p.matmul_n, 512))
    if size == "tiny":
        s = replace(s, sdedit_repeats=2, train_warmup=2, train_steps=5)
    if quick:
        s = replace(s, sdedit_repeats=1, train_warmup=1, train_steps=3, matmul_iters=3,
                    matmul_n=min(s.matmul_n, 4096 if cuda else 256),
                    e2e_phase1_steps=min(s.e2e_phase1_steps, 10), e2e_phase2_steps=min(s.e2e_phase2_steps, 10))
    if phase1_steps is not None:
        s = replace(s, e2e_phase1_steps=int(phase1_steps))
    if phase2_steps is not None:
        s = replace(s, e2e_phase2_steps=int(phase2_steps))
    s = replace(s, **overrides)
    s.validate()
    return s


# ---------------------------------------------------------------------------------------------
# small helpers


def fnum(x: Any) -> str:
    """How every figure is printed in the markdown (4 significant digits; None as a dash)."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return f"{x:.4g}" if math.isfinite(x) else str(x)
    return str(x)


def fmib(n_bytes: int | None) -> str:
    """A byte count printed in MiB."""
    return fnum(None if n_bytes is None else n_bytes / MIB)


def fratio(x: float | None) -> str:
    """A caspec/reference ratio: the number and ``×`` (a dash when it could not be computed)."""
    return "—" if x is None else fnum(x) + "×"


def _torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, _DTYPES[name])


def _sync(device: Any) -> None:
    import torch

    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize()


def _free(device: Any) -> None:
    """Drop garbage and the CUDA cache, then start a fresh peak-memory window."""
    import torch

    gc.collect()
    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: Any) -> int | None:
    import torch

    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())
    return None


def _error(exc: BaseException) -> dict[str, Any]:
    return {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
            "traceback": traceback.format_exc(limit=12)}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


# ---------------------------------------------------------------------------------------------
# inputs


def make_root(resolution: int) -> Any:
    """A deterministic root image: a robot-ish figure of coloured blocks on a gradient."""
    import numpy as np
    from PIL import Image

    r = resolution
    y, x = np.mgrid[0:r, 0:r].astype(np.float32) / max(r - 1, 1)
    a = np.stack([90 + 80 * x, 100 + 60 * y, 140 + 50 * (1 - x)], axis=-1)
    u = r // 16 or 1
    blocks = [((6, 2), (10, 6), 0), ((5, 6), (11, 11), 2), ((3, 6), (5, 10), 1), ((11, 6), (13, 10), 1),
              ((6, 11), (7, 15), 3), ((9, 11), (10, 15), 3)]
    for (x0, y0), (x1, y1), c in blocks:
        a[y0 * u:y1 * u, x0 * u:x1 * u] = _PALETTE[c]
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), mode="RGB")


def make_items(n: int, resolution: int) -> list[tuple[Any, str]]:
    """``n`` training images (coloured squares on grey) with captions ``a photo of <dance1> <robotK>``."""
    import numpy as np
    from PIL import Image

    out = []
    for k in range(n):
        a = np.full((resolution, resolution, 3), 128, np.uint8)
        lo, hi = resolution // 4 + k % (resolution // 8 or 1), 3 * resolution // 4
        a[lo:hi, lo:hi] = _PALETTE[k % len(_PALETTE)]
        out.append((Image.fromarray(a, mode="RGB"), f"a photo of <dance1> <robot{k + 1}>"))
    return out


def make_words(n: int) -> list[Any]:
    """The paper's words: one shared ``<dance1>`` (init ``dance``) and ``<robotK>`` per image (init ``robot``)."""
    from ..train import PseudoWord

    return [PseudoWord("<dance1>", "dance", "constant")] + [
        PseudoWord(f"<robot{k}>", "robot", "varied") for k in range(1, n + 1)]


def edit_prompts(n: int) -> list[str]:
    return [f"a photo of a dancing {COLOURS[i % len(COLOURS)]} robot" for i in range(n)]


# ---------------------------------------------------------------------------------------------
# models


class Models:
    """Random-weight models of one preset: pristine fp32 copies on the CPU, fresh device copies on demand."""

    def __init__(self, p: Preset, device: str, dtype: str, seed: int = 0) -> None:
        import torch
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        from ..models import quiet_libraries
        from ..models.tiny import SCHEDULER_CONFIG, clip_vocab

        quiet_libraries()
        self.preset = p
        self.device = torch.device(device)
        self.dtype = _torch_dtype(dtype)
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

        from ..models.load import Pipe

        return Pipe(tokenizer=self.tokenizer(), text_encoder=self.module("text_encoder"), unet=self.module("unet"),
                    vae=self.module("vae", torch.float32), scheduler=self.scheduler, device=self.device,
                    dtype=self.dtype, resolution=self.resolution,
                    identity={"kind": "bench", "preset": self.preset.name, "seed": self.seed})


# ---------------------------------------------------------------------------------------------
# the reference training patterns


def _weight_dtype(precision: str) -> Any:
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
        self.weight_dtype = _weight_dtype(precision)
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
                         text_dtype=_weight_dtype(precision))
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


# ---------------------------------------------------------------------------------------------
# timing one training run


class _Probe:
    """Called after every optimizer step (caspec's ``progress`` callback, or by the reference loop):
    synchronises the device, stamps the time and the loss, and counts the FLOPs of step ``flop_step``
    (entering ``FlopCounterMode`` after step ``flop_step - 1``, leaving it after ``flop_step``)."""

    def __init__(self, device: Any, flop_step: int) -> None:
        self.device, self.flop_step = device, flop_step
        self.stamps: list[float] = []
        self.losses: list[float] = []
        self.phases: list[int] = []
        self.flops: int | None = None
        self._fc: Any = None

    def __call__(self, done: int, _total: int, info: dict[str, Any]) -> None:
        _sync(self.device)
        now = time.perf_counter()
        if self._fc is not None and done == self.flop_step:
            self._fc.__exit__(None, None, None)
            self.flops = int(self._fc.get_total_flops())
            self._fc = None
        self.stamps.append(now)
        self.losses.append(float(info["loss"]))
        self.phases.append(int(info.get("phase", 0)))
        if done == self.flop_step - 1:
            from torch.utils.flop_counter import FlopCounterMode

            self._fc = FlopCounterMode(display=False)
            self._fc.__enter__()

    def close(self) -> None:
        if self._fc is not None:
            self._fc.__exit__(None, None, None)
            self._fc = None

    def summary(self, batch: int, warmup: int, steps: int) -> dict[str, Any]:
        if len(self.stamps) < warmup + steps:
            raise RuntimeError(f"only {len(self.stamps)} steps ran, {warmup + steps} needed")
        seconds = self.stamps[warmup + steps - 1] - self.stamps[warmup - 1]
        if seconds <= 0:
            raise RuntimeError("the timed steps took no time")
        step_s = seconds / steps
        out: dict[str, Any] = {
            "timed_steps": steps,
            "timed_s": seconds,
            "step_ms": 1000.0 * step_s,
            "samples_per_s": batch * steps / seconds,
            "losses": list(self.losses),
            "loss_first": self.losses[0],
            "loss_last": self.losses[-1],
            "loss_mean": sum(self.losses) / len(self.losses),
            "flops_per_step": self.flops,
            "gflop_per_sample": None if self.flops is None else self.flops / batch / 1e9,
            "effective_tflops": None if self.flops is None else self.flops / step_s / 1e12,
        }
        return out


def _caspec_run(models: Models, s: BenchSettings, phase: int, batch: int, work: Path) -> dict[str, Any]:
    from ..train import TrainConfig, train_concept

    total = s.train_warmup + s.train_steps + 1
    _free(models.device)
    t0 = time.perf_counter()
    pipe = models.pipe()
    cfg = TrainConfig(phase1_steps=total if phase == 1 else 0, phase2_steps=total if phase == 2 else 0,
                      batch_size=batch, checkpoint_every=0, preview_every=0, seed=s.seed,
                      mixed_precision=s.mixed_precision)
    probe = _Probe(models.device, total)
    out = Path(tempfile.mkdtemp(prefix=f"caspec-p{phase}-b{batch}-", dir=work))
    try:
        train_concept(pipe, make_words(s.train_images), make_items(s.train_images, models.resolution), cfg,
                      out / "asset", checkpoint_dir=out / "checkpoint", preview_prompts=[], progress=probe)
    finally:
        probe.close()
    result = probe.summary(batch, s.train_warmup, s.train_steps)
    result["peak_mem_bytes"] = _peak(models.device)
    result["run_s"] = time.perf_counter() - t0
    del pipe
    shutil.rmtree(out, ignore_errors=True)
    _free(models.device)
    return result


def _reference_run(models: Models, s: BenchSettings, phase: int, batch: int) -> dict[str, Any]:
    total = s.train_warmup + s.train_steps + 1
    _free(models.device)
    t0 = time.perf_counter()
    cls = ReferenceTI if phase == 1 else ReferenceLoRA
    ref = cls(models, make_words(s.train_images), make_items(s.train_images, models.resolution), batch=batch,
              precision=s.ref_precision, seed=s.seed)
    probe = _Probe(models.device, total)
    try:
        for i in range(total):
            loss = ref.step()
            probe(i + 1, total, {"loss": loss, "phase": phase})
    finally:
        probe.close()
    result = probe.summary(batch, s.train_warmup, s.train_steps)
    result["peak_mem_bytes"] = _peak(models.device)
    result["run_s"] = time.perf_counter() - t0
    del ref
    _free(models.device)
    return result


# ---------------------------------------------------------------------------------------------
# sections


def bench_sdedit(models: Models, s: BenchSettings) -> dict[str, Any]:
    """Section 1: caspec's ``sdedit`` vs diffusers' img2img pipeline, same modules, same dtype."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

    from ..models.sampling import default_batch_size, sdedit
    from ..ops.images import pixel_digest
    from ..ops.seeds import derive_seed

    _free(models.device)
    pipe = models.pipe()
    ref = StableDiffusionImg2ImgPipeline(
        vae=models.module("vae", models.dtype), text_encoder=pipe.text_encoder, tokenizer=models.tokenizer(),
        unet=pipe.unet, scheduler=DDIMScheduler.from_config(pipe.scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    n, res = s.sdedit_variations, models.resolution
    root = make_root(res)
    prompts = edit_prompts(n)
    digest = pixel_digest(root)
    seeds = [derive_seed(s.seed, "edit", digest, p, 0) for p in prompts]
    batch_size = default_batch_size(pipe)

    def caspec_side() -> list[Any]:
        return sdedit(pipe, [root] * n, prompts, seeds, strength=s.sdedit_strength, steps=s.sdedit_steps,
                      guidance_scale=s.sdedit_guidance, negative_prompt="", resolution=res, batch_size=batch_size)

    def reference_side() -> list[Any]:
        gens = [torch.Generator("cpu").manual_seed(x) for x in seeds]
        with torch.inference_mode():
            return ref(prompt=prompts, image=root, strength=s.sdedit_strength, num_inference_steps=s.sdedit_steps,
                       guidance_scale=s.sdedit_guidance, generator=gens, output_type="pil").images

    sides = {"caspec": caspec_side, "reference": reference_side}
    times: dict[str, list[float]] = {"caspec": [], "reference": []}
    warm: dict[str, float] = {}
    for name, fn in sides.items():  # warm-up (first call: kernels, allocator)
        _sync(models.device)
        t0 = time.perf_counter()
        images = fn()
        _sync(models.device)
        warm[name] = time.perf_counter() - t0
        if len(images) != n:
            raise RuntimeError(f"{name} made {len(images)} images, {n} expected")
    for r in range(s.sdedit_repeats):
        order = ("caspec", "reference") if r % 2 == 0 else ("reference", "caspec")
        for name in order:
            _sync(models.device)
            t0 = time.perf_counter()
            sides[name]()
            _sync(models.device)
            times[name].append(time.perf_counter() - t0)
    out: dict[str, Any] = {"variations": n, "steps": s.sdedit_steps, "strength": s.sdedit_strength,
                           "guidance_scale": s.sdedit_guidance, "denoising_steps": int(s.sdedit_steps * s.sdedit_strength),
                           "caspec_batch_size": batch_size, "repeats": s.sdedit_repeats}
    for name in sides:
        med = _median(times[name])
        out[name] = {"runs_s": times[name], "median_s": med, "warmup_s": warm[name], "images_per_s": n / med}
    out["ratio_images_per_s"] = out["caspec"]["images_per_s"] / out["reference"]["images_per_s"]
    pipe = ref = None  # the closures above hold them: release the modules before freeing memory
    _free(models.device)
    return out


def bench_train(models: Models, s: BenchSettings, work: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Section 2: caspec's phase 1 / phase 2 against the reference patterns at each batch size."""
    rows = []
    for phase in (1, 2):
        for batch in s.train_batches:
            row: dict[str, Any] = {"phase": phase, "batch": batch,
                                   "reference_pattern": "textual_inversion.py" if phase == 1 else "train_dreambooth_lora.py"}
            for side in ("caspec", "reference"):
                try:
                    row[side] = (_caspec_run(models, s, phase, batch, work) if side == "caspec"
                                 else _reference_run(models, s, phase, batch))
                    log(f"train phase {phase} batch {batch} {side}: {row[side]['samples_per_s']:.3f} samples/s")
                except Exception as exc:  # noqa: BLE001 - one failed run must not lose the others
                    row[side] = _error(exc)
                    log(f"train phase {phase} batch {batch} {side}: FAILED {row[side]['error']}")
                    _free(models.device)
            c, r = row["caspec"], row["reference"]
            ok = "error" not in c and "error" not in r
            row["ratio_samples_per_s"] = c["samples_per_s"] / r["samples_per_s"] if ok else None
            row["ratio_peak_mem"] = (c["peak_mem_bytes"] / r["peak_mem_bytes"]
                                     if ok and c["peak_mem_bytes"] and r["peak_mem_bytes"] else None)
            rows.append(row)
    return {"warmup_steps": s.train_warmup, "timed_steps": s.train_steps, "images": s.train_images,
            "caspec_dtype": s.dtype, "caspec_mixed_precision": s.mixed_precision,
            "reference_precision": s.ref_precision, "rows": rows}


def bench_matmul(device: Any, n: int, iters: int) -> dict[str, Any]:
    """Section 4 (first half): the measured matmul rate, bf16 on CUDA, fp32 on the CPU."""
    import torch

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn((n, n), device=device, dtype=dtype, generator=g)
    b = torch.randn((n, n), device=device, dtype=dtype, generator=g)
    for _ in range(3 if device.type == "cuda" else 1):
        torch.mm(a, b)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        torch.mm(a, b)
    _sync(device)
    seconds = time.perf_counter() - t0
    del a, b
    return {"dtype": str(dtype).replace("torch.", ""), "n": n, "iters": iters, "seconds": seconds,
            "tflops": 2.0 * n ** 3 * iters / seconds / 1e12}


def bench_e2e(models: Models, s: BenchSettings, work: Path, label: str) -> dict[str, Any]:
    """Section 3: one concept end to end (8 SDEdit candidates, CLIP selection, training, asset)."""
    from ..assets.format import load_asset, write_card
    from ..metrics.clip import ClipSpec, load_clip
    from ..models.sampling import default_batch_size, sdedit
    from ..ops.images import pixel_digest
    from ..metrics.edit_score import score_candidate
    from ..ops.select_clip import Settings, decide
    from ..ops.seeds import derive_seed
    from ..train import TrainConfig, train_concept

    _free(models.device)
    dev = models.device
    parts: dict[str, float] = {}
    clock = time.perf_counter
    t_start = clock()

    t0 = clock()
    pipe = models.pipe()  # the shared sampling pipe (load_pipeline's cached one)
    parts["load_s"] = clock() - t0

    t0 = clock()
    n, res = s.e2e_candidates, models.resolution
    root = make_root(res)
    prompts = edit_prompts(n)
    digest = pixel_digest(root)
    seeds = [derive_seed(s.seed, "edit", digest, p, 0) for p in prompts]
    candidates = sdedit(pipe, [root] * n, prompts, seeds, strength=s.sdedit_strength, steps=s.sdedit_steps,
                        guidance_scale=s.sdedit_guidance, negative_prompt="", resolution=res,
                        batch_size=default_batch_size(pipe))
    _sync(dev)
    parts["sdedit_s"] = clock() - t0

    t0 = clock()
    clip = load_clip(ClipSpec(s.clip_model, pretrained="random"), device=str(dev))  # timing only: random weights
    emb = clip.embed_images(list(candidates) + [root])
    cand, src = emb[:n], emb[n]
    uniq = sorted(set(prompts))
    text_emb = clip.embed_texts(uniq)
    scores = [score_candidate(cand[i], source=src, prompt=text_emb[uniq.index(prompts[i])]) for i in range(n)]
    decision = decide(scores, (cand @ cand.T).tolist(), Settings(count=s.e2e_keep, min_direction=None,
                                                                  min_relative_direction=None),
                      [f"s0-p{i}-c0" for i in range(n)])
    if decision.problem:
        raise RuntimeError(f"CLIP selection: {decision.problem}")
    kept = sorted(decision.kept)
    parts["clip_s"] = clock() - t0

    t0 = clock()
    tpipe = models.pipe()  # load_pipeline(..., fresh=True): the trainer changes it
    parts["load_fresh_s"] = clock() - t0

    t0 = clock()
    k = len(kept)
    words = make_words(k)
    items = [(candidates[i], f"a photo of <dance1> <robot{j + 1}>") for j, i in enumerate(kept)]
    cfg = TrainConfig(phase1_steps=s.e2e_phase1_steps, phase2_steps=s.e2e_phase2_steps, batch_size=s.e2e_batch,
                      seed=s.seed, mixed_precision=s.mixed_precision)  # checkpoints and previews: caspec's defaults
    out = Path(tempfile.mkdtemp(prefix=f"e2e-{label}-", dir=work))
    probe = _Probe(dev, flop_step=-1)
    summary = train_concept(tpipe, words, items, cfg, out / "asset", checkpoint_dir=out / "checkpoint",
                            progress=probe)
    _sync(dev)
    parts["train_s"] = clock() - t0

    t0 = clock()
    write_card(out / "asset", {"name": "bench", "tokens": [w.token for w in words],
                               "captions": [c for _, c in items], "train": cfg.to_dict(),
                               "final_loss": summary.get("final_loss")})
    asset = load_asset(out / "asset")
    files = sorted(p.name for p in (out / "asset").iterdir())
    parts["save_s"] = clock() - t0
    total = clock() - t_start

    stamps, p1, p2 = probe.stamps, s.e2e_phase1_steps, s.e2e_phase2_steps
    loop_s = stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0
    p1_step = (stamps[p1 - 1] - stamps[0]) / (p1 - 1) if p1 >= 2 else None
    p2_step = (stamps[p1 + p2 - 1] - stamps[p1]) / (p2 - 1) if p2 >= 2 else None
    projected = None
    if p1_step is not None and p2_step is not None:
        projected = total - loop_s + 1000 * p1_step + 1000 * p2_step
    result = {
        "label": label, "total_s": total, "parts": parts, "phase1_steps": p1, "phase2_steps": p2,
        "batch": s.e2e_batch, "candidates": n, "kept": [f"s0-p{i}-c0" for i in kept],
        "clip_model": s.clip_model, "train_loop_s": loop_s, "train_outside_loop_s": parts["train_s"] - loop_s,
        "phase1_step_ms": None if p1_step is None else 1000 * p1_step,
        "phase2_step_ms": None if p2_step is None else 1000 * p2_step,
        "projected_1000_1000_s": projected,
        "initial_loss": summary.get("initial_loss"), "final_loss": summary.get("final_loss"),
        "losses": list(probe.losses), "asset_files": files, "asset_tokens": list(asset.tokens),
        "peak_mem_bytes": _peak(dev),
    }
    del pipe, tpipe, clip
    shutil.rmtree(out, ignore_errors=True)
    _free(dev)
    return result


# ---------------------------------------------------------------------------------------------
# the whole run


def _meta(s: BenchSettings, command: str | None) -> dict[str, Any]:
    import torch

    cuda = s.device == "cuda"
    return {
        "format": REPORT_FORMAT, "version": REPORT_VERSION,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": command or " ".join([Path(sys.executable).name] + sys.argv),
        "size": s.size, "device": s.device,
        "card": torch.cuda.get_device_name(0) if cuda else cpu_name(),
        "cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "platform": platform.platform(),
        "versions": {d: _version(d) for d in ("torch", "diffusers", "transformers", "peft", "open_clip_torch",
                                               "accelerate", "safetensors", "tokenizers", "huggingface_hub")},
        "cuda": torch.version.cuda if cuda else None,
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s).items()},
    }


def run_benchmark(s: BenchSettings, *, command: str | None = None,
                  on_section: Callable[[dict[str, Any]], None] | None = None,
                  log: Callable[[str], None] = lambda _m: None, work_dir: str | Path | None = None) -> dict[str, Any]:
    """Run the sections of ``s`` and return the report (see the module docstring for what is measured).

    A section that fails is recorded as ``{"error": ..., "traceback": ...}`` and the run goes on.
    ``on_section(report)`` is called after the models are built and after every section."""
    import torch

    s.validate()
    if s.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    report: dict[str, Any] = {"meta": _meta(s, command)}
    devices = [0] if s.device == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # the references seed the global RNG: leave the caller's alone
        _run_sections(s, report, on_section or (lambda _r: None), log, work_dir)
    return report


def _run_sections(s: BenchSettings, report: dict[str, Any], notify: Callable[[dict[str, Any]], None],
                  log: Callable[[str], None], work_dir: str | Path | None) -> None:
    work = Path(tempfile.mkdtemp(prefix="caspec-gpu-bench-", dir=work_dir))
    t_all = time.perf_counter()
    try:
        t0 = time.perf_counter()
        for name in ("diffusers", "transformers", "peft", "caspec.train.trainer"):  # part of a cold start
            importlib.import_module(name)
        report["meta"]["import_s"] = time.perf_counter() - t0
        log(f"building the {s.size} models on {s.device} ...")
        try:
            models = Models(preset(s.size), s.device, s.dtype, s.seed)
        except Exception as exc:  # noqa: BLE001 - recorded, and nothing else can run
            report["build"] = _error(exc)
            log(f"building the models FAILED: {report['build']['error']}")
            notify(report)
            return
        report["build"] = {"seconds": models.build_s, "parameters": models.params, "resolution": models.resolution}
        log(f"built in {models.build_s:.1f} s: {models.params}")
        notify(report)

        def section(name: str, fn: Callable[[], dict[str, Any]]) -> None:
            log(f"section {name} ...")
            t = time.perf_counter()
            try:
                report[name] = fn()
            except Exception as exc:  # noqa: BLE001
                report[name] = _error(exc)
                log(f"section {name} FAILED: {report[name]['error']}")
                _free(models.device)
            if isinstance(report[name], dict):
                report[name]["section_s"] = time.perf_counter() - t
            log(f"section {name} done in {time.perf_counter() - t:.1f} s")
            _derive(report)
            notify(report)

        if "e2e" in s.sections:
            section("e2e_cold", lambda: bench_e2e(models, s, work, "cold"))
        if "flops" in s.sections:
            section("matmul", lambda: bench_matmul(models.device, s.matmul_n, s.matmul_iters))
        if "sdedit" in s.sections:
            section("sdedit", lambda: bench_sdedit(models, s))
        if "train" in s.sections:
            section("train", lambda: bench_train(models, s, work, log))
        if "e2e" in s.sections:
            section("e2e_warm", lambda: bench_e2e(models, s, work, "warm"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["meta"]["total_s"] = time.perf_counter() - t_all
    try:
        import resource

        report["meta"]["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except Exception:  # noqa: BLE001 - not on every platform
        report["meta"]["max_rss_bytes"] = None
    _derive(report)
    notify(report)


def _derive(report: dict[str, Any]) -> None:
    """The figures computed from others: fractions of the matmul rate, the targets' verdicts."""
    mm = report.get("matmul")
    peak = mm.get("tflops") if isinstance(mm, dict) and "error" not in mm else None
    train = report.get("train")
    if isinstance(train, dict) and "rows" in train:
        for row in train["rows"]:
            for side in ("caspec", "reference"):
                r = row.get(side)
                if isinstance(r, dict) and "error" not in r:
                    eff = r.get("effective_tflops")
                    r["fraction_of_matmul"] = eff / peak if eff is not None and peak else None


# ---------------------------------------------------------------------------------------------
# markdown


def _ok(x: Any) -> bool:
    return isinstance(x, dict) and "error" not in x


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: the machine, the command, every figure and every caspec/reference ratio."""
    m = report["meta"]
    st = m["settings"]
    v = m["versions"]
    lines = [f"# caspec GPU benchmark: {m['size']} on {m['card']}", "",
             f"- date: {m['date']}",
             f"- command: `{m['command']}`",
             f"- device: {m['device']} ({m['card']}); CPU {m['cpu']}, {m['cpu_count']} cores, "
             f"{m['torch_threads']} torch threads; Python {m['python']}"
             + (f", CUDA {m['cuda']}" if m.get("cuda") else ""),
             "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
             f"- precision: caspec {st['dtype']} (VAE fp32, mixed_precision {st['mixed_precision']}); "
             f"references `--mixed_precision {st['ref_precision']}`",
             f"- import {fnum(m.get('import_s'))} s; total run {fnum(m.get('total_s'))} s; "
             f"process max RSS {fmib(m.get('max_rss_bytes'))} MiB"]
    b = report.get("build")
    if _ok(b):
        lines.append(f"- models (random weights, {b['resolution']}×{b['resolution']}): built in {fnum(b['seconds'])} s; "
                     + ", ".join(f"{k} {fnum(n / 1e6)} M params" for k, n in b["parameters"].items()))
    elif b is not None:
        lines.append(f"- building the models FAILED: {b.get('error')}")
    lines.append("- ratios are caspec / reference of the same run (rates: above 1 = caspec faster; "
                 "memory: below 1 = caspec smaller)")

    sd = report.get("sdedit")
    lines += ["", "## 1. SDEdit"]
    if _ok(sd):
        lines += [f"{sd['variations']} variations of one root, {sd['steps']} DDIM steps at strength {fnum(sd['strength'])} "
                  f"({sd['denoising_steps']} denoised), CFG {fnum(sd['guidance_scale'])}; median of {sd['repeats']} "
                  f"after one warm-up; caspec batch size {sd['caspec_batch_size']}", "",
                  "| side | median s | runs s | warm-up s | images/s |", "|---|---|---|---|---|"]
        for name, title in (("caspec", "caspec `sdedit`"), ("reference", "diffusers `StableDiffusionImg2ImgPipeline`")):
            r = sd[name]
            lines.append(f"| {title} | {fnum(r['median_s'])} | {', '.join(fnum(x) for x in r['runs_s'])} | "
                         f"{fnum(r['warmup_s'])} | {fnum(r['images_per_s'])} |")
        lines += ["", f"caspec / reference images/s: **{fratio(sd['ratio_images_per_s'])}**"]
    elif sd is not None:
        lines.append(f"FAILED: {sd.get('error')}")

    tr = report.get("train")
    lines += ["", "## 2. Training steps"]
    if _ok(tr):
        lines += [f"{tr['warmup_steps']} warm-up steps, {tr['timed_steps']} timed steps, then 1 step counted by "
                  f"FlopCounterMode; {tr['images']} images. Phase 1 reference: `textual_inversion.py` pattern; "
                  "phase 2 reference: `train_dreambooth_lora.py` pattern (LoRA only; caspec's phase 2 also trains "
                  "the new embedding rows). caspec caches latents; the references VAE-encode every step, so "
                  "their counted FLOPs include the encoder.", "",
                  "| phase | batch | side | samples/s | step ms | peak MiB | GFLOP/sample | effective TFLOP/s | "
                  "of matmul | loss first | loss last | loss mean |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in tr["rows"]:
            for side in ("caspec", "reference"):
                r = row[side]
                if not _ok(r):
                    lines.append(f"| {row['phase']} | {row['batch']} | {side} | FAILED: {r.get('error')} "
                                 "| | | | | | | | |")
                    continue
                lines.append(f"| {row['phase']} | {row['batch']} | {side} | {fnum(r['samples_per_s'])} | "
                             f"{fnum(r['step_ms'])} | {fmib(r['peak_mem_bytes'])} | {fnum(r['gflop_per_sample'])} | "
                             f"{fnum(r['effective_tflops'])} | {fnum(r.get('fraction_of_matmul'))} | "
                             f"{fnum(r['loss_first'])} | {fnum(r['loss_last'])} | {fnum(r['loss_mean'])} |")
        lines += ["", "| phase | batch | caspec / reference samples/s | caspec / reference peak memory |",
                  "|---|---|---|---|"]
        for row in tr["rows"]:
            lines.append(f"| {row['phase']} | {row['batch']} | **{fratio(row['ratio_samples_per_s'])}** | "
                         f"{fratio(row['ratio_peak_mem'])} |")
    elif tr is not None:
        lines.append(f"FAILED: {tr.get('error')}")

    lines += ["", "## 3. One concept end to end"]
    runs = [(name, report.get(name)) for name in ("e2e_cold", "e2e_warm") if name in report]
    good = [(name, r) for name, r in runs if _ok(r)]
    if good:
        r0 = good[0][1]
        lines += [f"{r0['candidates']} SDEdit candidates, CLIP selection (`{r0['clip_model']}`, keep "
                  f"{len(r0['kept'])}), {r0['phase1_steps']} + {r0['phase2_steps']} training steps at batch "
                  f"{r0['batch']}, asset written and read back. cold: the first work in the process (after the "
                  "model build); warm: the last.", "",
                  "| run | total s | load | sdedit | clip | load fresh | train | save | train loop | "
                  "phase 1 step ms | phase 2 step ms | projected 1000+1000 s | peak MiB | loss initial | loss final |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in good:
            p = r["parts"]
            lines.append(f"| {r['label']} | {fnum(r['total_s'])} | {fnum(p['load_s'])} | {fnum(p['sdedit_s'])} | "
                         f"{fnum(p['clip_s'])} | {fnum(p['load_fresh_s'])} | {fnum(p['train_s'])} | "
                         f"{fnum(p['save_s'])} | {fnum(r['train_loop_s'])} | {fnum(r['phase1_step_ms'])} | "
                         f"{fnum(r['phase2_step_ms'])} | {fnum(r['projected_1000_1000_s'])} | "
                         f"{fmib(r['peak_mem_bytes'])} | {fnum(r['initial_loss'])} | {fnum(r['final_loss'])} |")
        lines.append("")
        lines.append(f"asset files: {', '.join(r0['asset_files'])}")
    for name, r in runs:
        if not _ok(r):
            lines.append(f"{name} FAILED: {r.get('error') if isinstance(r, dict) else r}")

    lines += ["", "## 4. Hardware rate"]
    mm = report.get("matmul")
    if _ok(mm):
        lines.append(f"measured {mm['dtype']} matmul ({mm['n']}×{mm['n']}×{mm['n']}, {mm['iters']} iterations): "
                     f"**{fnum(mm['tflops'])} TFLOP/s**; each training row's effective TFLOP/s and its fraction of "
                     "this rate are in section 2.")
    elif mm is not None:
        lines.append(f"FAILED: {mm.get('error')}")
    return "\n".join(lines) + "\n"


__all__ = ["PRESET_NAMES", "SECTIONS", "BenchSettings", "Models", "Preset", "ReferenceLoRA", "ReferenceTI",
           "bench_e2e", "bench_matmul", "bench_sdedit", "bench_train", "fmib", "fnum", "fratio", "markdown", "preset",
           "run_benchmark", "settings_for"]
