"""Training settings (:class:`TrainConfig`, defaults = the paper's) and pseudo-words (:class:`PseudoWord`).

Everything that can be checked without a model is checked on construction (``ValueError`` with a
message naming the setting); target modules are checked against the model by the trainer.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

ROLES = ("constant", "varied")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
TIMESTEP_SAMPLINGS = ("uniform", "cubic")
SHIFT_PHASES = ("both", "phase2")
PLACE_WORDS = frozenset("""left right top bottom center centre middle corner corners edge edges side sides upper lower
above below beside near far place position positions location spot here there""".split())
"""Words about place: an asset whose init words or captions use one learns where, and position augmentation
(which moves the object) is refused for it."""


def place_words(texts: list[str]) -> list[str]:
    """The words of :data:`PLACE_WORDS` that ``texts`` use (angle-bracketed pseudo-words ignored)."""
    import re

    found = []
    for text in texts:
        for word in re.findall(r"[A-Za-z]+", re.sub(r"<[^<>]*>", " ", text or "")):
            if word.lower() in PLACE_WORDS and word.lower() not in found:
                found.append(word.lower())
    return found


@dataclass(frozen=True)
class PseudoWord:
    """A new token learned by textual inversion.

    ``token``: the new word, e.g. ``<dance1>``; ``init_word``: an ordinary word whose (first) token's
    embedding row seeds the new row; ``role``: ``constant`` (the shared attribute A1, one word for
    every image) or ``varied`` (Bk, one word per image).
    """

    token: str
    init_word: str
    role: str
    vectors: int = 1  # embedding vectors (sub-tokens) the word occupies; 1 = the paper's setting

    def __post_init__(self) -> None:
        if isinstance(self.vectors, bool) or not isinstance(self.vectors, int) or not 1 <= self.vectors <= 16:
            raise ValueError(f"pseudo-word {self.token}: vectors must be an integer from 1 to 16, got {self.vectors!r}")
        if not isinstance(self.token, str) or not self.token.strip() or self.token != self.token.strip():
            raise ValueError(f"pseudo-word token {self.token!r} must be a non-empty string without surrounding spaces")
        if any(c.isspace() for c in self.token):
            raise ValueError(f"pseudo-word token {self.token!r} must not contain spaces")
        if not isinstance(self.init_word, str) or not self.init_word.strip():
            raise ValueError(f"pseudo-word {self.token}: the initializer word must be a non-empty string")
        if self.role not in ROLES:
            raise ValueError(f"pseudo-word {self.token}: role must be one of {', '.join(ROLES)}, got {self.role!r}")

    @property
    def init(self) -> str:
        """Alias of ``init_word`` (the spec calls it ``init``)."""
        return self.init_word


@dataclass(frozen=True)
class TrainConfig:
    """Two-phase training settings; the defaults are the paper's (1000 + 1000 steps)."""

    phase1_steps: int = 1000  # embeddings only (multi-token textual inversion)
    phase2_steps: int = 1000  # embeddings + LoRA on text encoder and UNet
    phase2_embeddings: bool = True  # False: phase 2 trains LoRA only (ablation)
    lr_embeddings: float = 5e-3
    lr_lora_unet: float = 1e-4
    lr_lora_text: float = 5e-5
    lora_rank: int = 4
    lora_alpha: float = 4.0
    unet_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    text_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
    batch_size: int = 1
    grad_accum: int = 1
    mixed_precision: str = "no"  # no | fp16 | bf16 (autocast; fp16 adds a GradScaler and needs CUDA)
    seed: int = 0
    gradient_checkpointing: bool = False
    min_snr_gamma: float | None = None
    # uniform: t ~ U{0..T-1} (the paper); cubic: t = (1 - u^3) T, u ~ U[0, 1): high-noise timesteps, where the
    # layout is decided, are drawn more often (P(t >= T/2) = 0.79)
    timestep_sampling: str = "uniform"
    weight_decay: float = 1e-2
    checkpoint_every: int = 100  # optimizer steps; 0 = never
    preview_every: int = 0  # optimizer steps; 0 = only at the end
    cache_latents: bool = True  # VAE-encode each training image once instead of every step
    flip: bool = False  # random horizontal flips (augmentation)
    t5_lora: bool = False  # FLUX.1: phase 2 also puts LoRA on T5 (diffusers' Flux loader cannot load it)
    shift_px: int = 0  # position augmentation: each sample translated by up to this many pixels (0: off)
    shift_phases: str = "both"  # both | phase2: which phases shift their samples
    lora_window: Any = None  # [start, end] in t/T (recorded in the card), "auto" (measured), or None

    def __post_init__(self) -> None:
        # accept lists (from YAML/JSON) for the target tuples
        for name in ("unet_targets", "text_targets"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(value))
        self.validate()

    @property
    def total_steps(self) -> int:
        return self.phase1_steps + self.phase2_steps

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""

        def integer(name: str, low: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name} must be an integer, got {v!r}")
            if v < low:
                raise ValueError(f"{name} must be >= {low}, got {v}")

        def positive(name: str, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
            if v < 0 or (v == 0 and not allow_zero):
                raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {v}")

        integer("phase1_steps", 0)
        integer("phase2_steps", 0)
        if self.total_steps < 1:
            raise ValueError("phase1_steps + phase2_steps must be at least 1")
        for name in ("lr_embeddings", "lr_lora_unet", "lr_lora_text", "lora_alpha"):
            positive(name)
        positive("weight_decay", allow_zero=True)
        integer("lora_rank", 1)
        integer("batch_size", 1)
        integer("grad_accum", 1)
        integer("seed", 0)
        integer("checkpoint_every", 0)
        integer("preview_every", 0)
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {', '.join(MIXED_PRECISIONS)}, got {self.mixed_precision!r}")
        if self.min_snr_gamma is not None:
            positive("min_snr_gamma")
        integer("shift_px", 0)
        w = self.lora_window
        if not (w is None or w == "auto" or (isinstance(w, (list, tuple)) and len(w) == 2
                                             and all(isinstance(x, (int, float)) and 0 <= x <= 1 for x in w)
                                             and w[0] <= w[1])):
            raise ValueError(f"lora_window must be [start, end] with 0 <= start <= end <= 1, or \"auto\", got {w!r}")
        if self.shift_phases not in SHIFT_PHASES:
            raise ValueError(f"shift_phases must be one of {', '.join(SHIFT_PHASES)}, got {self.shift_phases!r}")
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"timestep_sampling must be one of {', '.join(TIMESTEP_SAMPLINGS)}, "
                             f"got {self.timestep_sampling!r}")
        for name in ("unet_targets", "text_targets"):
            targets = getattr(self, name)
            if not targets:
                raise ValueError(f"{name} must name at least one module")
            for t in targets:
                if not isinstance(t, str) or not t.strip():
                    raise ValueError(f"{name}: target module names must be non-empty strings, got {t!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["unet_targets"] = list(self.unet_targets)
        d["text_targets"] = list(self.text_targets)
        return d


# settings that do not change the trained weights (left out of the checkpoint fingerprint)
NON_NUMERIC_SETTINGS = frozenset({"checkpoint_every", "preview_every"})

# settings added after keys were first published, with the default they had implicitly before: at that
# value they are left out of cache keys and checkpoint fingerprints, so older keys stay valid
LATER_SETTINGS = {"timestep_sampling": "uniform", "t5_lora": False, "shift_px": 0, "shift_phases": "both",
                  "lora_window": None}


def keyed_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` without the :data:`LATER_SETTINGS` that have their default (what keys and fingerprints hash)."""
    return {k: v for k, v in settings.items() if not (k in LATER_SETTINGS and v == LATER_SETTINGS[k])}


__all__ = ["PseudoWord", "TrainConfig", "ROLES", "SHIFT_PHASES", "PLACE_WORDS", "place_words", "MIXED_PRECISIONS", "TIMESTEP_SAMPLINGS", "NON_NUMERIC_SETTINGS",
           "LATER_SETTINGS", "keyed_settings"]
