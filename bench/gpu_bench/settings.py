"""The GPU benchmark's settings: what one run does (:class:`BenchSettings`), its checks, and the defaults per
size and device (:func:`settings_for`)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .models import DTYPES, PRESET_NAMES, preset

SECTIONS = ("sdedit", "train", "e2e", "flops")


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
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
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
